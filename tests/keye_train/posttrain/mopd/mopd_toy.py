"""A toy student and teacher and a global MOPD batch (shared by the objective tests and their gloo DP worker).

Both are gspo_toy's float64 bigram models (logits at a position = E[input token] @ W^T), so per-token values do not
depend on the packing, and the reverse KL can be taken exactly over every context token."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from keye_train.posttrain.batch import TextResponse
from keye_train.posttrain.mopd.advantage import token_scores
from keye_train.posttrain.mopd.batch import pack_mopd_responses
from tests.keye_train.posttrain.gspo_toy import DIM, PAD, SEQ, VOCAB, token_logp, toy_policy

__all__ = ["DIM", "SEQ", "VOCAB", "toy_policy", "teacher_policy", "logits_of", "sample_responses", "mopd_packs"]


def teacher_policy(seed: int = 7) -> dict:
    return {k: v.detach() for k, v in toy_policy(seed).items()}


def logits_of(policy: dict, inputs: torch.Tensor) -> torch.Tensor:
    return policy["E"][inputs] @ policy["W"].T


def sample_responses(student: dict, teacher: dict, mode: str, k: int, n: int, seed: int, length: int = 6):
    """n responses sampled from the student (temperature 1), each with its token advantages against the teacher,
    a random outcome advantage, pi_old / rollout log-probs around the student's and a tool token or two."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        tokens = list(prompt)
        with torch.no_grad():
            for _ in range(int(torch.randint(1, length + 1, (1,), generator=g))):
                probs = torch.softmax(logits_of(student, torch.tensor(tokens[-1:])), -1)[0]
                tokens.append(int(torch.multinomial(probs, 1, generator=g)))
            inputs, targets = torch.tensor(tokens[:-1]), torch.tensor(tokens[1:])
            p = len(prompt)
            scores = token_scores(
                logits_of(student, inputs)[p - 1 :], logits_of(teacher, inputs)[p - 1 :], targets[p - 1 :], mode, k
            )
            logp = token_logp(student, inputs, targets)[p - 1 :]
        old = (logp + 0.05 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).float().double()
        rollout = (old + 0.8 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).float().double()
        response = tokens[p:]
        generated = (torch.rand(len(response), generator=g) > 0.2).tolist()
        sample = TextResponse(prompt, response, float(torch.randn(1, generator=g)), old.tolist(), rollout.tolist())
        out.append((sample, scores.advantage.float().double().tolist(), generated))
    return out


def mopd_packs(responses, sizes: list[int], seq: int = SEQ):
    assert sum(sizes) == len(responses)
    out, at = [], 0
    for size in sizes:
        part = responses[at : at + size]
        out.append(
            pack_mopd_responses([s for s, _, _ in part], [a for _, a, _ in part], seq, PAD, [gen for _, _, gen in part])
        )
        at += size
    return out


def configs(correction: str = "none", outcome_weight: float = 0.0):
    rl = SimpleNamespace(correction=correction, tis_cap=2.0, icepop_low=0.5, icepop_high=5.0)
    return SimpleNamespace(outcome_weight=outcome_weight), rl


def reference_loss(policy: dict, responses, mopd, rl) -> torch.Tensor:
    """-(1/N) sum_i (1/|M_i|) sum_{t in M_i} w_t (A_t + alpha A_i) log pi(y_t), response by response."""
    terms = []
    for sample, advantages, generated in responses:
        if not any(generated):
            continue
        tokens = torch.tensor([*sample.prompt_ids, *sample.response_ids])
        p = len(sample.prompt_ids)
        logp = token_logp(policy, tokens[:-1], tokens[1:])[p - 1 :]
        values = []
        for t, keep in enumerate(generated):
            if not keep:
                continue
            ratio = float(torch.exp(torch.tensor(sample.old_logp[t] - sample.rollout_logp[t], dtype=torch.float64)))
            w = {"none": 1.0, "tis": min(ratio, rl.tis_cap), "icepop": float(rl.icepop_low <= ratio <= rl.icepop_high)}
            a = advantages[t] + mopd.outcome_weight * float(torch.tensor(sample.advantage, dtype=torch.float32))
            values.append(-w[rl.correction] * a * logp[t])
        terms.append(torch.stack(values).mean())
    return torch.stack(terms).sum() / len(terms)


def context_reverse_kl(student: dict, teacher: dict) -> float:
    """Mean over every context token of KL(pi_S || pi_T)."""
    with torch.no_grad():
        ls = torch.log_softmax(logits_of(student, torch.arange(VOCAB)), -1)
        lt = torch.log_softmax(logits_of(teacher, torch.arange(VOCAB)), -1)
        return float((ls.exp() * (ls - lt)).sum(-1).mean())
