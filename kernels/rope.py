"""Rotary position embedding in one pass (forward and backward), for megatron's `apply_rope_fusion` slot.

    out = t * cos(f) + rotate_half(t) * sin(f),   rotate_half([x1, x2]) = [-x2, x1]

t: [S, B, H, D] in any strides with unit stride on D (megatron's q/k views of the fused QKV output);
freqs: [S, 1 or B, 1, R] float32 angles in the rotate-half layout, R <= D (the last D - R channels pass through).
The angles, their cos/sin and the product are fp32 and the result is cast once to t's dtype, as Transformer
Engine's fused RoPE does (megatron's unfused path rounds cos/sin to t's dtype first). `rope_reference` is the
same formula in torch; the Triton kernel runs on CUDA tensors (and on CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None


def rope_reference(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The formula in fp32."""
    rot = freqs.shape[-1]
    x = t[..., :rot].float()
    half = rot // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = torch.cos(freqs.float()), torch.sin(freqs.float())
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (x * cos + rotated * sin).to(t.dtype)
    return torch.cat([out, t[..., rot:]], dim=-1) if rot < t.shape[-1] else out


if triton is not None:

    @triton.jit
    def _rope_kernel(
        t_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        B,
        H,
        rows_heads,  # S * B * H
        stride_ts,
        stride_tb,
        stride_th,
        stride_fs,
        stride_fb,
        HALF: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,  # (row, head) pairs per program
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
        BACKWARD: tl.constexpr,  # multiply by the rotation's transpose
    ):
        pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        pair_ok = pairs < rows_heads
        row, head = pairs // H, pairs % H
        s, b = row // B, row % B
        cols = tl.arange(0, BLOCK_HALF)
        ok = pair_ok[:, None] & (cols < HALF)[None, :]
        f_row = (s * stride_fs + b * stride_fb)[:, None] + cols[None, :]  # the heads of a row share it (cached)
        cos1 = tl.load(cos_ptr + f_row, mask=ok, other=0.0)
        sin1 = tl.load(sin_ptr + f_row, mask=ok, other=0.0)
        cos2 = tl.load(cos_ptr + f_row + HALF, mask=ok, other=0.0)
        sin2 = tl.load(sin_ptr + f_row + HALF, mask=ok, other=0.0)
        src_row = t_ptr + s * stride_ts + b * stride_tb + head * stride_th
        src = src_row[:, None] + cols[None, :]
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:  # [[cos1, -sin1], [sin2, cos2]] transposed
            y1 = x1 * cos1 + x2 * sin2
            y2 = x2 * cos2 - x1 * sin1
        else:
            y1 = x1 * cos1 - x2 * sin1
            y2 = x2 * cos2 + x1 * sin2
        dst = out_ptr + pairs[:, None] * D + cols[None, :]
        tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, y2.to(out_ptr.dtype.element_ty), mask=ok)
        if BLOCK_PASS > 0:  # channels past the rotated ones are copied
            extra = tl.arange(0, BLOCK_PASS)
            pass_ok = pair_ok[:, None] & (extra[None, :] < D - 2 * HALF)
            values = tl.load(src_row[:, None] + 2 * HALF + extra[None, :], mask=pass_ok, other=0.0)
            tl.store(out_ptr + pairs[:, None] * D + 2 * HALF + extra[None, :], values, mask=pass_ok)


def _rope_triton(t: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    S, B, H, D = t.shape
    rot = freqs.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    f = freqs.float()  # cos and sin once per row here: per (row, head) in the kernel they cost more than the bytes
    cos, sin = (x.contiguous().expand(S, B, 1, rot) for x in (torch.cos(f), torch.sin(f)))
    out = torch.empty((S, B, H, D), dtype=t.dtype, device=t.device)
    rest = D - rot
    block = 64  # 64 (row, head) pairs x D/2 columns, twice, per program
    _rope_kernel[(triton.cdiv(S * B * H, block),)](
        t,
        cos,
        sin,
        out,
        B,
        H,
        S * B * H,
        t.stride(0),
        t.stride(1),
        t.stride(2),
        cos.stride(0),
        cos.stride(1),
        HALF=rot // 2,
        D=D,
        BLOCK=block,
        BLOCK_HALF=triton.next_power_of_2(rot // 2),
        BLOCK_PASS=triton.next_power_of_2(rest) if rest else 0,
        BACKWARD=backward,
        num_warps=4,
    )
    return out


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return _rope_triton(t, freqs, False)

    @staticmethod
    def backward(ctx, grad):
        (freqs,) = ctx.saved_tensors
        return _rope_triton(grad, freqs, True), None


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_unused) -> torch.Tensor:
    """megatron's `fused_apply_rotary_pos_emb(t, freqs, interleaved=...)` slot: [S, B, H, D] -> contiguous
    [S, B, H, D]. The angles take no gradient (megatron's rotary embeddings are not learned)."""
    if interleaved:
        raise ValueError("the fused RoPE implements the rotate-half layout only (rotary_interleaved=False)")
    if t.dim() != 4 or freqs.dim() != 4 or freqs.shape[-1] > t.shape[-1] or freqs.shape[-1] % 2:
        raise ValueError(
            f"fused RoPE needs t [S, B, H, D] and freqs [S, B|1, 1, R<=D even]; got {t.shape}, {freqs.shape}"
        )
    if triton is None:
        return rope_reference(t, freqs)
    return _FusedRope.apply(t, freqs.detach())
