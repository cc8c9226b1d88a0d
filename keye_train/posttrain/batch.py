"""The packed micro-batch of an RL step: a `PackedBatch` (prompt + response documents, the loss mask on the
response tokens) plus, per label position, the response it belongs to and the pi_old / rollout log-probs, and one
advantage per response. Everything per position is aligned with `labels` (position t predicts labels[t])."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data_pipeline.batch import PackedBatch


@dataclass
class RLBatch(PackedBatch):
    """response_index: [S] int64, the response (0..R-1) of each supervised label position, -1 elsewhere.
    advantages: [R] float32, one per response of this pack.
    old_logp: [S] float32 log pi_old(labels[t]) from the trainer's recompute at rollout time; None: on-policy
    (pi_old is the current policy, the ratio is 1).
    rollout_logp: [S] float32 log-probs the rollout engine sampled with (TIS / IcePop); None without a correction.
    routes: [S, layers, k] int16 experts each position was routed to at rollout, -1 (route natively) where it was
    never fed forward (a response's last token, padding); None: no routing replay.
    """

    response_index: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    rollout_logp: torch.Tensor | None = None
    routes: torch.Tensor | None = None

    def num_responses(self) -> int:
        """Responses with at least one supervised token (the sequences seq-mean-token-mean averages over)."""
        if self.response_index is None or self.advantages is None:
            raise ValueError("an RL batch needs response_index and advantages")
        counts = torch.zeros(self.advantages.numel(), dtype=torch.float64)
        counts.index_add_(0, self.response_index.clamp(min=0).cpu(), self.loss_mask.double().cpu())
        return int((counts > 0).sum().item())


@dataclass
class TextResponse:
    """One rolled-out text sample: token ids, its response's advantage, and per response token the log-probs."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    advantage: float
    old_logp: Sequence[float] | None = None
    rollout_logp: Sequence[float] | None = None
    routes: torch.Tensor | None = None  # [prompt + response - 1, layers, k]: the rollout's routes of the fed tokens


def document_routes(routes: torch.Tensor, length: int, padded: int | None = None) -> torch.Tensor:
    """[padded, layers, k] int16 routes of a `length`-token [prompt | response] document from the rollout's
    [length - 1, layers, k] (its last token was never fed): -1 (native routing) on the last token and the tail."""
    if routes.dim() != 3 or routes.shape[0] != length - 1:
        raise ValueError(f"routes of shape {tuple(routes.shape)} for a document of {length} tokens: need {length - 1}")
    padded = length if padded is None else padded
    out = torch.full((padded, *routes.shape[1:]), -1, dtype=torch.int16)
    out[: length - 1] = routes.to(torch.int16)
    return out


def pack_text_responses(samples: Sequence[TextResponse], seq_length: int, pad_id: int) -> RLBatch:
    """One pack of text-only samples, each its own document `prompt + response` (1D positions on all three M-RoPE
    rows), the tail a padding document. Response token j sits at position len(prompt) + j, so it is predicted at
    label position len(prompt) - 1 + j, where its log-probs go."""
    ids = torch.full((seq_length,), pad_id, dtype=torch.int64)
    labels = torch.full((seq_length,), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    positions = torch.zeros(seq_length, dtype=torch.int64)
    index = torch.full((seq_length,), -1, dtype=torch.int64)
    old = torch.zeros(seq_length, dtype=torch.float32)
    rollout = torch.zeros(seq_length, dtype=torch.float32)
    routed = [s.routes is not None for s in samples]
    if any(routed) and not all(routed):
        raise ValueError("either every sample of a pack carries its routes (routing replay) or none does")
    routed, routes = all(routed) and bool(samples), None
    bounds, at = [0], 0
    for r, sample in enumerate(samples):
        tokens = [*sample.prompt_ids, *sample.response_ids]
        n, p = len(tokens), len(sample.prompt_ids)
        if p < 1 or not sample.response_ids:
            raise ValueError(f"sample {r}: a prompt of >= 1 token and a non-empty response are needed")
        if at + n > seq_length:
            raise ValueError(f"samples need {at + n} positions > seq_length {seq_length}")
        ids[at : at + n] = torch.tensor(tokens)
        labels[at : at + n - 1] = torch.tensor(tokens[1:])
        positions[at : at + n] = torch.arange(n)
        span = slice(at + p - 1, at + n - 1)
        loss_mask[span], index[span] = 1.0, r
        for values, target in ((sample.old_logp, old), (sample.rollout_logp, rollout)):
            if values is not None:
                if len(values) != len(sample.response_ids):
                    raise ValueError(f"sample {r}: {len(values)} log-probs for {len(sample.response_ids)} tokens")
                target[span] = torch.tensor(values, dtype=torch.float32)
        if routed:
            doc = document_routes(sample.routes, n)
            if routes is None:
                routes = torch.full((seq_length, *doc.shape[1:]), -1, dtype=torch.int16)
            routes[at : at + n] = doc
        at += n
        bounds.append(at)
    if at < seq_length:
        bounds.append(seq_length)
    return RLBatch(
        input_ids=ids,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=positions.expand(3, -1).clone(),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        response_index=index,
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        old_logp=old if all(s.old_logp is not None for s in samples) else None,
        rollout_logp=rollout if all(s.rollout_logp is not None for s in samples) else None,
        routes=routes,
    )
