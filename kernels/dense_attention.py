"""Dense attention over packed documents: FlashAttention's varlen kernel through torch on CUDA (bf16/fp16), and a
per-document torch SDPA loop everywhere else (CPU, fp32), which is also the reference the fast path is tested
against (tests/kernels/test_dense_attention_gpu.py).

torch's varlen API changed between releases (is_causal vs window_size, scale, enable_gqa), so before its first use
for a head layout, dtype and masking the fast path is checked once against the loop on small random documents,
forward and backward; if it raises or disagrees, a warning names the reason and the loop serves that layout."""

from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn.functional as F

try:  # torch >= 2.10; its keyword arguments changed between releases, so they are read from the signature
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_ARGS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:
    _varlen_attn, _VARLEN_ARGS = None, set()


def flash_varlen_available(q: torch.Tensor) -> bool:
    return _varlen_attn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _flash_varlen(q, k, v, cu_seqlens, causal: bool, scale: float | None, max_seqlen: int | None):
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = int(max_seqlen) if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
    kwargs = {}
    if "enable_gqa" in _VARLEN_ARGS:
        kwargs["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:  # older signatures: one KV head per query head
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    if "is_causal" in _VARLEN_ARGS:
        kwargs["is_causal"] = causal
    else:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    if scale is not None and "scale" in _VARLEN_ARGS:
        kwargs["scale"] = scale
    elif scale is not None:  # no scale argument: fold it into q against the default 1/sqrt(d)
        q = q * (scale * math.sqrt(q.shape[-1]))
    return _varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


def dense_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Attention confined to documents of a packed sequence.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq % Hkv == 0 (GQA); cu_seqlens: [N + 1] int offsets, last == T;
    max_seqlen: the longest document, if known (saves a device sync on the fast path).
    Returns [T, Hq, D]. Tokens never attend across document boundaries.
    """
    if flash_varlen_available(q) and _fast_path_verified(q, k, causal):
        return _flash_varlen(q, k, v, cu_seqlens, causal, scale, max_seqlen)
    return dense_varlen_attention_loop(q, k, v, cu_seqlens, causal, scale)


_VERIFIED: dict[tuple, bool] = {}


def _fast_path_verified(q: torch.Tensor, k: torch.Tensor, causal: bool) -> bool:
    """Whether the fast path computes the loop's attention for this layout (checked once per layout)."""
    key = (q.dtype, q.device, q.shape[1], k.shape[1], q.shape[2], causal)
    if key not in _VERIFIED:
        _VERIFIED[key] = _check_fast_path(*key)
    return _VERIFIED[key]


def _check_fast_path(dtype, device, heads, kv_heads, dim, causal) -> bool:
    lengths = [5, 67, 130]
    cu = torch.tensor([0, 5, 72, 202], dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(sum(lengths), h, dim, generator=g, device=device) for h in (heads, kv_heads, kv_heads)]
    up = torch.randn(sum(lengths), heads, dim, generator=g, device=device)
    scale = 0.8 / math.sqrt(dim)

    def run(cast, attend):
        leaves = [x.to(cast).requires_grad_() for x in inputs]
        out = attend(*leaves)
        return [out, *torch.autograd.grad((out.float() * up).sum(), leaves)]

    try:
        with torch.enable_grad():
            results = [run(dtype, lambda q, k, v: _flash_varlen(q, k, v, cu, causal, scale, max(lengths))),
                       run(torch.float32, lambda q, k, v: dense_varlen_attention_loop(q, k, v, cu, causal, scale))]
    except Exception as err:  # any failure of the fast path means: use the loop
        warnings.warn(f"dense varlen attention: torch's varlen kernel failed its self-check ({err!r}); "
                      "using one SDPA call per document")
        return False
    errors = [float((a.float() - b).norm() / b.norm()) for a, b in zip(*results)]
    if not all(e < 2e-2 for e in errors):  # bf16 / fp16 operands: errors near 1e-3 .. 1e-2; NaN fails
        warnings.warn(f"dense varlen attention: torch's varlen kernel disagrees with the loop (relative errors "
                      f"{errors}); using one SDPA call per document")
        return False
    return True


def dense_varlen_attention_loop(q, k, v, cu_seqlens, causal: bool, scale: float | None = None) -> torch.Tensor:
    """The reference: one torch SDPA call per document."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1)
    return out
