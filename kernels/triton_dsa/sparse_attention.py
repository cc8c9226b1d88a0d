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
from kernels.triton_dsa.union import UNION_ALIGN, block_union, shared_union

LOG2E = 1.0 / math.log(2.0)
ALIGN = tl.constexpr(UNION_ALIGN)


@triton.jit
def union_tile(
    q,
    u0,
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
    """The union chunk at u0: its keys, the gathered K rows [BU, D], the tile's base-2 scores [M, BU] and each
    row's membership mask (its own query selected the key). Unions are padded to whole chunks (UNION_ALIGN),
    so no load needs a bounds mask; padding keys belong to no query."""
    u = u0 + tl.arange(0, BU)
    key = tl.load(UKEYS + u)
    bits = tl.load(UBITS + u)
    d = tl.arange(0, D)
    kt = tl.load(K + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :])
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
    member = (((bits[None, :] >> (rows // G)[:, None]) & 1) != 0) & row_ok[:, None]
    return key, kt, s, member


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
def backward_rows(Q, DO, LSE, DELTA, T, sq_t, sq_h, G: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr):
    """A backward tile's rows (tile_rows) with their q, dout, base-2 LSE and delta = rowsum(dout * out)."""
    heads = G * tl.num_programs(1)
    rows, query, head, row_ok, row_ptr = tile_rows(T, sq_t, sq_h, G, BQ, D)
    q = tl.load(Q + row_ptr, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + row_ptr, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + query.to(tl.int64) * heads + head, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + query.to(tl.int64) * heads + head, mask=row_ok, other=0.0)
    return rows, row_ok, row_ptr, q, do, lse2, delta


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
    u_start = tl.multiple_of(tl.load(UOFF + b), ALIGN)
    u_end = tl.load(UOFF + b + 1)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for u0 in range(u_start, u_end, BU):  # a runtime-bounded walk over this block's union (pipelined)
        key, kt, s, member = union_tile(q, u0, UKEYS, UBITS, K, h, sk_t, sk_h, rows, row_ok, scale_log2, G, D, BU, PREC)
        s = tl.where(member, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :])
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
    M: tl.constexpr = BQ * G
    rows, row_ok, row_ptr, q, do, lse2, delta = backward_rows(Q, DO, LSE, DELTA, T, sq_t, sq_h, G, BQ, D)
    d = tl.arange(0, D)
    dq = tl.zeros([M, D], tl.float32)
    u_start = tl.multiple_of(tl.load(UOFF + b), ALIGN)
    u_end = tl.load(UOFF + b + 1)
    for u0 in range(u_start, u_end, BU):  # a runtime-bounded walk over this block's union (pipelined)
        key, kt, s, member = union_tile(q, u0, UKEYS, UBITS, K, h, sk_t, sk_h, rows, row_ok, scale_log2, G, D, BU, PREC)
        p = tl.where(member, tl.exp2(s - lse2[:, None]), 0.0)
        vt = tl.load(V + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :])
        acc_ptr = key[:, None].to(tl.int64) * sacc_t + h * sacc_h + d[None, :]
        tl.atomic_add(DV + acc_ptr, tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC))
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
        tl.atomic_add(DK + acc_ptr, tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC))
    tl.store(DQ + row_ptr, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sparse_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
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
    G: tl.constexpr,
    BQ: tl.constexpr,
    D: tl.constexpr,
    BU: tl.constexpr,
    PREC: tl.constexpr,
):
    """Split backward, pass 1: dq only, in registers; no atomics."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    M: tl.constexpr = BQ * G
    rows, row_ok, row_ptr, q, do, lse2, delta = backward_rows(Q, DO, LSE, DELTA, T, sq_t, sq_h, G, BQ, D)
    d = tl.arange(0, D)
    dq = tl.zeros([M, D], tl.float32)
    u_start = tl.multiple_of(tl.load(UOFF + b), ALIGN)
    u_end = tl.load(UOFF + b + 1)
    for u0 in range(u_start, u_end, BU):
        key, kt, s, member = union_tile(q, u0, UKEYS, UBITS, K, h, sk_t, sk_h, rows, row_ok, scale_log2, G, D, BU, PREC)
        p = tl.where(member, tl.exp2(s - lse2[:, None]), 0.0)
        vt = tl.load(V + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :])
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    tl.store(DQ + row_ptr, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _sparse_bwd_dkv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
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
    """Split backward, pass 2: dk and dv of each union chunk, one fp32 atomic add per (tile, key, group); no dq
    accumulator, so the tile's registers hold q, do and one chunk."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    rows, row_ok, row_ptr, q, do, lse2, delta = backward_rows(Q, DO, LSE, DELTA, T, sq_t, sq_h, G, BQ, D)
    d = tl.arange(0, D)
    u_start = tl.multiple_of(tl.load(UOFF + b), ALIGN)
    u_end = tl.load(UOFF + b + 1)
    for u0 in range(u_start, u_end, BU):
        key, kt, s, member = union_tile(q, u0, UKEYS, UBITS, K, h, sk_t, sk_h, rows, row_ok, scale_log2, G, D, BU, PREC)
        p = tl.where(member, tl.exp2(s - lse2[:, None]), 0.0)
        vt = tl.load(V + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :])
        acc_ptr = key[:, None].to(tl.int64) * sacc_t + h * sacc_h + d[None, :]
        tl.atomic_add(DV + acc_ptr, tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC))
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        tl.atomic_add(DK + acc_ptr, tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC))


