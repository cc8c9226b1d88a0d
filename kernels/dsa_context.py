"""DeepSeek Sparse Attention under context parallelism: local queries, keys of the whole (gathered) sequence.

A CP rank's queries come in segments (two chunks per document, see `kernels.context_attention`): segment i has
q_lengths[i] query rows whose keys are the global rows k_starts[i] .. k_starts[i] + k_lengths[i] - 1, the queries
being the last q_lengths[i] of them. Indices are global key positions, so `kernels.dsa.sparse_gqa_attention` runs
unchanged on (local q, global k, v). Shapes and conventions otherwise follow `kernels.dsa`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels import dsa as dsa_ops
from kernels.dsa_reference import (
    DEFAULT_BUDGET_BYTES,
    _compute_dtype,
    _gather_rows,
    attention_target,
    causal_span_indices,
    kl_and_logit_grad,
)


def segment_rows(q_lengths, k_starts, k_lengths, bytes_per_row_key: int, budget_bytes: int, max_keys=None):
    """Yield (key_start, r0, r1, p0): local query rows r0:r1 of one segment, whose first row sits at global
    position p0, with a working set (rows x keys x bytes_per_row_key) inside the budget."""
    row0 = 0
    for n, start, m in zip(q_lengths, k_starts, k_lengths):
        first = start + m - n  # global position of the segment's first query
        span = m if max_keys is None else min(m, max_keys)
        rows = max(1, budget_bytes // max(1, span * bytes_per_row_key))
        for r in range(0, n, rows):
            yield start, row0 + r, row0 + min(n, r + rows), first + r
        row0 += n


@torch.no_grad()
def indexer_topk_segments(index_q, index_w, index_k, q_lengths, k_starts, k_lengths, topk: int, **options):
    """index_q [n, H_I, D_I], index_w [n, H_I] local; index_k [S, D_I] global -> [n, topk] int32 global key
    positions (ascending, -1 padded): the rows `kernels.dsa.indexer_topk` gives these queries on one rank."""
    out = torch.full((index_q.shape[0], topk), -1, dtype=torch.int32, device=index_q.device)
    row0 = 0
    for n, start, m in zip(q_lengths, k_starts, k_lengths):
        if n:
            rows = slice(row0, row0 + n)
            local = dsa_ops.indexer_topk_cached(
                index_q[rows], index_w[rows], index_k[start : start + m], m - n, topk, **options
            )
            out[rows] = torch.where(local >= 0, local + start, local)
        row0 += n
    return out


def _dense_target(attn_q, attn_k, key_idx, softmax_scale: float, tp_group) -> torch.Tensor:
    """Head-summed, L1-normalised dense attention of rows attn_q [R, Hq, D] over keys attn_k [K, Hkv, D], the
    visible ones key_idx >= 0 ([R, K]); all-reduced over `tp_group` when the heads are split."""
    rows, dim = attn_q.shape[0], attn_q.shape[2]
    groups = attn_k.shape[1]
    dtype = _compute_dtype(attn_q)
    q4 = attn_q.to(dtype).view(rows, groups, -1, dim)
    s = torch.einsum("rhgd,khd->rhgk", q4, attn_k.to(dtype)) * softmax_scale
    s = s.masked_fill(key_idx[:, None, None, :] < 0, float("-inf"))
    probs = torch.softmax(s, dim=-1).nan_to_num(0.0).sum(dim=(1, 2))
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(probs, group=tp_group)
    return probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


class _SegmentIndexerKL(torch.autograd.Function):
    """sum_t weight[t] * KL(p_t || softmax(I_t)) over local query rows; the reference's chunked KL
    (`kernels.dsa_reference._IndexerKL`) with each row at its global position, keys from the global sequence."""

    @staticmethod
    def forward(
        ctx, index_q, index_w, index_k, attn_q, attn_k, segments, indices, weights, softmax_scale, tp_group, budget
    ):
        dtype = _compute_dtype(index_q)
        q, w, k = index_q.to(dtype), index_w.to(dtype), index_k.to(dtype)
        weights = weights.to(dtype)
        dq, dw, dk = torch.zeros_like(q), torch.zeros_like(w), torch.zeros_like(k)
        heads, d_index = q.shape[1], q.shape[2]
        scale = d_index**-0.5
        per_key = (attn_q.shape[1] * 3 + heads * 3 + d_index + 8) * 8
        max_keys = None if indices is None else indices.shape[1]
        total = torch.zeros((), dtype=dtype, device=q.device)
        for key_start, r0, r1, p0 in segment_rows(*segments, per_key, budget, max_keys):
            p1 = p0 + (r1 - r0)
            if indices is None:
                key_idx = causal_span_indices(key_start, p0, p1, q.device)
                keys = k[key_start:p1]
                target = _dense_target(attn_q[r0:r1], attn_k[key_start:p1], key_idx, softmax_scale, tp_group)
            else:
                key_idx = indices[r0:r1]
                keys = _gather_rows(k, key_idx)
                target = attention_target(attn_q, attn_k, 0, r0, r1, indices, softmax_scale, tp_group)
            valid = key_idx >= 0
            sub = "rjd,sd->rjs" if indices is None else "rjd,rsd->rjs"
            z = torch.einsum(sub, q[r0:r1], keys) * scale
            logits = torch.einsum("rj,rjs->rs", w[r0:r1], torch.relu(z))
            kl, g = kl_and_logit_grad(logits, target.to(dtype), valid)
            row_weight = weights[r0:r1]
            total += (kl * row_weight).sum()
            g = g * row_weight[:, None]
            dw[r0:r1] = torch.einsum("rs,rjs->rj", g, torch.relu(z))
            dz = g[:, None, :] * w[r0:r1, :, None] * (z > 0) * scale
            dq[r0:r1] = torch.einsum("rjs,sd->rjd" if indices is None else "rjs,rsd->rjd", dz, keys)
            if indices is None:
                dk[key_start:p1] += torch.einsum("rjs,rjd->sd", dz, q[r0:r1])
            else:
                dkeys = torch.einsum("rjs,rjd->rsd", dz, q[r0:r1])
                dk.index_add_(0, key_idx.clamp(min=0).long().reshape(-1), dkeys.reshape(-1, d_index))
        ctx.save_for_backward(dq, dw, dk)
        ctx.dtypes = (index_q.dtype, index_w.dtype, index_k.dtype)
        return total.float() if dtype != torch.float64 else total

    @staticmethod
    def backward(ctx, grad):
        dq, dw, dk = ctx.saved_tensors
        grads = [(g * grad.to(g.dtype)).to(t) for g, t in zip((dq, dw, dk), ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None)


def indexer_kl_segments(
    index_q,
    index_w,
    index_k,
    attn_q,
    attn_k,
    q_lengths,
    k_starts,
    k_lengths,
    weights,
    softmax_scale: float,
    indices=None,
    tp_group=None,
    budget_bytes: int | None = None,
) -> torch.Tensor:
    """sum over local rows t of weights[t] * KL(p_t || softmax(I_t)), p_t and I_t over the causal in-document keys
    of t's global position (warm-up, indices None) or over its selected set (sparse stage, global `indices`).
    index_q, index_w, attn_q, weights: local rows; index_k, attn_k: the global sequence. Differentiable in
    index_q, index_w, index_k only."""
    segments = (list(q_lengths), list(k_starts), list(k_lengths))
    return _SegmentIndexerKL.apply(
        index_q,
        index_w,
        index_k,
        attn_q.detach(),
        attn_k.detach(),
        segments,
        indices,
        weights,
        softmax_scale,
        tp_group,
        budget_bytes or DEFAULT_BUDGET_BYTES,
    )
