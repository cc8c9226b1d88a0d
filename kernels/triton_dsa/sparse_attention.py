"""Triton sparse GQA attention over shared top-k sets, forward and backward, with query-block union tiling.

One program handles BQ consecutive queries x the G query heads of one KV group: a [BQ * G, D] tile of queries
against chunks of the block's key union (kernels/triton_dsa/union.py), with each row masked to its own query's set.
Online softmax in base 2; the LSE is returned in natural log like the torch reference.

Backward: dq stays in registers (one program owns its rows); dk and dv are scattered with fp32 atomics into
[T, Hkv, D] buffers, so their summation order, and the last bits of dk/dv, vary between runs (each key gets one
atomic add per query block that selected it; fp32 accumulation keeps the run-to-run spread near 1e-7 relative
before the cast to the input dtype). dq, out and lse are deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_dsa.precision import dot_precision
from kernels.triton_dsa.union import block_union, choose_block

LOG2E = 1.0 / math.log(2.0)


@triton.jit
def union_tile(
    q,
    u0,
    u_end,
    UKEYS,
    UBITS,
    K,
    h,
    sk_t,
    sk_h,
    rows,
    row_ok,
    scale_log2,
    G: tl.constexpr,
    D: tl.constexpr,
    BU: tl.constexpr,
    PREC: tl.constexpr,
):
    """The union chunk at u0: its keys, their validity, the gathered K rows [BU, D], the tile's base-2 scores
    [M, BU] and each row's membership mask (its own query selected the key)."""
    u = u0 + tl.arange(0, BU)
    u_ok = u < u_end
    key = tl.load(UKEYS + u, mask=u_ok, other=0)
    bits = tl.load(UBITS + u, mask=u_ok, other=0)
    d = tl.arange(0, D)
    kt = tl.load(K + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :], mask=u_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
    member = (((bits[None, :] >> (rows // G)[:, None]) & 1) != 0) & u_ok[None, :] & row_ok[:, None]
    return key, u_ok, kt, s, member


@triton.jit
def tile_rows(T, sq_t, sq_h, G: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr):
    """This program's rows: BQ queries x the G heads of KV group program_id(1); their offsets in a [T, Hq, D]
    tensor, query index, head index and validity."""
    rows = tl.arange(0, BQ * G)
    query = tl.program_id(0) * BQ + rows // G
    head = tl.program_id(1) * G + rows % G
    row_ptr = query[:, None].to(tl.int64) * sq_t + head[:, None] * sq_h + tl.arange(0, D)[None, :]
    return rows, query, head, query < T, row_ptr


@triton.jit
def _sparse_fwd(
    Q,
    K,
    V,
    OUT,
    LSE,
    UKEYS,
    UBITS,
    UOFF,
    T,
    scale_log2,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    G: tl.constexpr,
    BQ: tl.constexpr,
    D: tl.constexpr,
    BU: tl.constexpr,
    PREC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    M: tl.constexpr = BQ * G
    rows, query, head, row_ok, row_ptr = tile_rows(T, sq_t, sq_h, G, BQ, D)
    d = tl.arange(0, D)
    q = tl.load(Q + row_ptr, mask=row_ok[:, None], other=0.0)
    u_start = tl.load(UOFF + b)
    u_end = tl.load(UOFF + b + 1)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for u0 in range(u_start, u_end, BU):  # a runtime-bounded walk over this block's union (pipelined)
        key, u_ok, kt, s, member = union_tile(
            q, u0, u_end, UKEYS, UBITS, K, h, sk_t, sk_h, rows, row_ok, scale_log2, G, D, BU, PREC
        )
        s = tl.where(member, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :], mask=u_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(OUT + row_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])  # OUT is laid out like Q
    heads = G * tl.num_programs(1)
    tl.store(LSE + query.to(tl.int64) * heads + head, lse, mask=row_ok)


@triton.jit
def _sparse_bwd(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DK,
    DV,
    UKEYS,
    UBITS,
    UOFF,
    T,
    scale,
    scale_log2,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sacc_t,
    sacc_h,
    G: tl.constexpr,
    BQ: tl.constexpr,
    D: tl.constexpr,
    BU: tl.constexpr,
    PREC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    heads = G * tl.num_programs(1)
    M: tl.constexpr = BQ * G
    rows, query, head, row_ok, row_ptr = tile_rows(T, sq_t, sq_h, G, BQ, D)
    d = tl.arange(0, D)
    q = tl.load(Q + row_ptr, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + row_ptr, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + query.to(tl.int64) * heads + head, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + query.to(tl.int64) * heads + head, mask=row_ok, other=0.0)
    dq = tl.zeros([M, D], tl.float32)
    u_start = tl.load(UOFF + b)
    u_end = tl.load(UOFF + b + 1)
    for u0 in range(u_start, u_end, BU):  # a runtime-bounded walk over this block's union (pipelined)
        key, u_ok, kt, s, member = union_tile(
            q, u0, u_end, UKEYS, UBITS, K, h, sk_t, sk_h, rows, row_ok, scale_log2, G, D, BU, PREC
        )
        p = tl.where(member, tl.exp2(s - lse2[:, None]), 0.0)
        vt = tl.load(V + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :], mask=u_ok[:, None], other=0.0)
        acc_ptr = key[:, None].to(tl.int64) * sacc_t + h * sacc_h + d[None, :]
        tl.atomic_add(DV + acc_ptr, tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC), mask=u_ok[:, None])
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
        tl.atomic_add(DK + acc_ptr, tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC), mask=u_ok[:, None])
    tl.store(DQ + row_ptr, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _block_queries(groups: int) -> int:
    """Queries per tile: 128 MMA rows when the group is small enough, at least 16 rows for tl.dot."""
    return max(-(-16 // groups), min(16, max(1, 128 // groups)))


def block_queries_for(indices: torch.Tensor, groups: int) -> int:
    """The union tile's query count for these sets: 128 rows when neighbours overlap, else 16 (union.py)."""
    return choose_block(indices, smallest=-(-16 // groups), largest=_block_queries(groups))


def _launch_options(rows: int, block_keys: int | None, num_warps: int | None) -> tuple[tuple, tuple]:
    """(keys per chunk, warps) for the forward and the backward; unset ones take the H200 optimum measured in
    benchmarks/results/dsa_parts_h200.json: 128-row tiles run the backward on 8 warps, 16-row tiles on 4 warps
    over 32-key chunks."""
    forward = (block_keys or 64, num_warps or 4)
    backward = (block_keys or (64 if rows >= 64 else 32), num_warps or (8 if rows >= 64 else 4))
    return forward, backward


def _check(q, k, v, indices):
    total, heads, dim = q.shape
    if k.shape != v.shape or k.shape[0] != total or heads % k.shape[1]:
        raise ValueError(
            f"sparse_gqa_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are "
            "not [T, Hq, D], [T, Hkv, D] with Hq % Hkv == 0"
        )
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"sparse_gqa_attention (triton): head dim {dim} must be a power of two >= 16")
    if indices.dtype != torch.int32 or indices.shape[0] != total:
        raise ValueError("sparse_gqa_attention: indices must be int32 [T, topk]")


class _TritonSparseGQA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, softmax_scale, block_keys, block_queries, num_warps):
        _check(q, k, v, indices)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        total, heads, dim = q.shape
        groups = k.shape[1]
        per_group = heads // groups
        bq = block_queries or block_queries_for(indices, per_group)
        keys, bits, offsets = block_union(indices, bq)
        (fwd_keys, fwd_warps), ctx.backward_options = _launch_options(bq * per_group, block_keys, num_warps)
        out = torch.empty_like(q)
        lse = torch.empty(total, heads, dtype=torch.float32, device=q.device)
        grid = (offsets.shape[0] - 1, groups)
        _sparse_fwd[grid](
            q,
            k,
            v,
            out,
            lse,
            keys,
            bits,
            offsets,
            total,
            softmax_scale * LOG2E,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            G=per_group,
            BQ=bq,
            D=dim,
            BU=fwd_keys,
            PREC=dot_precision(q.dtype),
            num_warps=fwd_warps,
        )
        ctx.save_for_backward(q, k, v, out, lse, keys, bits, offsets)
        ctx.scale, ctx.bq = softmax_scale, bq
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, keys, bits, offsets = ctx.saved_tensors
        total, heads, dim = q.shape
        groups = k.shape[1]
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        grid = (offsets.shape[0] - 1, groups)
        bwd_keys, bwd_warps = ctx.backward_options
        _sparse_bwd[grid](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            dq,
            dk,
            dv,
            keys,
            bits,
            offsets,
            total,
            ctx.scale,
            ctx.scale * LOG2E,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            dk.stride(0),
            dk.stride(1),
            G=heads // groups,
            BQ=ctx.bq,
            D=dim,
            BU=bwd_keys,
            PREC=dot_precision(q.dtype),
            num_warps=bwd_warps,
        )
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def sparse_gqa_attention(
    q,
    k,
    v,
    indices,
    softmax_scale: float,
    block_keys: int | None = None,
    block_queries: int | None = None,
    num_warps: int | None = None,
    **_reference_options,
):
    """Triton twin of `kernels.dsa_reference.sparse_gqa_attention` (same shapes, dtypes and semantics).
    Tile overrides (default: block_queries from the sets' overlap, union.choose_block; the rest from
    `_launch_options`): block_keys and num_warps apply to forward and backward alike."""
    return _TritonSparseGQA.apply(q, k, v, indices, softmax_scale, block_keys, block_queries, num_warps)
