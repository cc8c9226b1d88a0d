"""GSPO (arXiv 2507.18071) as KEYE states it (training_recipe.md §5), in verl's GSPO-token form.

For G responses y_i of one prompt, with token log-probs under the policy (logp), the rollout-time policy pi_old
(old_logp) and the rollout engine (rollout_logp):

    s_i   = exp( (1/|y_i|) sum_t (logp_it - old_logp_it) )                      sequence-level ratio
    A_i   = (R_i - mean_j R_j) / (std_j R_j + eps)                             group-normalised advantage
    pg_it = max( -A_i s_it, -A_i clip(s_it, 1 - eps_low, 1 + eps_high) ) * w_it
    loss  = (1 / #sequences of the global batch) * sum_i (1/|y_i|) sum_t pg_it  seq-mean-token-mean

with s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]: its value is s_i and its gradient per token is s_i * grad logp_it,
so with one advantage per sequence the gradient equals that of the sequence-level objective. w_it is the optional
token-level correction against the rollout engine's log-probs (both of pi_old, so it carries no gradient):
TIS w = min(pi_old / pi_rollout, C); IcePop w = 1 if alpha <= pi_old / pi_rollout <= beta else 0.

Tokens are flat [T] (one packed micro-batch); `seq_index[t]` says which response token t belongs to (0..R-1) and
`mask[t]` whether it is a response token; every other position has mask 0.
"""

from __future__ import annotations

import torch

LOG_RATIO_MAX = 10.0  # verl clamps log s_it at 10 before exp (a ratio of e^10 means a broken pi_old)
CORRECTIONS = ("none", "tis", "icepop")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, unbiased: bool = True) -> torch.Tensor:
    """(R - group mean) / (group std + eps) over contiguous groups of `group_size` responses (verl's GRPO
    normalisation; unbiased=True is torch.std's Bessel-corrected std, as verl uses). A group of equal rewards gets 0."""
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size={group_size} must be >= 2")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {tuple(rewards.shape)} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=unbiased)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def segment_sum(values: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[R] sum over the masked tokens of each response."""
    index = seq_index.clamp(min=0)  # masked-out positions may carry -1; their values are zeroed by the mask
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, index, values * mask.to(values.dtype))


def token_counts(mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    return segment_sum(torch.ones_like(mask, dtype=torch.float64), mask, seq_index, num_seqs)


def sequence_log_ratio(logp, old_logp, mask, seq_index, num_seqs: int) -> torch.Tensor:
    """[R] (1/|y_i|) sum_t (logp - old_logp): log s_i (0 for a response with no tokens)."""
    counts = token_counts(mask, seq_index, num_seqs).to(logp.dtype).clamp(min=1)
    return segment_sum(logp - old_logp, mask, seq_index, num_seqs) / counts


def correction_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    kind: str = "none",
    tis_cap: float = 2.0,
    icepop_low: float = 0.5,
    icepop_high: float = 5.0,
) -> torch.Tensor | None:
    """[T] detached token weights from the trainer-vs-rollout ratio pi_old / pi_rollout, or None for `none`."""
    if kind not in CORRECTIONS:
        raise ValueError(f"correction={kind!r}, expected one of {list(CORRECTIONS)}")
    if kind == "none":
        return None
    if rollout_logp is None:
        raise ValueError(f"correction={kind!r} needs the rollout log-probs of the batch")
    ratio = torch.exp((old_logp - rollout_logp).detach())
    if kind == "tis":
        return ratio.clamp(max=tis_cap)
    return ((ratio >= icepop_low) & (ratio <= icepop_high)).to(ratio.dtype)


def gspo_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_index: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """[T] pg_it (zero off the mask), and per-response statistics: `log_ratio` [R] (log s_i), `clipped` [R]
    (the clip branch is taken: no gradient from that response)."""
    num_seqs = int(advantages.numel())
    index = seq_index.clamp(min=0)
    log_ratio = sequence_log_ratio(logp, old_logp, mask, seq_index, num_seqs)
    log_s = logp - logp.detach() + log_ratio.detach()[index]
    s = torch.exp(log_s.clamp(max=LOG_RATIO_MAX))
    adv = advantages.to(logp.dtype)[index]
    unclipped = -adv * s
    clipped = -adv * s.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    if weights is not None:
        pg = pg * weights.to(pg.dtype)
    pg = pg * mask.to(pg.dtype)
    seq_ratio = log_ratio.detach().exp()
    adv_seq = advantages.to(seq_ratio.dtype)
    clip_active = ((adv_seq > 0) & (seq_ratio > 1 + clip_high)) | ((adv_seq < 0) & (seq_ratio < 1 - clip_low))
    return pg, {"log_ratio": log_ratio.detach(), "clipped": clip_active}


def seq_mean_token_mean_sum(pg: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int):
    """sum_i (1/|y_i|) sum_t pg_it over the responses that have tokens; divide by the global response count."""
    counts = token_counts(mask, seq_index, num_seqs).to(pg.dtype)
    sums = segment_sum(pg, mask, seq_index, num_seqs)
    return (sums / counts.clamp(min=1))[counts > 0].sum()
