"""GSPO: group advantages, a hand-computed loss and gradient (float64), the clip at verl's bounds, the TIS and
IcePop corrections, and the objective's invariance to the micro-batch split and to DP = 2 (gloo)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from keye_train.posttrain.batch import TextResponse, pack_text_responses
from keye_train.posttrain.gspo import (
    correction_weights,
    group_advantages,
    gspo_token_losses,
    seq_mean_token_mean_sum,
)
from keye_train.training.objectives.gspo import GSPOObjective
from tests.keye_train.posttrain.gspo_toy import (
    WorldPlacement,
    packs,
    reference_loss,
    rl_config,
    run_objective,
    toy_policy,
    toy_responses,
)

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A one-process gloo world for the objective's all-reduces (torn down after the module)."""
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    got = group_advantages(rewards, 4, eps=1e-6)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected
    a = 0.5 / (std + 1e-6)
    mean3, std3 = 0.75, math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    expected = [a, -a, -a, a, 0, 0, 0, 0] + [(r - mean3) / (std3 + 1e-6) for r in (0, 0, 0, 3)]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(rewards, 1)
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


# Four responses of 2, 3, 1 and 2 tokens, flat with two unsupervised positions (a prompt and padding).
LENGTHS = [2, 3, 1, 2]
INDEX = torch.tensor([-1, 0, 0, 1, 1, 1, 2, 3, 3, -1])
MASK = (INDEX >= 0).double()
LOW, HIGH = 0.2, 0.3
# log s_i: inside the clip; above 1 + high with A > 0 (clipped); above 1 + high with A < 0 (not clipped: the
# pessimistic branch is the unclipped one); below 1 - low with A < 0 (clipped).
LOG_S = [math.log(1.1), math.log(1.5), math.log(1.5), math.log(0.7)]
ADV = torch.tensor([1.5, 2.0, -1.0, -0.5], dtype=torch.float64)
CLIPPED = [False, True, False, True]


def toy_tokens():
    """logp as free leaves, and old_logp placed so that each response's mean log-ratio is LOG_S[i]."""
    logp = torch.tensor([9.0, -1.0, -2.0, -0.5, -0.7, -0.9, -3.0, -0.2, -0.4, 9.0], dtype=torch.float64)
    noise = torch.tensor([0.0, 0.3, -0.3, 0.2, 0.1, -0.3, 0.0, 0.05, -0.05, 0.0], dtype=torch.float64)
    shift = torch.tensor([0.0] + [LOG_S[i] for i in INDEX[1:-1].tolist()] + [0.0], dtype=torch.float64)
    old = logp - shift + noise  # the noise sums to 0 within each response
    return logp.requires_grad_(), old


@pytest.mark.parametrize("with_weights", [False, True])
def test_the_loss_and_gradient_match_a_hand_computation(with_weights):
    logp, old = toy_tokens()
    weights = torch.tensor([5.0, 0.5, 2.0, 1.0, 0.0, 1.5, 0.7, 1.0, 0.3, 5.0], dtype=torch.float64)
    pg, stats = gspo_token_losses(logp, old, ADV, INDEX, MASK, LOW, HIGH, weights if with_weights else None)
    loss = seq_mean_token_mean_sum(pg, MASK, INDEX, 4) / 4
    loss.backward()
    w = weights.tolist() if with_weights else [1.0] * 10
    n = len(LENGTHS)
    hand_loss, hand_grad = 0.0, [0.0] * 10
    for i, (log_s, a, length) in enumerate(zip(LOG_S, ADV.tolist(), LENGTHS)):
        s = math.exp(log_s)
        value = max(-a * s, -a * min(max(s, 1 - LOW), 1 + HIGH))
        tokens = [t for t in range(10) if INDEX[t] == i]
        hand_loss += sum(w[t] * value for t in tokens) / length / n
        for t in tokens:
            hand_grad[t] = 0.0 if CLIPPED[i] else -a * s * w[t] / length / n
    assert loss.item() == pytest.approx(hand_loss, rel=1e-12)
    assert logp.grad.tolist() == pytest.approx(hand_grad, abs=1e-12)
    assert stats["clipped"].tolist() == CLIPPED
    assert stats["log_ratio"].tolist() == pytest.approx(LOG_S, abs=1e-12)