BACKWARDS = ("fused", "split")


def _launch_options(rows: int, overrides: dict) -> dict:
    """{pass: dict(BU=keys per chunk, num_warps=, num_stages=)} for the forward and the backward passes; unset
    ones take the H200 optimum measured in benchmarks/results/dsa_parts_h200.json: 128-row tiles run the backward
    on 8 warps, 16-row tiles on 4 warps over 32-key chunks. overrides: block_keys, num_warps, num_stages (None:
    per-pass default), applied to every pass."""
    big = rows >= 64
    defaults = {
        "forward": (64, 4, 3),
        "fused": (64 if big else 32, 8 if big else 4, 3),
        "dq": (64 if big else 32, 8 if big else 4, 3),
        "dkv": (64 if big else 32, 8 if big else 4, 3),
    }
    if UNION_ALIGN % (overrides.get("block_keys") or UNION_ALIGN):
        raise ValueError(f"sparse_gqa_attention: block_keys must divide {UNION_ALIGN}, got {overrides['block_keys']}")
    options = {}
    for name, (keys, warps, stages) in defaults.items():
        options[name] = {
            "BU": overrides.get("block_keys") or keys,
            "num_warps": overrides.get("num_warps") or warps,
            "num_stages": overrides.get("num_stages") or stages,
        }
    return options


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
    def forward(ctx, q, k, v, indices, softmax_scale, block_queries, backward, overrides):
        _check(q, k, v, indices)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        total, heads, dim = q.shape
        groups = k.shape[1]
        per_group = heads // groups
        if block_queries:
            bq, (keys, bits, offsets) = block_queries, block_union(indices, block_queries, UNION_ALIGN)
        else:
            bq, (keys, bits, offsets) = shared_union(indices, per_group)
        ctx.options = _launch_options(bq * per_group, overrides)
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
            PREC=dot_precision(q.dtype),
            **ctx.options["forward"],
        )
        ctx.save_for_backward(q, k, v, out, lse, keys, bits, offsets)
        ctx.scale, ctx.bq, ctx.backward = softmax_scale, bq, backward
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
        common = (total, ctx.scale, ctx.scale * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1))
        shape = dict(G=heads // groups, BQ=ctx.bq, D=dim, PREC=dot_precision(q.dtype))
        accumulators = (dk.stride(0), dk.stride(1))
        if ctx.backward == "fused":
            _sparse_bwd[grid](
                q, k, v, grad_out, lse, delta, dq, dk, dv, keys, bits, offsets, *common, *accumulators,
                **shape, **ctx.options["fused"],
            )  # fmt: skip
        else:
            _sparse_bwd_dq[grid](
                q, k, v, grad_out, lse, delta, dq, keys, bits, offsets, *common, **shape, **ctx.options["dq"]
            )  # fmt: skip
            _sparse_bwd_dkv[grid](
                q, k, v, grad_out, lse, delta, dk, dv, keys, bits, offsets, *common, *accumulators,
                **shape, **ctx.options["dkv"],
            )  # fmt: skip
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
    num_stages: int | None = None,
    backward: str = "fused",
    **_reference_options,
):
    """Triton twin of `kernels.dsa_reference.sparse_gqa_attention` (same shapes, dtypes and semantics).
    Tile overrides (default: block_queries from the sets' overlap, union.choose_block; the rest from
    `_launch_options`): block_keys, num_warps and num_stages apply to every pass. backward: "fused" (one pass,
    dq in registers, dk/dv atomics) or "split" (a dq pass, then a dk/dv pass: more FLOPs, fewer live registers)."""
    if backward not in BACKWARDS:
        raise ValueError(f"sparse_gqa_attention: backward {backward!r} is not one of {BACKWARDS}")
    overrides = {"block_keys": block_keys, "num_warps": num_warps, "num_stages": num_stages}
    return _TritonSparseGQA.apply(q, k, v, indices, softmax_scale, block_queries, backward, overrides)
