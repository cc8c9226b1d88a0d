"""The MOPD objective: the loss and gradient written out per response (token-mean, tool tokens out, outcome term,
TIS / IcePop) for any micro-batch split and for DP = 2 (gloo); a teacher equal to the student gives A = 0 in every
mode and the weights don't move; with a different teacher the reverse KL to it falls over a few optimizer steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from keye_train.posttrain.batch import TextResponse
from keye_train.posttrain.mopd.batch import pack_mopd_responses
from keye_train.training.objectives.mopd import MOPDObjective
from tests.keye_train.posttrain.gspo_toy import WorldPlacement, run_objective, toy_policy
from tests.keye_train.posttrain.mopd.mopd_toy import (
    configs,
    context_reverse_kl,
    mopd_packs,
    reference_loss,
    sample_responses,
    teacher_policy,
)

REPO = Path(__file__).resolve().parents[4]
MODES = ["overlap", "student_only", "teacher_on_student", "sampled_token"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def responses():
    return sample_responses(toy_policy(0), teacher_policy(), "overlap", 4, 8, seed=3)


@pytest.mark.parametrize("correction, outcome", [("none", 0.0), ("tis", 0.0), ("icepop", 0.5)])
@pytest.mark.parametrize("sizes", [[8], [4, 4], [1, 3, 2, 2], [5, 1, 1, 1]])
def test_the_loss_is_the_global_loss_for_any_micro_batch_split(one_rank, responses, sizes, correction, outcome):
    mopd, rl = configs(correction, outcome)
    policy = toy_policy(0)
    result, grads = run_objective(
        MOPDObjective(WorldPlacement(), "cpu", mopd, rl), policy, mopd_packs(responses, sizes)
    )
    for p in policy.values():
        p.grad = None
    reference = reference_loss(policy, responses, mopd, rl)
    reference.backward()
    assert result.loss == pytest.approx(reference.item(), rel=1e-12, abs=1e-15)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, policy[name].grad, rtol=1e-10, atol=1e-13)
    assert result.metrics["mopd/responses"] == sum(any(gen) for _, _, gen in responses)
    assert any(not all(gen) for _, _, gen in responses)  # the toy has tool tokens to exclude


def test_data_parallel_2_gives_the_one_rank_loss_and_gradient(tmp_path, responses):
    out = tmp_path / "dp2.json"
    worker = REPO / "tests" / "keye_train" / "posttrain" / "mopd" / "mopd_dp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    got = json.loads(out.read_text())
    mopd, rl = configs("icepop", 0.5)
    policy = toy_policy(0)
    reference = reference_loss(policy, responses, mopd, rl)
    reference.backward()
    assert got["loss"] == pytest.approx(reference.item(), rel=1e-12, abs=1e-15)
    for name, grad in got["grads"].items():
        torch.testing.assert_close(torch.tensor(grad, dtype=torch.float64), policy[name].grad, rtol=1e-10, atol=1e-13)


def train(student: dict, teacher: dict, mode: str, steps: int, lr: float) -> list[float]:
    """On-policy MOPD steps (fresh student samples each step, Adam): the context reverse KL before each step."""
    mopd, rl = configs()
    optimizer = torch.optim.Adam(list(student.values()), lr=lr)
    curve = []
    for step in range(steps):
        curve.append(context_reverse_kl(student, teacher))
        responses = sample_responses(student, teacher, mode, 4, 32, seed=100 + step)
        responses = [(s, a, [True] * len(a)) for s, a, _ in responses]
        optimizer.zero_grad()
        run_objective(MOPDObjective(WorldPlacement(), "cpu", mopd, rl), student, mopd_packs(responses, [16, 16], 160))
        optimizer.step()
    curve.append(context_reverse_kl(student, teacher))
    return curve


@pytest.mark.parametrize("mode", MODES)
def test_a_teacher_equal_to_the_student_gives_zero_and_the_weights_do_not_move(one_rank, mode):
    student = toy_policy(0)
    before = {k: v.detach().clone() for k, v in student.items()}
    same = {k: v.detach().clone() for k, v in student.items()}
    responses = sample_responses(student, same, mode, 4, 8, seed=5)
    assert all(a == 0.0 for _, advs, _ in responses for a in advs)
    curve = train(student, same, mode, 2, lr=0.05)
    assert curve == [0.0] * 3
    for name, value in student.items():
        assert torch.equal(value.detach(), before[name]), name


def test_the_reverse_kl_to_a_different_teacher_falls_with_the_sampled_token_advantage(one_rank):
    curve = train(toy_policy(0), teacher_policy(), "sampled_token", 8, lr=0.05)
    assert curve[-1] < 0.8 * curve[0], curve
    assert sum(b < a for a, b in zip(curve, curve[1:])) >= 6, curve


@pytest.mark.parametrize("mode", ["overlap", "student_only", "teacher_on_student"])
def test_a_support_set_advantage_has_no_expected_gradient_at_its_own_token(mode):
    """What the loss as KEYE writes it does with a support-set mode: A_t depends on the state only, so
    E_{y ~ pi_S}[A_t grad log pi_S(y)] = A_t grad sum_y pi_S(y) = 0, enumerated exactly over the vocab. (This is
    why the reverse-KL-falls test runs the sampled-token mode; see the objective's docstring.)"""
    from keye_train.posttrain.mopd.advantage import token_scores

    g = torch.Generator().manual_seed(4)
    student = torch.randn(1, 11, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 11, generator=g, dtype=torch.float64)
    a = token_scores(student.detach(), teacher, torch.tensor([0]), mode, 5).advantage
    assert a.abs().item() > 1e-3
    probs = torch.softmax(student.detach(), -1)[0]
    logp = torch.log_softmax(student, -1)[0]
    (-(a.detach() * probs * logp).sum()).backward()  # sum_y pi(y) * (-A log pi(y))
    assert student.grad.abs().max().item() < 1e-15


def test_a_step_without_generated_tokens_has_nothing_to_learn(one_rank):
    mopd, rl = configs()
    batch = pack_mopd_responses([TextResponse([1], [2, 3], 0.0)], [[0.5, 0.5]], 8, 0, [[False, False]])
    assert MOPDObjective(WorldPlacement(), "cpu", mopd, rl).begin_step([batch]) == 0


def test_the_objective_refuses_a_batch_without_token_advantages(one_rank):
    mopd, rl = configs()
    batch = pack_mopd_responses([TextResponse([1], [2], 0.0)], [[0.1]], 8, 0)
    batch.token_advantages = None
    with pytest.raises(ValueError, match="token_advantages"):
        MOPDObjective(WorldPlacement(), "cpu", mopd, rl).loss_func(batch)(torch.zeros(1, 8))


@pytest.mark.parametrize("mode", ["overlap", "student_only", "teacher_on_student"])
def test_the_distribution_level_support_loss_is_minus_a(mode):
    from keye_train.posttrain.mopd.advantage import support_kl_loss, token_scores
    from tests.keye_train.posttrain.mopd.mopd_toy import VOCAB, logits_of

    student, teacher = toy_policy(0), teacher_policy()
    contexts = torch.arange(VOCAB)
    s, t = logits_of(student, contexts), logits_of(teacher, contexts)
    ref = token_scores(s.detach(), t, contexts, mode, 4).advantage
    torch.testing.assert_close(support_kl_loss(s, t, mode, 4).detach(), -ref, rtol=1e-12, atol=1e-14)


def test_descending_the_student_support_loss_lowers_the_reverse_kl():
    """Over the student's top-k (student_only) the distribution-level loss lowers the full reverse KL on the toy
    (3.06 -> 0.71 in 30 Adam steps). The overlap and teacher_on_student forms raised it on the same toy (3.06 ->
    4.75 and 4.83): see the objective's docstring for why; they are not asserted here."""
    from keye_train.posttrain.mopd.advantage import support_kl_loss
    from tests.keye_train.posttrain.mopd.mopd_toy import VOCAB, logits_of

    student, teacher = toy_policy(0), teacher_policy()
    contexts = torch.arange(VOCAB)
    t = logits_of(teacher, contexts)
    optimizer = torch.optim.Adam(list(student.values()), lr=0.05)
    curve = [context_reverse_kl(student, teacher)]
    for _ in range(30):
        optimizer.zero_grad()
        support_kl_loss(logits_of(student, contexts), t, "student_only", 4).mean().backward()
        optimizer.step()
        curve.append(context_reverse_kl(student, teacher))
    assert curve[-1] < 0.7 * curve[0], curve