def test_without_weights_the_gradient_is_the_sequence_level_objectives():
    """GSPO's own statement: J = (1/N) sum_i min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean log-ratio), through a
    softmax policy; the token form must give the same gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (10,), generator=g)
    _, old = toy_tokens()
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    old = old - toy_tokens()[0].detach() + logp.detach()  # the same per-response ratios as the hand test
    pg, _ = gspo_token_losses(logp, old, ADV, INDEX, MASK, LOW, HIGH)
    (seq_mean_token_mean_sum(pg, MASK, INDEX, 4) / 4).backward()
    ours = logits.grad.clone()
    logits.grad = None
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    objective = torch.zeros((), dtype=torch.float64)
    for i in range(4):
        tokens = INDEX == i
        s = torch.exp((logp[tokens] - old[tokens]).mean())
        objective = objective + torch.minimum(s * ADV[i], s.clamp(1 - LOW, 1 + HIGH) * ADV[i])
    (-objective / 4).backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "advantage, log_s, has_gradient",
    [
        (1.0, math.log1p(4e-4) - 1e-7, True),  # A > 0: just inside 1 + eps_high
        (1.0, math.log1p(4e-4) + 1e-7, False),  # just outside: clipped
        (1.0, math.log1p(-3e-4) - 1e-3, True),  # A > 0 below 1 - eps_low: the unclipped term is the min
        (-1.0, math.log1p(-3e-4) + 1e-7, True),  # A < 0: just inside 1 - eps_low
        (-1.0, math.log1p(-3e-4) - 1e-7, False),  # just outside: clipped
        (-1.0, math.log1p(4e-4) + 1e-3, True),  # A < 0 above 1 + eps_high: unclipped
    ],
)
def test_the_clip_at_verls_gspo_bounds(advantage, log_s, has_gradient):
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - log_s
    index, mask, adv = torch.tensor([0, 0]), torch.ones(2, dtype=torch.float64), torch.tensor([advantage])
    pg, stats = gspo_token_losses(logp, old, adv, index, mask, 3e-4, 4e-4)
    seq_mean_token_mean_sum(pg, mask, index, 1).backward()
    s = math.exp(log_s)
    expected = max(-advantage * s, -advantage * min(max(s, 1 - 3e-4), 1 + 4e-4))
    assert pg[0].item() == pytest.approx(expected, rel=1e-12)
    assert bool(stats["clipped"][0]) is not has_gradient
    if has_gradient:
        assert logp.grad.tolist() == pytest.approx([-advantage * s / 2] * 2, rel=1e-12)
    else:
        assert logp.grad.tolist() == [0.0, 0.0]


def test_tis_caps_and_icepop_masks_the_trainer_over_rollout_ratio():
    old = torch.log(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    ratios = torch.tensor([0.4, 0.5, 1.7, 5.0, 6.0], dtype=torch.float64)
    rollout = old - torch.log(ratios)
    tis = correction_weights(old, rollout, "tis", tis_cap=2.0)
    assert tis.tolist() == pytest.approx([0.4, 0.5, 1.7, 2.0, 2.0], rel=1e-12)
    assert correction_weights(old, rollout, "icepop", icepop_low=0.5, icepop_high=5.0).tolist() == [0, 1, 1, 1, 0]
    assert correction_weights(old, rollout, "none") is None
    with pytest.raises(ValueError, match="rollout log-probs"):
        correction_weights(old, None, "tis")
    with pytest.raises(ValueError, match="expected one of"):
        correction_weights(old, rollout, "dual")


def test_a_packed_text_batch_puts_each_response_token_at_its_label_position():
    batch = pack_text_responses(
        [TextResponse([5, 6], [7, 8, 9], 0.5, [-1.0, -2.0, -3.0]), TextResponse([3], [4], -0.5, [-4.0])], 10, 0
    )
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 3, 4, 0, 0, 0]
    assert batch.labels[:6].tolist() == [6, 7, 8, 9, 0, 4]
    assert batch.loss_mask.tolist() == [0, 1, 1, 1, 0, 1, 0, 0, 0, 0]
    assert batch.response_index.tolist() == [-1, 0, 0, 0, -1, 0 + 1, -1, -1, -1, -1]
    assert batch.old_logp.tolist()[:6] == [0, -1, -2, -3, 0, -4] and batch.rollout_logp is None
    assert batch.cu_seqlens.tolist() == [0, 5, 7, 10] and batch.position_ids[:, 5:7].tolist() == [[0, 1]] * 3
    assert batch.num_responses() == 2 and batch.num_supervised() == 4


@pytest.mark.parametrize("correction", ["none", "tis", "icepop"])
@pytest.mark.parametrize("sizes", [[8], [4, 4], [2, 2, 2, 2], [1, 3, 2, 2], [5, 1, 1, 1]])
def test_the_objective_is_the_global_loss_for_any_micro_batch_split(one_rank, sizes, correction):
    responses, rl = toy_responses(), rl_config(correction=correction)
    policy = toy_policy(0)
    result, grads = run_objective(GSPOObjective(WorldPlacement(), "cpu", rl), policy, packs(responses, sizes))
    for p in policy.values():
        p.grad = None
    reference = reference_loss(policy, responses, rl)
    reference.backward()
    assert result.loss == pytest.approx(reference.item(), rel=1e-12, abs=1e-15)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, policy[name].grad, rtol=1e-10, atol=1e-13)
    assert result.metrics["rl/responses"] == 8.0 and 0 < result.metrics["rl/clip_fraction"] < 1


def test_an_rl_step_without_responses_has_nothing_to_learn(one_rank):
    empty = pack_text_responses([TextResponse([1], [2], 0.0)], 8, 0)
    empty.loss_mask.zero_()
    assert GSPOObjective(WorldPlacement(), "cpu", rl_config()).begin_step([empty]) == 0


def test_the_objective_refuses_a_plain_packed_batch(one_rank):
    batch = pack_text_responses([TextResponse([1], [2], 0.0)], 8, 0)
    batch.response_index = None
    objective = GSPOObjective(WorldPlacement(), "cpu", rl_config())
    with pytest.raises(ValueError, match="response_index"):
        objective.loss_func(batch)(torch.zeros(1, 8))


@pytest.mark.parametrize("correction", ["none", "icepop"])
def test_data_parallel_2_gives_the_one_rank_loss_and_gradient(tmp_path, correction):
    out = tmp_path / "dp2.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "keye_train" / "posttrain" / "gspo_dp_worker.py"),
        str(out),
        correction,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    got = json.loads(out.read_text())
    rl, policy = rl_config(correction=correction), toy_policy(0)
    reference = reference_loss(policy, toy_responses(), rl)
    reference.backward()
    assert got["loss"] == pytest.approx(reference.item(), rel=1e-12, abs=1e-15)
    for name, grad in got["grads"].items():
        torch.testing.assert_close(torch.tensor(grad, dtype=torch.float64), policy[name].grad, rtol=1e-10, atol=1e-13)
    assert got["metrics"]["rl/responses"] == 8.0
