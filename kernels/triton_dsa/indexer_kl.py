"""Triton sparse-stage indexer KL: the target from the attention's own LSE, then the loss and its gradients.

1. `_sparse_target`: beside the attention, per query block and KV group (the union tiling of
   sparse_attention.py), p = exp(q.k * scale - lse) at each selected key, summed over the group's heads and
   added (fp32 atomics, one per KV group) at the key's slot in the query's own ascending index list. Rows are
   then L1-normalised (after an all-reduce over TP when the heads are split).
2. `_indexer_kl`: one program per query; two passes over its selected keys (the indexer's log-sum-exp, then
   KL(p || softmax(I)) with g = softmax(I) - p) give the loss row and d/dq, d/dw in registers and d/dk by
   fp32 atomics into [T, D_I]. Nothing larger than [T, k] is stored.
The dense warm-up KL (every causal key) runs the torch reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels import dsa_reference
from kernels.triton_dsa.precision import INDEXER_DOT_PRECISION, dot_precision
from kernels.triton_dsa.sparse_attention import LOG2E, tile_rows, union_tile
from kernels.triton_dsa.union import UNION_ALIGN, shared_union

ALIGN = tl.constexpr(UNION_ALIGN)


@triton.jit
def _sparse_target(
    Q,
    K,
    LSE,
    TARGET,
    UKEYS,
    UBITS,
    UOFF,
    T,
    scale_log2,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    st_t,
    G: tl.constexpr,
    BQ: tl.constexpr,
    D: tl.constexpr,
    BU: tl.constexpr,
    PREC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    heads = G * tl.num_programs(1)
    rows, query, head, row_ok, row_ptr = tile_rows(T, sq_t, sq_h, G, BQ, D)
    q = tl.load(Q + row_ptr, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + query.to(tl.int64) * heads + head, mask=row_ok, other=0.0) * 1.4426950408889634
    queries = b * BQ + tl.arange(0, BQ)
    filled = tl.zeros([BQ], tl.int32)  # slots already passed in each query's own list
    u_start = tl.multiple_of(tl.load(UOFF + b), ALIGN)
    u_end = tl.load(UOFF + b + 1)
    for u0 in range(u_start, u_end, BU):
        key, kt, s, member = union_tile(q, u0, UKEYS, UBITS, K, h, sk_t, sk_h, rows, row_ok, scale_log2, G, D, BU, PREC)
        p = tl.where(member, tl.exp2(s - lse2[:, None]), 0.0)
        p_sum = tl.sum(tl.reshape(p, (BQ, G, BU)), axis=1)
        bits = tl.load(UBITS + u0 + tl.arange(0, BU))
        mine = (((bits[None, :] >> tl.arange(0, BQ)[:, None]) & 1) != 0) & (queries < T)[:, None]
        slot = filled[:, None] + tl.cumsum(mine.to(tl.int32), 1) - 1
        tl.atomic_add(TARGET + queries[:, None].to(tl.int64) * st_t + slot, p_sum, mask=mine)
        filled += tl.sum(mine.to(tl.int32), 1)


@triton.jit
def _indexer_kl(
    IQ,
    IW,
    IK,
    IDX,
    TARGET,
    DQ,
    DW,
    DK,
    KL,
    scale,
    inv_rows,
    TOPK,
    sq_t,
    sq_h,
    sw_t,
    sk_t,
    si_t,
    H: tl.constexpr,
    HP: tl.constexpr,
    DI: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hr = tl.arange(0, HP)
    h_ok = hr < H
    d = tl.arange(0, DI)
    q = tl.load(IQ + t * sq_t + hr[:, None] * sq_h + d[None, :], mask=h_ok[:, None], other=0.0)
    w = tl.load(IW + t * sw_t + hr, mask=h_ok, other=0.0)
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    for j0 in range(0, TOPK, BK):  # pass 1: log-sum-exp of the indexer logits over the set
        j = j0 + tl.arange(0, BK)
        idx = tl.load(IDX + t * si_t + j, mask=j < TOPK, other=-1)
        ok = idx >= 0
        ks = tl.load(IK + idx[:, None].to(tl.int64) * sk_t + d[None, :], mask=ok[:, None], other=0.0)
        z = tl.dot(q, tl.trans(ks), input_precision=PREC) * scale
        logits = tl.where(ok, tl.sum(tl.maximum(z, 0.0) * w[:, None], 0), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe), 0)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    kl = tl.zeros([], tl.float32)
    dq = tl.zeros([HP, DI], tl.float32)
    dw = tl.zeros([HP], tl.float32)
    for j0 in range(0, TOPK, BK):  # pass 2: KL, g = softmax(I) - p, and the gradients
        j = j0 + tl.arange(0, BK)
        idx = tl.load(IDX + t * si_t + j, mask=j < TOPK, other=-1)
        ok = idx >= 0
        ks = tl.load(IK + idx[:, None].to(tl.int64) * sk_t + d[None, :], mask=ok[:, None], other=0.0)
        p = tl.load(TARGET + t * si_t + j, mask=ok, other=0.0)
        z = tl.dot(q, tl.trans(ks), input_precision=PREC) * scale
        relu = tl.maximum(z, 0.0)
        logq = tl.sum(relu * w[:, None], 0) - lse
        kl += tl.sum(tl.where(ok & (p > 0), p * (tl.log(tl.where(p > 0, p, 1.0)) - logq), 0.0), 0)
        g = tl.where(ok, tl.exp(logq) - p, 0.0) * inv_rows
        dw += tl.sum(relu * g[None, :], 1)
        dz = tl.where(z > 0, g[None, :] * w[:, None], 0.0) * scale
        dq += tl.dot(dz, ks, input_precision=PREC)
        dk = tl.dot(tl.trans(dz), q, input_precision=PREC)
        tl.atomic_add(DK + idx[:, None].to(tl.int64) * sk_t + d[None, :], dk, mask=ok[:, None])
    tl.store(DQ + t * sq_t + hr[:, None] * sq_h + d[None, :], dq, mask=h_ok[:, None])
    tl.store(DW + t * sw_t + hr, dw, mask=h_ok)
    tl.store(KL + t, kl)


def sparse_attention_target(attn_q, attn_k, attn_lse, indices, softmax_scale: float, tp_group=None):
    """[T, k] fp32: the head-summed attention probabilities at each selected key, L1-normalised per row."""
    total, heads, dim = attn_q.shape
    groups = attn_k.shape[1]
    bq, (keys, bits, offsets) = shared_union(indices, heads // groups)  # the attention's own, when it ran
    target = torch.zeros(indices.shape, dtype=torch.float32, device=attn_q.device)
    q, k, lse = attn_q.contiguous(), attn_k.contiguous(), attn_lse.float().contiguous()
    _sparse_target[(offsets.shape[0] - 1, groups)](
        q,
        k,
        lse,
        target,
        keys,
        bits,
        offsets,
        total,
        softmax_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        target.stride(0),
        G=heads // groups,
        BQ=bq,
        D=dim,
        BU=64,
        PREC=dot_precision(q.dtype),
    )
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(target, group=tp_group)
    return target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


class _TritonIndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, index_q, index_w, index_k, indices, target):
        total, heads, dim = index_q.shape
        q, w, k = (x.float().contiguous() for x in (index_q, index_w, index_k))
        dq, dw = torch.empty_like(q), torch.empty_like(w)
        dk = torch.zeros_like(k)
        kl = torch.empty(total, dtype=torch.float32, device=q.device)
        hp = max(16, 1 << (heads - 1).bit_length())
        _indexer_kl[(total,)](
            q,
            w,
            k,
            indices,
            target.contiguous(),
            dq,
            dw,
            dk,
            kl,
            dim**-0.5,
            1.0 / max(1, total),
            indices.shape[1],
            q.stride(0),
            q.stride(1),
            w.stride(0),
            k.stride(0),
            indices.stride(0),
            H=heads,
            HP=hp,
            DI=dim,
            BK=64,
            PREC=INDEXER_DOT_PRECISION,
        )
        ctx.save_for_backward(dq, dw, dk)
        ctx.dtypes = (index_q.dtype, index_w.dtype, index_k.dtype)
        return kl.sum() / max(1, total)

    @staticmethod
    def backward(ctx, grad):
        return (*[(g * grad).to(t) for g, t in zip(ctx.saved_tensors, ctx.dtypes)], None, None)


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
    **reference_options,
):
    """Triton twin of `kernels.dsa_reference.indexer_kl_loss`; the sparse stage runs here (the target from
    `attn_lse` when given, else from one more attention pass), the dense warm-up runs the reference."""
    dim = index_q.shape[-1]
    if indices is None or dim & (dim - 1) or dim < 16 or attn_q.shape[-1] & (attn_q.shape[-1] - 1):
        return dsa_reference.indexer_kl_loss(
            index_q,
            index_w,
            index_k,
            attn_q,
            attn_k,
            cu_seqlens,
            softmax_scale,
            indices=indices,
            tp_group=tp_group,
            **reference_options,
        )
    with torch.no_grad():
        if attn_lse is None:
            from kernels.triton_dsa.sparse_attention import sparse_gqa_attention

            _, attn_lse = sparse_gqa_attention(attn_q, attn_k, attn_k, indices, softmax_scale)
        target = sparse_attention_target(attn_q.detach(), attn_k.detach(), attn_lse, indices, softmax_scale, tp_group)
    return _TritonIndexerKL.apply(index_q, index_w, index_k, indices, target)
