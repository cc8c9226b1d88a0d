"""The MOPD token advantage: a hand-computed overlap value on a toy distribution (and its empty intersection), a
brute force over sets for every mode, A = 0 for a teacher equal to the student, and the vocab-parallel pieces
(a vocab split by hand into shards and merged) against the whole vocab."""

import math

import pytest
import torch

from keye_train.posttrain.mopd.advantage import (
    merge_logsumexp,
    merge_topk,
    shard_logsumexp,
    shard_topk,
    shard_values_at,
    token_scores,
)

MODES = ["overlap", "student_only", "teacher_on_student", "sampled_token"]
P = [0.4, 0.3, 0.15, 0.1, 0.04, 0.01]  # the student
Q = [0.05, 0.5, 0.2, 0.05, 0.15, 0.05]  # the teacher: TopK(T, 3) = {1, 2, 4}


def logits(probs):
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float64)[None]


def test_the_overlap_advantage_matches_a_hand_computation():
    # TopK(S, 3) = {0, 1, 2}; Omega = {1, 2}; pibar = 0.3 / 0.45, 0.15 / 0.45
    got = token_scores(logits(P), logits(Q), torch.tensor([0]), "overlap", 3)
    hand = (0.3 / 0.45) * (math.log(0.5) - math.log(0.3)) + (0.15 / 0.45) * (math.log(0.2) - math.log(0.15))
    assert got.advantage.item() == pytest.approx(hand, rel=1e-12)
    assert got.overlap.item() == 2 and got.support.item() == 2
    assert got.student_mass.item() == pytest.approx(0.85, rel=1e-12)
    assert got.teacher_mass.item() == pytest.approx(0.85, rel=1e-12)
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(P, Q))
    assert got.reverse_kl.item() == pytest.approx(kl, rel=1e-12)


def test_an_empty_intersection_gives_zero():
    teacher = [0.01, 0.02, 0.03, 0.3, 0.34, 0.3]  # TopK(T, 3) = {3, 4, 5}, disjoint from {0, 1, 2}
    got = token_scores(logits(P), logits(teacher), torch.tensor([0]), "overlap", 3)
    assert got.advantage.item() == 0.0 and got.overlap.item() == 0 and got.support.item() == 0
    # the other modes still see a gap
    other = token_scores(logits(P), logits(teacher), torch.tensor([0]), "student_only", 3)
    hand = sum(p / 0.85 * (math.log(q) - math.log(p)) for p, q in zip(P[:3], teacher[:3]))
    assert other.advantage.item() == pytest.approx(hand, rel=1e-12)


def brute_force(s_logits, t_logits, sampled, mode, k):
    """Sets and Python floats, one position at a time."""
    out = []
    for s_row, t_row, y in zip(s_logits.tolist(), t_logits.tolist(), sampled.tolist()):
        ls = [x - math.log(sum(math.exp(v) for v in s_row)) for x in s_row]
        lt = [x - math.log(sum(math.exp(v) for v in t_row)) for x in t_row]
        top_s = set(sorted(range(len(ls)), key=lambda v: -ls[v])[:k])
        top_t = set(sorted(range(len(lt)), key=lambda v: -lt[v])[:k])
        if mode == "sampled_token":
            out.append(lt[y] - ls[y])
            continue
        omega = {"overlap": top_s & top_t, "student_only": top_s, "teacher_on_student": top_t}[mode]
        norm = sum(math.exp(ls[v]) for v in omega)
        out.append(sum(math.exp(ls[v]) / norm * (lt[v] - ls[v]) for v in omega) if omega else 0.0)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_a_brute_force(mode):
    g = torch.Generator().manual_seed(0)
    s = 2 * torch.randn(40, 13, generator=g, dtype=torch.float64)
    t = 0.5 * s + 2.5 * torch.randn(40, 13, generator=g, dtype=torch.float64)  # correlated: overlaps of every size
    sampled = torch.randint(0, 13, (40,), generator=g)
    got = token_scores(s, t, sampled, mode, 4, chunk=7)
    assert got.advantage.tolist() == pytest.approx(brute_force(s, t, sampled, mode, 4), rel=1e-10, abs=1e-12)
    if mode == "overlap":
        assert set(got.overlap.tolist()) >= {0, 1, 2}  # the toy covers the empty and partial intersections


@pytest.mark.parametrize("mode", MODES)
def test_a_teacher_equal_to_the_student_gives_zero(mode):
    s = torch.randn(20, 17, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = token_scores(s, s.clone(), torch.randint(0, 17, (20,)), mode, 5)
    assert got.advantage.abs().max().item() == 0.0 and got.reverse_kl.abs().max().item() < 1e-15


@pytest.mark.parametrize("widths", [[7, 6], [5, 1, 4, 3], [13]])
def test_the_vocab_parallel_pieces_split_and_merge_to_the_whole_vocab(widths):
    """What VocabShard's collectives do: per-shard logsumexp, top-k and reads, merged over shards."""
    g = torch.Generator().manual_seed(2)
    whole = 3 * torch.randn(9, 13, generator=g, dtype=torch.float64)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    shards = [whole[:, a : a + w] for a, w in zip(starts, widths)]
    lse = merge_logsumexp(torch.stack([shard_logsumexp(x) for x in shards]))
    torch.testing.assert_close(lse, torch.logsumexp(whole, -1), rtol=1e-14, atol=1e-14)
    logp = [x - lse[:, None] for x in shards]
    k = 4
    local = [shard_topk(lp, a, k) for lp, a in zip(logp, starts)]
    values, ids = merge_topk(torch.cat([v for v, _ in local], -1), torch.cat([i for _, i in local], -1), k)
    ref_values, ref_ids = torch.topk(torch.log_softmax(whole, -1), k, -1)
    torch.testing.assert_close(values, ref_values, rtol=1e-14, atol=1e-14)
    assert ids.tolist() == ref_ids.tolist()
    read = sum(shard_values_at(lp, a, ref_ids) for lp, a in zip(logp, starts))
    torch.testing.assert_close(read, ref_values, rtol=1e-14, atol=1e-14)


def test_tensor_parallel_2_on_gloo_gives_the_one_rank_scores(tmp_path):
    """Every mode in one torchrun would cost one start each; the overlap mode exercises every collective (the
    global logsumexp, both top-k gathers, the reads at global ids and the KL sum)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.keye_train.posttrain.mopd.tp_inputs import inputs

    repo = Path(__file__).resolve().parents[4]
    out = tmp_path / "tp2.json"
    worker = repo / "tests" / "keye_train" / "posttrain" / "mopd" / "tp_worker.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(out),
        "overlap",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(repo))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    got = json.loads(out.read_text())
    student, teacher, sampled, k = inputs()
    ref = token_scores(student, teacher, sampled, "overlap", k)
    for name in ref.__dataclass_fields__:
        assert got[name] == pytest.approx(getattr(ref, name).tolist(), rel=1e-12, abs=1e-14), name
    assert 0 in got["overlap"] and max(got["overlap"]) >= 2
