"""Pure-torch reference of DeepSeek Sparse Attention on GQA: exact, chunked, memory-bounded.

Every function walks query rows in chunks whose size comes from a byte budget, so nothing of size L x L is
ever allocated; a chunk never crosses a document of the packed sequence. Shapes and dtypes are documented in
`kernels.dsa`, the dispatching API. Arithmetic runs in fp32 (or float64 when the inputs are float64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_BUDGET_BYTES = 256 << 20


def memory_budget(device) -> int:
    """Working-set budget of one chunk when none is given: 30% of the free GPU memory (the share KSGL's indexer
    leaves to its logits), or DEFAULT_BUDGET_BYTES on the CPU."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(DEFAULT_BUDGET_BYTES // 4, int(0.3 * free))
    return DEFAULT_BUDGET_BYTES


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_chunks(cu_seqlens: torch.Tensor, bytes_per_row_key: int, budget_bytes: int, max_keys: int | None = None):
    """Yield (doc_start, row_start, row_end): query rows of one document whose working set
    (rows x keys x bytes_per_row_key, keys = the longest row's key span, capped by max_keys) fits the budget."""
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        row = start
        while row < end:
            span = end - start if max_keys is None else min(end - start, max_keys)
            rows = max(1, budget_bytes // max(1, span * bytes_per_row_key))
            yield start, row, min(end, row + rows)
            row += rows


def causal_mask(doc_start: int, row_start: int, row_end: int, device) -> torch.Tensor:
    """[rows, row_end - doc_start] bool: key s is visible to query row r (same document, s <= r)."""
    return (
        torch.arange(doc_start, row_end, device=device)[None, :]
        <= torch.arange(row_start, row_end, device=device)[:, None]
    )


def causal_span_indices(doc_start: int, row_start: int, row_end: int, device) -> torch.Tensor:
    """[rows, row_end - doc_start] key positions of the causal in-document set of each row, -1 beyond it."""
    keys = torch.arange(doc_start, row_end, device=device)
    rows = torch.arange(row_start, row_end, device=device)[:, None]
    return torch.where(keys[None, :] <= rows, keys[None, :], torch.full_like(keys[None, :], -1))


# ---- lightning indexer and exact top-k -------------------------------------------------------------------------


def indexer_logits(index_q: torch.Tensor, index_w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """I[r, s] = sum_j w[r, j] * ReLU(q[r, j] . k[s]) * D_I^-1/2, one head at a time (no [R, H_I, S] tensor).

    index_q [R, H_I, D_I], index_w [R, H_I], keys [S, D_I] (shared) or [R, S, D_I] (per row) -> [R, S]."""
    scale = index_q.shape[-1] ** -0.5
    logits = None
    for j in range(index_q.shape[1]):
        z = index_q[:, j] @ keys.T if keys.dim() == 2 else torch.einsum("rd,rsd->rs", index_q[:, j], keys)
        term = torch.relu_(z).mul_(index_w[:, j, None])
        logits = term if logits is None else logits.add_(term)
    return logits.mul_(scale)


def select_topk(scores: torch.Tensor, valid: torch.Tensor, topk: int) -> torch.Tensor:
    """Boolean [R, S] selection of the `topk` largest valid scores per row; all valid ones when fewer.

    Ties at the threshold go to the lowest column, so the set is a pure function of the scores."""
    if scores.shape[1] <= topk:
        return valid.clone()
    masked = scores.masked_fill(~valid, float("-inf"))
    kth = torch.topk(masked, topk, dim=1, sorted=True).values[:, -1:]
    above = (masked > kth) & valid
    at = (masked == kth) & valid
    room = topk - above.sum(1, keepdim=True)
    chosen = above | (at & (torch.cumsum(at, dim=1, dtype=torch.int32) <= room))
    few = valid.sum(1, keepdim=True) <= topk
    return torch.where(few, valid, chosen)


def selection_positions(selected: torch.Tensor, first_key: int, topk: int) -> torch.Tensor:
    """Ascending key positions of the selected columns, [R, topk] int32, padded with -1."""
    span = selected.shape[1]
    cols = torch.arange(span, device=selected.device, dtype=torch.int32).expand_as(selected)
    sentinel = torch.full_like(cols, span)
    ordered = torch.sort(torch.where(selected, cols, sentinel), dim=1).values[:, :topk]
    out = torch.where(ordered < span, ordered + first_key, torch.full_like(ordered, -1)).to(torch.int32)
    if out.shape[1] < topk:
        out = torch.cat([out, out.new_full((out.shape[0], topk - out.shape[1]), -1)], dim=1)
    return out


@torch.no_grad()
def indexer_topk(index_q, index_w, index_k, cu_seqlens, topk: int, budget_bytes: int | None = None):
    """Top-k keys of every query under the causal and document masks; [T, topk] int32, ascending, -1 padded."""
    total = index_q.shape[0]
    dtype = _compute_dtype(index_q)
    q, w, k = index_q.to(dtype), index_w.to(dtype), index_k.to(dtype)
    out = torch.full((total, topk), -1, dtype=torch.int32, device=index_q.device)
    per_key = 40  # fp32 logits, one head's term and the masked copy, int32 ranks and sort keys, sort indices
    for doc_start, r0, r1 in row_chunks(cu_seqlens, per_key, budget_bytes or memory_budget(q.device)):
        valid = causal_mask(doc_start, r0, r1, q.device)
        if r1 - doc_start <= topk:  # every visible key is taken: no scores needed
            out[r0:r1] = selection_positions(valid, doc_start, topk)
            continue
        scores = indexer_logits(q[r0:r1], w[r0:r1], k[doc_start:r1])
        out[r0:r1] = selection_positions(select_topk(scores, valid, topk), doc_start, topk)
    return out


@torch.no_grad()
def indexer_topk_cached(index_q, index_w, index_k, first_position: int, topk: int, budget_bytes: int | None = None):
    """Chunked prefill / decode: queries at positions first_position .. first_position + n - 1 of one sequence,
    keys index_k [first_position + n, D_I] from the cache. -> [n, topk] int32, as `indexer_topk` rows."""
    rows, end = index_q.shape[0], first_position + index_q.shape[0]
    dtype = _compute_dtype(index_q)
    q, w, k = index_q.to(dtype), index_w.to(dtype), index_k[:end].to(dtype)
    out = torch.full((rows, topk), -1, dtype=torch.int32, device=index_q.device)
    step = max(1, (budget_bytes or memory_budget(index_q.device)) // (40 * end))
    for r0 in range(first_position, end, step):
        r1 = min(end, r0 + step)
        valid = causal_mask(0, r0, r1, q.device)
        scores = indexer_logits(
            q[r0 - first_position : r1 - first_position], w[r0 - first_position : r1 - first_position], k[:r1]
        )
        out[r0 - first_position : r1 - first_position] = selection_positions(select_topk(scores, valid, topk), 0, topk)
    return out


# ---- sparse GQA attention ----------------------------------------------------------------------------------------


def _gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [T, ...] at indices [R, K] (-1 -> row 0, masked by the caller) -> [R, K, ...]."""
    return x[indices.clamp(min=0).long()]


def _set_scores(q, k_sel, valid, scale):
    """q [R, Hkv, G, D], k_sel [R, K, Hkv, D] -> masked scores [R, Hkv, G, K]."""
    s = torch.einsum("rhgd,rkhd->rhgk", q, k_sel) * scale
    return s.masked_fill(~valid[:, None, None, :], float("-inf"))


class _SparseGQAAttention(torch.autograd.Function):
    """Chunked forward; the backward recomputes each chunk's probabilities from the saved LSE (flash-style)."""

    @staticmethod
    def forward(ctx, q, k, v, indices, scale, budget_bytes):
        total, heads, dim = q.shape
        groups = k.shape[1]
        dtype = _compute_dtype(q, k, v)
        qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
        out = torch.zeros(total, heads, dim, dtype=dtype, device=q.device)
        lse = torch.full((total, heads), float("-inf"), dtype=dtype, device=q.device)
        for r0, r1 in _query_chunks(total, indices.shape[1], groups, heads, dim, budget_bytes):
            idx = indices[r0:r1]
            valid = idx >= 0
            s = _set_scores(qc[r0:r1].view(r1 - r0, groups, -1, dim), _gather_rows(kc, idx), valid, scale)
            chunk_lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - chunk_lse[..., None]).nan_to_num(0.0)
            out[r0:r1] = torch.einsum("rhgk,rkhd->rhgd", p, _gather_rows(vc, idx)).reshape(r1 - r0, heads, dim)
            lse[r0:r1] = chunk_lse.reshape(r1 - r0, heads)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.scale, ctx.budget_bytes = scale, budget_bytes
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse.float() if dtype != torch.float64 else lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, indices, out, lse = ctx.saved_tensors
        total, heads, dim = q.shape
        groups = k.shape[1]
        dtype = out.dtype
        qc, kc, vc, do = q.to(dtype), k.to(dtype), v.to(dtype), grad_out.to(dtype)
        dq = torch.zeros_like(qc)
        dk = torch.zeros_like(kc)
        dv = torch.zeros_like(vc)
        for r0, r1 in _query_chunks(total, indices.shape[1], groups, heads, dim, ctx.budget_bytes):
            rows = r1 - r0
            idx = indices[r0:r1]
            valid = idx >= 0
            flat = idx.clamp(min=0).long().reshape(-1)
            q4 = qc[r0:r1].view(rows, groups, -1, dim)
            k_sel, v_sel = _gather_rows(kc, idx), _gather_rows(vc, idx)
            s = _set_scores(q4, k_sel, valid, ctx.scale)
            p = torch.exp(s - lse[r0:r1].view(rows, groups, -1)[..., None]).nan_to_num(0.0)
            do4 = do[r0:r1].view(rows, groups, -1, dim)
            dv.index_add_(0, flat, torch.einsum("rhgk,rhgd->rkhd", p, do4).reshape(-1, groups, dim))
            dp = torch.einsum("rhgd,rkhd->rhgk", do4, v_sel)
            delta = (do4 * out[r0:r1].view(rows, groups, -1, dim)).sum(-1, keepdim=True)
            ds = p * (dp - delta) * ctx.scale
            dq[r0:r1] = torch.einsum("rhgk,rkhd->rhgd", ds, k_sel).reshape(rows, heads, dim)
            dk.index_add_(0, flat, torch.einsum("rhgk,rhgd->rkhd", ds, q4).reshape(-1, groups, dim))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _query_chunks(total: int, topk: int, groups: int, heads: int, dim: int, budget_bytes: int):
    per_row = topk * (2 * groups * dim + 3 * heads) * 8
    rows = max(1, budget_bytes // per_row)
    for r0 in range(0, total, rows):
        yield r0, min(total, r0 + rows)


def sparse_gqa_attention(q, k, v, indices, softmax_scale: float, budget_bytes: int = DEFAULT_BUDGET_BYTES):
    """Each query attends, in every KV group, to the key rows listed in its shared index set."""
    return _SparseGQAAttention.apply(q, k, v, indices, softmax_scale, budget_bytes)


# ---- the indexer's KL loss --------------------------------------------------------------------------------------


@torch.no_grad()
def attention_target(
    attn_q, attn_k, doc_start: int, r0: int, r1: int, indices, softmax_scale: float, tp_group=None
) -> torch.Tensor:
    """Head-summed, L1-normalised attention probabilities of rows r0:r1 over their key set, [R, K].

    The key set is `indices[r0:r1]` (sparse stage; probabilities renormalised on it) or, when indices is None,
    every causal key of the document (dense warm-up). Under TP the head sums are all-reduced over `tp_group`."""
    if indices is None:
        key_idx = causal_span_indices(doc_start, r0, r1, attn_q.device)
        return dense_attention_target(attn_q[r0:r1], attn_k[doc_start:r1], key_idx, softmax_scale, tp_group)
    rows, dim = r1 - r0, attn_q.shape[2]
    dtype = _compute_dtype(attn_q)
    q4 = attn_q[r0:r1].to(dtype).view(rows, attn_k.shape[1], -1, dim)
    key_idx = indices[r0:r1]
    s = _set_scores(q4, _gather_rows(attn_k.to(dtype), key_idx), key_idx >= 0, softmax_scale)
    return _head_summed(torch.softmax(s, dim=-1), tp_group, dtype)


@torch.no_grad()
def dense_attention_target(attn_q, attn_k, key_idx, softmax_scale: float, tp_group=None) -> torch.Tensor:
    """Head-summed, L1-normalised dense attention of rows attn_q [R, Hq, D] over keys attn_k [K, Hkv, D], the
    visible ones key_idx >= 0 ([R, K]); all-reduced over `tp_group` when the heads are split."""
    rows, dim = attn_q.shape[0], attn_q.shape[2]
    dtype = _compute_dtype(attn_q)
    q4 = attn_q.to(dtype).view(rows, attn_k.shape[1], -1, dim)
    s = torch.einsum("rhgd,khd->rhgk", q4, attn_k.to(dtype)) * softmax_scale
    s = s.masked_fill(key_idx[:, None, None, :] < 0, float("-inf"))
    return _head_summed(torch.softmax(s, dim=-1), tp_group, dtype)


def _head_summed(probs, tp_group, dtype) -> torch.Tensor:
    probs = probs.nan_to_num(0.0).sum(dim=(1, 2))
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(probs, group=tp_group)
    return probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def kl_and_logit_grad(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
    """Per-row KL(target || softmax(logits)) over the valid columns, and its gradient in the logits,
    softmax(logits) - target. Unclipped log-softmax; target zeros contribute nothing."""
    logq = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    logq = logq.masked_fill(~valid, 0.0)
    plogp = torch.where(target > 0, target * torch.log(target.clamp_min(torch.finfo(target.dtype).tiny)), 0.0)
    kl = (plogp - target * logq).sum(-1)
    grad = torch.where(valid, torch.exp(logq) - target, 0.0)
    return kl, grad


def indexer_kl_chunk(q, w, k, grads, r0: int, r1: int, key_idx, dense_keys: slice | None, target, row_weight=None):
    """One chunk of the indexer KL: rows r0:r1 of q [T, H, d] / w [T, H] against their keys in k, the contiguous
    `k[dense_keys]` (dense warm-up; key_idx [R, K] marks the hidden ones < 0) or the gathered `k[key_idx]`
    (sparse stage). Adds the chunk's gradients into grads = (dq, dw, dk); returns the sum over its rows of
    row_weight * KL(target || softmax(I)) (weight 1 when None)."""
    dq, dw, dk = grads
    scale = q.shape[2] ** -0.5
    dense = dense_keys is not None
    keys = k[dense_keys] if dense else _gather_rows(k, key_idx)
    z = torch.einsum("rjd,sd->rjs" if dense else "rjd,rsd->rjs", q[r0:r1], keys) * scale
    logits = torch.einsum("rj,rjs->rs", w[r0:r1], torch.relu(z))
    kl, g = kl_and_logit_grad(logits, target, key_idx >= 0)
    if row_weight is not None:
        kl, g = kl * row_weight, g * row_weight[:, None]
    dw[r0:r1] = torch.einsum("rs,rjs->rj", g, torch.relu(z))
    dz = g[:, None, :] * w[r0:r1, :, None] * (z > 0) * scale
    dq[r0:r1] = torch.einsum("rjs,sd->rjd" if dense else "rjs,rsd->rjd", dz, keys)
    if dense:
        dk[dense_keys] += torch.einsum("rjs,rjd->sd", dz, q[r0:r1])
    else:
        dkeys = torch.einsum("rjs,rjd->rsd", dz, q[r0:r1])
        dk.index_add_(0, key_idx.clamp(min=0).long().reshape(-1), dkeys.reshape(-1, q.shape[2]))
    return kl.sum()


class _IndexerKL(torch.autograd.Function):
    """Mean over query rows of KL(p_t || softmax(I_t)); gradients are formed chunk by chunk in the forward
    (they need the same scores) and scaled in the backward, so no L x L tensor is ever held."""

    @staticmethod
    def forward(
        ctx, index_q, index_w, index_k, attn_q, attn_k, cu_seqlens, indices, softmax_scale, tp_group, budget_bytes
    ):
        dtype = _compute_dtype(index_q)
        q, w, k = index_q.to(dtype), index_w.to(dtype), index_k.to(dtype)
        dq, dw, dk = torch.zeros_like(q), torch.zeros_like(w), torch.zeros_like(k)
        heads, d_index = q.shape[1], q.shape[2]
        per_key = (attn_q.shape[1] * 3 + heads * 3 + d_index + 8) * 8
        max_keys = None if indices is None else indices.shape[1]
        total_kl = torch.zeros((), dtype=dtype, device=q.device)
        for doc_start, r0, r1 in row_chunks(cu_seqlens, per_key, budget_bytes, max_keys):
            key_idx = causal_span_indices(doc_start, r0, r1, q.device) if indices is None else indices[r0:r1]
            target = attention_target(attn_q, attn_k, doc_start, r0, r1, indices, softmax_scale, tp_group).to(dtype)
            dense_keys = slice(doc_start, r1) if indices is None else None
            total_kl += indexer_kl_chunk(q, w, k, (dq, dw, dk), r0, r1, key_idx, dense_keys, target)
        rows = max(1, q.shape[0])
        ctx.save_for_backward(dq / rows, dw / rows, dk / rows)
        ctx.dtypes = (index_q.dtype, index_w.dtype, index_k.dtype)
        return (total_kl / rows).float() if dtype != torch.float64 else total_kl / rows

    @staticmethod
    def backward(ctx, grad):
        dq, dw, dk = ctx.saved_tensors
        grads = [(g * grad.to(g.dtype)).to(t) for g, t in zip((dq, dw, dk), ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None)


def indexer_kl_loss(
    index_q,
    index_w,
    index_k,
    attn_q,
    attn_k,
    cu_seqlens,
    softmax_scale: float,
    indices=None,
    tp_group=None,
    attn_lse=None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> torch.Tensor:
    """Mean over query rows of KL(p_t || softmax(I_t)); differentiable in index_q, index_w, index_k only.
    attn_lse is not needed here: the softmax over the key set is recomputed exactly, chunk by chunk."""
    return _IndexerKL.apply(
        index_q,
        index_w,
        index_k,
        attn_q.detach(),
        attn_k.detach(),
        cu_seqlens,
        indices,
        softmax_scale,
        tp_group,
        budget_bytes,
    )
