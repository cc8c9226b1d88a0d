"""Triton lightning-indexer scores and exact top-k.

Scores: for a chunk of query rows of one document (sized by a memory budget, as in the reference), one program
loads BQ queries' H_I heads once and walks KT key tiles (16: 1.9x faster than one at 128K), each a [BQ, BK] tile of
I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]) / sqrt(D_I) from one tl.dot over the BQ x H_I query rows; key tiles
wholly in the causal future are skipped. The chunk's scores live in a
[rows, span] buffer; nothing of size L x L exists.

Top-k: one program per query row, exact by construction. A 4-pass radix select over the scores' order-preserving
uint32 keys (8 bits per pass, histograms over the still-matching elements) finds the k-th largest key T and how
many of the keys equal to T are taken; a last pass writes, in ascending key order, every position with a larger
key and the lowest-positioned ties. There is no fixed-size candidate buffer that could overflow (the failure
mode of public radix top-k kernels): each pass streams the whole row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dsa_reference import memory_budget, row_chunks
from kernels.triton_dsa.precision import INDEXER_DOT_PRECISION


@triton.jit
def _indexer_scores(
    IQ,
    IW,
    IK,
    S,
    r0,
    q_row0,
    doc_start,
    rows,
    span,
    scale,
    sq_t,
    sq_h,
    sw_t,
    sk_t,
    ss_r,
    H: tl.constexpr,
    DI: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    KT: tl.constexpr,
    PREC: tl.constexpr,
):
    qb = tl.program_id(0)
    last_row = tl.minimum(qb * BQ + BQ - 1, rows - 1)
    last_key = last_row + (r0 - doc_start)  # key tiles wholly after it are in the causal future
    m = tl.arange(0, BQ * H)
    local = qb * BQ + m // H
    row_ok = local < rows
    token = r0 - q_row0 + local  # IQ / IW hold the queries from position q_row0 on
    head = m % H
    d = tl.arange(0, DI)
    q = tl.load(
        IQ + token[:, None].to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0
    )
    w = tl.load(IW + token.to(tl.int64) * sw_t + head, mask=row_ok, other=0.0)
    out_rows = qb * BQ + tl.arange(0, BQ)
    first = tl.program_id(1) * BK * KT
    for first_key in range(first, tl.minimum(first + BK * KT, last_key + 1), BK):  # KT tiles share q
        col = first_key + tl.arange(0, BK)
        col_ok = col < span
        k = tl.load(IK + (doc_start + col)[:, None].to(tl.int64) * sk_t + d[None, :], mask=col_ok[:, None], other=0.0)
        z = tl.maximum(tl.dot(q, tl.trans(k), input_precision=PREC), 0.0) * w[:, None]
        scores = tl.sum(tl.reshape(z, (BQ, H, BK)), axis=1) * scale
        tl.store(
            S + out_rows[:, None].to(tl.int64) * ss_r + col[None, :],
            scores,
            mask=(out_rows < rows)[:, None] & col_ok[None, :],
        )


@triton.jit
def _ordered_key(x):
    """float32 -> uint32 whose unsigned order is the float order."""
    bits = x.to(tl.uint32, bitcast=True)
    negative = (bits >> 31) != 0
    return tl.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _select_topk(S, OUT, r0, q_row0, doc_start, rows, ss_r, so_t, TOPK, BLOCK: tl.constexpr, BITS: tl.constexpr):
    local = tl.program_id(0)
    visible = local + (r0 - doc_start) + 1  # keys doc_start .. r0 + local
    row = S + local.to(tl.int64) * ss_r
    out = OUT + (r0 - q_row0 + local).to(tl.int64) * so_t
    threshold = tl.zeros([], tl.uint32)
    take_ties = tl.zeros([], tl.int32) + TOPK
    if visible > TOPK:
        known = tl.zeros([], tl.uint32)  # bits of the threshold fixed so far
        bins = tl.arange(0, 1 << BITS)
        for p in tl.static_range((32 + BITS - 1) // BITS):
            shift = 32 - BITS * (p + 1) if BITS * (p + 1) < 32 else 0  # may overlap known bits: harmless
            hist = tl.zeros([1 << BITS], tl.int32)
            for c0 in range(0, visible, BLOCK):
                col = c0 + tl.arange(0, BLOCK)
                ok = col < visible
                key = _ordered_key(tl.load(row + col, mask=ok, other=0.0))
                match = ok & ((key & known) == (threshold & known))
                digits = ((key >> shift) & ((1 << BITS) - 1)).to(tl.int32)
                hist += tl.histogram(digits, 1 << BITS, mask=match)
            at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys whose digit is >= d
            digit = tl.sum((at_or_above >= take_ties).to(tl.int32), 0) - 1  # the digit holding the k-th largest
            take_ties -= tl.sum(tl.where(bins > digit, hist, 0), 0)
            threshold = threshold | (digit.to(tl.uint32) << shift)
            known = known | (tl.full([], (1 << BITS) - 1, tl.uint32) << shift)
    written = tl.zeros([], tl.int32)
    ties_seen = tl.zeros([], tl.int32)
    for c0 in range(0, visible, BLOCK):
        col = c0 + tl.arange(0, BLOCK)
        ok = col < visible
        key = _ordered_key(tl.load(row + col, mask=ok, other=0.0))
        if visible > TOPK:
            tie = ok & (key == threshold)
            take = (ok & (key > threshold)) | (tie & (ties_seen + tl.cumsum(tie.to(tl.int32), 0) <= take_ties))
            ties_seen += tl.sum(tie.to(tl.int32), 0)
        else:
            take = ok
        slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(out + slot, (doc_start + col).to(tl.int32), mask=take)
        written += tl.sum(take.to(tl.int32), 0)
    while written < TOPK:  # -1 after the last selected key
        pad = written + tl.arange(0, BLOCK)
        tl.store(out + pad, tl.full([BLOCK], -1, tl.int32), mask=pad < TOPK)
        written += BLOCK


def indexer_scores(
    index_q, index_w, index_k, doc_start: int, r0: int, r1: int, q_row0: int = 0, key_tiles: int = 16
) -> torch.Tensor:
    """[r1 - r0, r1 - doc_start] fp32 scores of query rows r0:r1 against their document's keys (entries in the
    causal future of a row are unspecified); index_q / index_w row i is position q_row0 + i."""
    heads, dim = index_q.shape[1], index_q.shape[2]
    rows, span = r1 - r0, r1 - doc_start
    scores = torch.empty(rows, span, dtype=torch.float32, device=index_q.device)
    bq = max(1, 128 // heads) if heads <= 128 else 1
    bq = max(bq, -(-16 // heads))
    bk = 64
    grid = (triton.cdiv(rows, bq), triton.cdiv(span, bk * key_tiles))
    _indexer_scores[grid](
        index_q,
        index_w,
        index_k,
        scores,
        r0,
        q_row0,
        doc_start,
        rows,
        span,
        dim**-0.5,
        index_q.stride(0),
        index_q.stride(1),
        index_w.stride(0),
        index_k.stride(0),
        scores.stride(0),
        H=heads,
        DI=dim,
        BQ=bq,
        BK=bk,
        KT=key_tiles,
        PREC=INDEXER_DOT_PRECISION,
    )
    return scores


def select_rows(
    scores: torch.Tensor,
    out: torch.Tensor,
    doc_start: int,
    r0: int,
    topk: int,
    block: int = 1024,
    q_row0: int = 0,
    num_warps: int = 4,
    digit_bits: int = 8,
) -> None:
    """Exact top-k of each row of `scores` (row i sees its first r0 - doc_start + i + 1 columns) into
    out[r0 - q_row0:]."""
    _select_topk[(scores.shape[0],)](
        scores,
        out,
        r0,
        q_row0,
        doc_start,
        scores.shape[0],
        scores.stride(0),
        out.stride(0),
        topk,
        BLOCK=block,
        BITS=digit_bits,
        num_warps=num_warps,
    )


def indexer_topk_cached(
    index_q, index_w, index_k, first_position: int, topk: int, budget_bytes: int | None = None, select_block: int = 1024
):
    """Chunked prefill / decode: queries at positions first_position .. first_position + n - 1 of one sequence,
    keys index_k [first_position + n, D_I] from the cache. -> [n, topk] int32, as `indexer_topk` rows."""
    _check(index_q, index_w, index_k[: index_q.shape[0]], topk)
    index_q, index_w, index_k = index_q.contiguous(), index_w.contiguous(), index_k.contiguous()
    rows, end = index_q.shape[0], first_position + index_q.shape[0]
    out = torch.empty(rows, topk, dtype=torch.int32, device=index_q.device)
    budget = budget_bytes or memory_budget(index_q.device)
    for r0 in range(first_position, end, max(1, budget // (4 * end))):
        r1 = min(end, r0 + max(1, budget // (4 * end)))
        scores = indexer_scores(index_q, index_w, index_k, 0, r0, r1, q_row0=first_position)
        select_rows(scores, out, 0, r0, topk, select_block, q_row0=first_position)
    return out


def _check(index_q, index_w, index_k, topk):
    heads, dim = index_q.shape[1], index_q.shape[2]
    if dim & (dim - 1) or dim < 16 or heads & (heads - 1):
        raise ValueError(
            f"indexer_topk (triton): index heads {heads} and head dim {dim} must be powers of two, the dim >= 16"
        )
    if index_w.shape != index_q.shape[:2] or index_k.shape != (index_q.shape[0], dim):
        raise ValueError("indexer_topk: index_w must be [T, H_I] and index_k [T, D_I]")


def indexer_topk(
    index_q, index_w, index_k, cu_seqlens, topk: int, budget_bytes: int | None = None, select_block: int = 1024
):
    """Triton twin of `kernels.dsa_reference.indexer_topk` (same shapes, masks, tie rule and padding);
    select_block is the top-k kernel's tile (elements per step along a row)."""
    _check(index_q, index_w, index_k, topk)
    index_q, index_w, index_k = index_q.contiguous(), index_w.contiguous(), index_k.contiguous()
    out = torch.empty(index_q.shape[0], topk, dtype=torch.int32, device=index_q.device)
    for doc_start, r0, r1 in row_chunks(cu_seqlens, 4, budget_bytes or memory_budget(index_q.device)):
        scores = indexer_scores(index_q, index_w, index_k, doc_start, r0, r1)
        select_rows(scores, out, doc_start, r0, topk, select_block)
    return out
