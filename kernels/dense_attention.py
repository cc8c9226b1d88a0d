"""Dense attention over packed documents. On CUDA (bf16/fp16) two fast paths: cuDNN's ragged (THD) attention and
FlashAttention's varlen kernel, both through torch's own ops; everywhere else (CPU, fp32) a per-document torch SDPA
loop, which is also the reference the fast paths are tested against (tests/kernels/test_dense_attention_gpu.py).

`backend="auto"` takes the first of FAST_PATHS that works for the layout. torch's private attention ops change
between releases, so before a fast path's first use for a head layout, dtype and masking it is checked once
against the loop on small random documents, forward and backward; if it raises or disagrees, a warning names the
reason and the next path (finally the loop) serves that layout."""

from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def cudnn_available(q: torch.Tensor) -> bool:
    return flash_varlen_available(q) and torch.backends.cudnn.is_available()


LONG_DOCUMENT = 4096  # tokens: documents this long go through cuDNN one by one, shorter ones through flash varlen


def _cudnn_document(q, k, v, causal: bool, scale: float | None):
    """One document [s, H, D] through torch SDPA's cuDNN backend; K/V expanded to the query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) if group > 1 else x for x in (k, v))
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def _cudnn_long_documents(
    q,
    k,
    v,
    cu_seqlens,
    causal: bool,
    scale: float | None,
    max_seqlen: int | None,
    lengths: list[int] | None = None,
    long_from: int = LONG_DOCUMENT,
):
    """cuDNN's fused attention (about 1.7x FlashAttention-2 on Hopper at 32K+) for each long document, where the
    FLOPs are; each run of short documents between them in one flash varlen launch. (cuDNN's ragged mode would take
    the whole pack at once, but its backward in torch 2.11 returns wrong dq and dk.) `lengths`: the document lengths
    on the host, if known (saves a device sync)."""
    if lengths is None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if max(lengths, default=0) < long_from:
        return _flash_varlen(q, k, v, cu_seqlens, causal, scale, max_seqlen)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    pieces, run, position = [], [], 0  # run: indices of the short documents since the last long one

    def flush_short_run():
        first, last = run[0], run[-1] + 1
        local = cu[first : last + 1] - cu[first]  # on the device: no host round trip
        span = slice(position - sum(lengths[first:last]), position)
        pieces.append(_flash_varlen(q[span], k[span], v[span], local, causal, scale, max(lengths[first:last])))
        run.clear()

    for index, length in enumerate(lengths):
        if length < long_from:
            run.append(index)
        else:
            if run:
                flush_short_run()
            span = slice(position, position + length)
            pieces.append(_cudnn_document(q[span], k[span], v[span], causal, scale))
        position += length
    if run:
        flush_short_run()
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


PREFERENCE = ("cudnn", "flash")  # auto: cuDNN measured faster on the H200 (benchmarks/attention_backends_gpu.py)


def _fast_path(name: str):
    """(available, attend) of a fast path, looked up at call time."""
    return {"cudnn": (cudnn_available, _cudnn_long_documents), "flash": (flash_varlen_available, _flash_varlen)}[name]


def dense_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
    lengths: list[int] | None = None,
) -> torch.Tensor:
    """Attention confined to documents of a packed sequence.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq % Hkv == 0 (GQA); cu_seqlens: [N + 1] int offsets, last == T;
    max_seqlen / lengths: the longest document / every document's length on the host, if known (each saves a
    device sync on the fast paths); backend: auto, cudnn, flash or loop (a named fast path that is unavailable or
    fails its check falls back to the loop).
    Returns [T, Hq, D]. Tokens never attend across document boundaries.
    """
    for name in PREFERENCE if backend == "auto" else (backend,) if backend in PREFERENCE else ():
        available, attend = _fast_path(name)
        if available(q) and _fast_path_verified(name, q, k, causal):
            extra = {"lengths": lengths} if name == "cudnn" else {}
            return attend(q, k, v, cu_seqlens, causal, scale, max_seqlen, **extra)
    return dense_varlen_attention_loop(q, k, v, cu_seqlens, causal, scale)


_VERIFIED: dict[tuple, bool] = {}


def _fast_path_verified(name: str, q: torch.Tensor, k: torch.Tensor, causal: bool) -> bool:
    """Whether a fast path computes the loop's attention for this layout (checked once per path and layout)."""
    key = (name, q.dtype, q.device, q.shape[1], k.shape[1], q.shape[2], causal)
    if key not in _VERIFIED:
        _VERIFIED[key] = _check_fast_path(*key)
    return _VERIFIED[key]


def _check_fast_path(name, dtype, device, heads, kv_heads, dim, causal) -> bool:
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

    attend = _fast_path(name)[1]
    try:
        with torch.enable_grad():
            short = {"long_from": 64} if name == "cudnn" else {}  # both of its sub-paths on these documents
            results = [
                run(dtype, lambda q, k, v: attend(q, k, v, cu, causal, scale, max(lengths), **short)),
                run(torch.float32, lambda q, k, v: dense_varlen_attention_loop(q, k, v, cu, causal, scale)),
            ]
    except Exception as err:  # any failure of the fast path means: use the next one
        warnings.warn(
            f"dense varlen attention: the {name} path failed its self-check ({err!r}); skipping "
            "it (the next fast path serves, else using one SDPA call per document)",
            stacklevel=2,
        )
        return False
    errors = [float((a.float() - b).norm() / b.norm()) for a, b in zip(*results)]
    if not all(e < 2e-2 for e in errors):  # bf16 / fp16 operands: errors near 1e-3 .. 1e-2; NaN fails
        warnings.warn(
            f"dense varlen attention: the {name} path disagrees with the loop (relative errors "
            f"{errors}); skipping it (the next fast path serves, else using one SDPA call per document)",
            stacklevel=2,
        )
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
