"""DeepSeek Sparse Attention under context parallelism: local queries, keys of the whole (gathered) sequence.

A CP rank's queries come in segments (two chunks per document, see `kernels.context_attention`): segment i has
q_lengths[i] query rows whose keys are the global rows k_starts[i] .. k_starts[i] + k_lengths[i] - 1, the queries
being the last q_lengths[i] of them. Indices are global key positions, so `kernels.dsa.sparse_gqa_attention` runs
unchanged on (local q, global k, v). Shapes and conventions otherwise follow `kernels.dsa`.
"""

from __future__ import annotations

import torch

from kernels import dsa as dsa_ops
from kernels.dsa_reference import (
    DEFAULT_BUDGET_BYTES,
    _compute_dtype,
    attention_target,
    causal_span_indices,
    dense_attention_target,
    indexer_kl_chunk,
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


class _SegmentIndexerKL(torch.autograd.Function):
    """sum_t weight[t] * KL(p_t || softmax(I_t)) over local query rows; the reference's chunked KL
    (`kernels.dsa_reference._IndexerKL`, the same chunk step) with each row at its global position, keys from
    the global sequence."""

    @staticmethod
    def forward(
        ctx, index_q, index_w, index_k, attn_q, attn_k, segments, indices, weights, softmax_scale, tp_group, budget
    ):
        dtype = _compute_dtype(index_q)
        q, w, k = index_q.to(dtype), index_w.to(dtype), index_k.to(dtype)
        weights = weights.to(dtype)
        dq, dw, dk = torch.zeros_like(q), torch.zeros_like(w), torch.zeros_like(k)
        heads, d_index = q.shape[1], q.shape[2]
        per_key = (attn_q.shape[1] * 3 + heads * 3 + d_index + 8) * 8
        max_keys = None if indices is None else indices.shape[1]
        total = torch.zeros((), dtype=dtype, device=q.device)
        for key_start, r0, r1, p0 in segment_rows(*segments, per_key, budget, max_keys):
            p1 = p0 + (r1 - r0)
            if indices is None:
                key_idx = causal_span_indices(key_start, p0, p1, q.device)
                dense_keys = slice(key_start, p1)
                target = dense_attention_target(attn_q[r0:r1], attn_k[dense_keys], key_idx, softmax_scale, tp_group)
            else:
                key_idx, dense_keys = indices[r0:r1], None
                target = attention_target(attn_q, attn_k, 0, r0, r1, indices, softmax_scale, tp_group)
            grads = (dq, dw, dk)
            total += indexer_kl_chunk(q, w, k, grads, r0, r1, key_idx, dense_keys, target.to(dtype), weights[r0:r1])
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
