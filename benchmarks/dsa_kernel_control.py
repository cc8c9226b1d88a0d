"""Control kernels for the sparse forward: the same tile as kernels/triton_dsa/sparse_attention.py (M = BQ x G
query rows against chunks of BU keys, online softmax), stripped down step by step, so that a profile says what the
real kernel pays for:
- GATHER=False: keys u0..u0+BU-1 are contiguous (a plain causal-free FlashAttention forward over n keys);
- GATHER=True: keys come from a list, one row gather per key (what the union walk does);
- MASK=True: each row keeps only the keys its own query selected (membership bits), as the real kernel does.
Benchmark-only; the library kernel is the reference for semantics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _control_fwd(
    Q, K, V, OUT, KEYS, BITS, n_keys, scale_log2, sq_t, sq_h, sk_t, sk_h,
    G: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BU: tl.constexpr, GATHER: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    M: tl.constexpr = BQ * G
    rows = tl.arange(0, M)
    query = b * BQ + rows // G
    head = h * G + rows % G
    d = tl.arange(0, D)
    row_ptr = query[:, None].to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :]
    q = tl.load(Q + row_ptr)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    base = b.to(tl.int64) * n_keys  # each block walks its own list of n_keys
    for u0 in range(0, n_keys, BU):
        u = u0 + tl.arange(0, BU)
        if GATHER:
            key = tl.load(KEYS + base + u)
        else:
            key = (b * BQ + u) % n_keys
        kt = tl.load(K + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :])
        s = tl.dot(q, tl.trans(kt)) * scale_log2
        if MASK:
            bits = tl.load(BITS + base + u)
            s = tl.where(((bits[None, :] >> (rows // G)[:, None]) & 1) != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + key[:, None].to(tl.int64) * sk_t + h * sk_h + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + row_ptr, out.to(OUT.dtype.element_ty))


def control_lists(total: int, n_keys: int, block_queries: int = 16, seed: int = 0, device="cuda"):
    """Per block of queries: n_keys random distinct-ish sorted keys, and membership bits (each query keeps about
    half of them)."""
    blocks = total // block_queries
    g = torch.Generator(device=device).manual_seed(seed)
    keys = torch.sort(torch.randint(0, total, (blocks, n_keys), generator=g, device=device), 1).values
    bits = torch.randint(0, 1 << block_queries, (blocks, n_keys), generator=g, device=device)
    return keys.to(torch.int32), bits.to(torch.int32)


def control_forward(q, k, v, keys, bits, *, gather: bool, mask: bool, block_queries: int = 16, block_keys: int = 64,
                    num_warps: int = 4, num_stages: int = 3):  # fmt: skip
    """Run the control on q [T, Hq, D], k/v [T, Hkv, D] with control_lists' keys/bits [T / block_queries, n].
    -> (out, compiled kernel, FLOPs of the tile work done)."""
    total, heads, dim = q.shape
    groups = k.shape[1]
    blocks, n_keys = keys.shape
    out = torch.empty_like(q)
    kernel = _control_fwd[(blocks, groups)](
        q, k, v, out, keys, bits, n_keys, dim**-0.5 * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        G=heads // groups, BQ=block_queries, D=dim, BU=block_keys, GATHER=gather, MASK=mask,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, kernel, 4.0 * blocks * block_queries * heads * n_keys * dim
