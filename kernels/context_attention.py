"""Dense attention of query segments over key ranges (context parallelism: local queries, gathered keys).

A CP rank holds two chunks of every document; each chunk's queries attend to their document's keys from its
start up to the chunk's end. So segment i is queries q[cu_q[i]:cu_q[i+1]] against keys k[s_i : s_i + m_i] of the
whole (gathered, global-order) sequence, causal with the queries aligned to the end of the keys: query j of a
segment of n sees keys 0 .. m - n + j. That is exactly the per-document causal mask, across chunk boundaries.

On CUDA (bf16/fp16) FlashAttention's varlen kernel takes all segments in one launch (its causal mask is
bottom-right aligned when a segment has fewer queries than keys); the keys of each segment are copied into one
buffer first (about the sequence once more: the prefixes of a document's two chunks add up to its length plus one
chunk). The path is checked once per layout against the loop, which serves everywhere else and is the reference.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from kernels.dense_attention import _VARLEN_ARGS, _varlen_attn, flash_varlen_available


def _segments(q_lengths, k_starts, k_lengths):
    q_start = 0
    for n, s, m in zip(q_lengths, k_starts, k_lengths):
        yield q_start, n, s, m
        q_start += n


def segment_attention_loop(q, k, v, q_lengths, k_starts, k_lengths, scale: float | None = None) -> torch.Tensor:
    """The reference: one SDPA call per segment with the bottom-right causal mask.
    q [n, Hq, D]; k, v [S, Hkv, D]; host lists of segment sizes, key starts and key counts -> [n, Hq, D]."""
    out = torch.empty_like(q)
    for q_start, n, s, m in _segments(q_lengths, k_starts, k_lengths):
        if n == 0:
            continue
        if m < n:
            raise ValueError(f"a segment of {n} queries sees only {m} keys; causal segments need keys >= queries")
        qd = q[q_start : q_start + n].transpose(0, 1)
        kd, vd = (x[s : s + m].transpose(0, 1) for x in (k, v))
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        out[q_start : q_start + n] = o.transpose(0, 1)
    return out


def _key_rows(k_starts, k_lengths, device) -> torch.Tensor:
    spans = [torch.arange(s, s + m) for s, m in zip(k_starts, k_lengths)]
    return torch.cat(spans).to(device)


def _flash_segments(q, k, v, q_lengths, k_starts, k_lengths, scale: float | None):
    rows = _key_rows(k_starts, k_lengths, q.device)
    ks, vs = k.index_select(0, rows), v.index_select(0, rows)
    cu_q = torch.tensor([0] + list(q_lengths), device=q.device).cumsum(0).int()
    cu_k = torch.tensor([0] + list(k_lengths), device=q.device).cumsum(0).int()
    kwargs = {}
    if "enable_gqa" in _VARLEN_ARGS:
        kwargs["enable_gqa"] = True
    elif ks.shape[1] != q.shape[1]:
        ks, vs = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (ks, vs))
    if "is_causal" in _VARLEN_ARGS:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if scale is not None and "scale" in _VARLEN_ARGS:
        kwargs["scale"] = scale
    elif scale is not None:
        q = q * (scale * math.sqrt(q.shape[-1]))
    return _varlen_attn(q, ks, vs, cu_q, cu_k, max(q_lengths), max(k_lengths), **kwargs)


_VERIFIED: dict[tuple, bool] = {}


def _flash_verified(q, k) -> bool:
    key = (q.dtype, q.device, q.shape[1], k.shape[1], q.shape[2])
    if key not in _VERIFIED:
        _VERIFIED[key] = _check_flash(*key)
    return _VERIFIED[key]


def _check_flash(dtype, device, heads, kv_heads, dim) -> bool:
    """Flash segments against the loop on small segments with fewer queries than keys, forward and backward."""
    q_lengths, k_starts, k_lengths = [3, 3, 20, 20, 1], [0, 0, 12, 12, 200], [3, 12, 40, 140, 4]
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(n, h, dim, generator=g, device=device) for n, h in ((47, heads), (204, kv_heads))]
    inputs.append(torch.randn(204, kv_heads, dim, generator=g, device=device))
    up = torch.randn(47, heads, dim, generator=g, device=device)
    scale = 0.8 / math.sqrt(dim)

    def run(cast, attend):
        leaves = [x.to(cast).requires_grad_() for x in inputs]
        out = attend(*leaves, q_lengths, k_starts, k_lengths, scale)
        return [out, *torch.autograd.grad((out.float() * up).sum(), leaves)]

    try:
        with torch.enable_grad():
            results = [run(dtype, _flash_segments), run(torch.float32, segment_attention_loop)]
    except Exception as err:  # any failure of the fast path means: use the loop
        warnings.warn(
            f"context attention: the flash path failed its self-check ({err!r}); using the loop", stacklevel=2
        )
        return False
    errors = [float((a.float() - b).norm() / b.norm()) for a, b in zip(*results)]
    if not all(e < 2e-2 for e in errors):
        warnings.warn(
            f"context attention: the flash path disagrees with the loop ({errors}); using the loop", stacklevel=2
        )
        return False
    return True


def segment_attention(
    q, k, v, q_lengths, k_starts, k_lengths, scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Each query segment attends causally (aligned to its keys' end) to its key range; see the module docstring.
    backend: auto or flash (CUDA bf16/fp16, checked once against the loop), or loop."""
    if backend in ("auto", "flash", "cudnn") and flash_varlen_available(q) and q_lengths and _flash_verified(q, k):
        return _flash_segments(q, k, v, q_lengths, k_starts, k_lengths, scale)
    return segment_attention_loop(q, k, v, q_lengths, k_starts, k_lengths, scale)
