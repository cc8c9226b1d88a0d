"""A toy policy and a global RL batch for the GSPO objective tests (shared by the test and its gloo DP worker).

The policy is a float64 bigram model: the logits at a position are E[input token] @ W^T, so the per-token CE does
not depend on how responses are packed, and any split of the global batch must give the same gradient."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from keye_train.posttrain.batch import TextResponse, pack_text_responses
from keye_train.posttrain.gspo import group_advantages

VOCAB, DIM, GROUP, PROMPTS = 11, 5, 4, 2
SEQ = 64
PAD = 0


def toy_policy(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "E": torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64).requires_grad_(),
        "W": torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64).requires_grad_(),
    }


def token_logp(policy: dict, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = policy["E"][inputs] @ policy["W"].T
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def per_token_ce(policy: dict, batch) -> torch.Tensor:
    """What the model returns on the last stage: [1, S] CE of labels."""
    return -token_logp(policy, batch.input_ids, batch.labels).view(1, -1)


def toy_responses(seed: int = 1) -> list[TextResponse]:
    """PROMPTS groups of GROUP responses with random lengths; pi_old and the rollout log-probs are the toy
    policy's (seed 0) plus noise, so ratios differ from 1 and some responses clip."""
    g = torch.Generator().manual_seed(seed)
    policy = toy_policy(0)
    rewards = torch.rand(PROMPTS * GROUP, generator=g, dtype=torch.float64)
    rewards[GROUP - 1] = rewards[0]  # a tie inside a group
    advantages = group_advantages(rewards, GROUP).float().double()  # a pack stores float32
    out = []
    for k in range(PROMPTS * GROUP):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(1, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        tokens = torch.tensor(prompt + response)
        with torch.no_grad():
            logp = token_logp(policy, tokens[:-1], tokens[1:])[len(prompt) - 1 :]
        old = logp + 0.05 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
        rollout = old + 0.8 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
        # float32 values, as a pack stores them, so the reference sees exactly the pack's numbers
        old, rollout = old.float().double(), rollout.float().double()
        out.append(TextResponse(prompt, response, float(advantages[k]), old.tolist(), rollout.tolist()))
    return out


def packs(responses: list[TextResponse], sizes: list[int]):
    """Consecutive packs of the given numbers of responses."""
    assert sum(sizes) == len(responses)
    out, at = [], 0
    for size in sizes:
        out.append(pack_text_responses(responses[at : at + size], SEQ, PAD))
        at += size
    return out


def rl_config(**overrides):
    values = dict(
        clip_ratio_low=0.02, clip_ratio_high=0.03, correction="none", tis_cap=2.0, icepop_low=0.5, icepop_high=5.0
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def reference_loss(policy: dict, responses: list[TextResponse], rl) -> torch.Tensor:
    """The global loss written out response by response: (1/N) sum_i (1/|y_i|) sum_t w_t max(-A s_it,
    -A clip(s_it)), s_it = sg[s_i] exp(logp_t - sg[logp_t]), s_i = exp(mean_t(logp_t - old_t))."""
    total = torch.zeros((), dtype=torch.float64)
    for sample in responses:
        tokens = torch.tensor([*sample.prompt_ids, *sample.response_ids])
        p = len(sample.prompt_ids)
        logp = token_logp(policy, tokens[:-1], tokens[1:])[p - 1 :]
        old = torch.tensor(sample.old_logp, dtype=torch.float64)
        rollout = torch.tensor(sample.rollout_logp, dtype=torch.float64)
        s = torch.exp((logp - old).mean()).detach()
        terms = []
        for t in range(len(logp)):
            s_t = s * torch.exp(logp[t] - logp[t].detach())
            a = sample.advantage
            value = torch.maximum(-a * s_t, -a * s_t.clamp(1 - rl.clip_ratio_low, 1 + rl.clip_ratio_high))
            ratio = float(torch.exp(old[t] - rollout[t]))
            if rl.correction == "tis":
                value = value * min(ratio, rl.tis_cap)
            elif rl.correction == "icepop":
                value = value * float(rl.icepop_low <= ratio <= rl.icepop_high)
            terms.append(value)
        total = total + torch.stack(terms).mean()
    return total / len(responses)


class WorldPlacement:
    """The placement surface the objective uses, on the default process group (no megatron)."""

    @staticmethod
    def data_parallel_group():
        return torch.distributed.group.WORLD

    @staticmethod
    def is_last_stage() -> bool:
        return True

    @staticmethod
    def pipeline_size() -> int:
        return 1

    @staticmethod
    def loss_elsewhere() -> bool:
        return False


def run_objective(objective, policy: dict, microbatches: list):
    """What the loop and megatron do with an objective: begin_step, per micro-batch loss / n_micro and
    backward, end_step. Returns (StepLoss, {name: grad})."""
    for p in policy.values():
        p.grad = None
    objective.begin_step(microbatches)
    outputs = []
    for batch in microbatches:
        loss, logged = objective.loss_func(batch)(per_token_ce(policy, batch))
        (loss / len(microbatches)).backward()
        outputs.append(logged)
    return objective.end_step(outputs), {k: p.grad.clone() for k, p in policy.items()}
