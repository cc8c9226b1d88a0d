"""The routed experts of a decode step in two Triton kernels: a few rows per expert, weights streamed once.

At decode a step feeds T tokens x top-k rows to E experts, a handful of rows each (64 x 8 over 128: 4), so the
experts' cost is reading their weights, not the FLOPs. torch's grouped GEMM reads them at about 60% of the
H200's HBM bandwidth at these shapes; these kernels are laid out for the bytes instead:
- `swiglu_fc1`: program (expert g, column tile n) loads the tile's gate and up rows of fc1 once, multiplies
  them with the expert's rows gathered straight from the hidden states (`source` rows: no gathered copy), and
  writes act = silu(gate) * up * scale (fp32 math, one rounding to x's dtype).
- `rows_fc2`: program (g, n) multiplies the expert's act rows with fc2's tile and writes each row to its
  `target` row (the combine's layout: no scatter copy).
An expert with no rows reads nothing. Rows are sorted by expert with the group ends on the device (`ends`
[E] int32, cumulative), so nothing is read back to the host and a CUDA graph can capture the step. fp32
accumulation; the `*_reference` functions are the same math in torch. The kernels run on CUDA tensors and on
the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from kernels import interpreter_compat

    interpreter_compat.apply()
except ImportError:  # the torch references still work
    triton = None

BLOCK_M = 16  # rows per pass (tl.dot's minimum); an expert with more rows takes more passes over its tile


def _starts(ends: torch.Tensor) -> torch.Tensor:
    return torch.cat([ends.new_zeros(1), ends[:-1]])


def swiglu_fc1_reference(x, fc1, ends, source, scale) -> torch.Tensor:
    """x [T, K], fc1 [E, 2F, K] (gate rows, then up rows), ends [E], source [M] rows of x, scale [M] ->
    [M, F] = silu(gate) * up * scale of each sorted row, in x's dtype (fp32 math)."""
    rows = x[source].float()
    out = torch.empty(source.shape[0], fc1.shape[1] // 2, dtype=x.dtype, device=x.device)
    for g, (start, end) in enumerate(zip(_starts(ends).tolist(), ends.tolist())):
        if end > start:
            gate, up = (rows[start:end] @ fc1[g].float().t()).chunk(2, dim=-1)
            out[start:end] = (torch.nn.functional.silu(gate) * up * scale[start:end, None].float()).to(x.dtype)
    return out


def rows_fc2_reference(act, fc2, ends, target, out_rows: int) -> torch.Tensor:
    """act [M, F] sorted by expert, fc2 [E, H, F] -> out [out_rows, H] with out[target[m]] = act[m] @ fc2[g].T
    (rows no target names are zero)."""
    out = act.new_zeros(out_rows, fc2.shape[1])
    for g, (start, end) in enumerate(zip(_starts(ends).tolist(), ends.tolist())):
        if end > start:
            out[target[start:end]] = (act[start:end].float() @ fc2[g].float().t()).to(act.dtype)
    return out


if triton is not None:

    @triton.jit
    def _group_rows(ends_ptr, g):
        """[start, end) of expert g's rows in the sorted order."""
        end = tl.load(ends_ptr + g)
        start = tl.load(ends_ptr + g - 1, mask=g > 0, other=0)
        return start, end

    @triton.jit
    def _add_dot_t(acc, a, w, IEEE: tl.constexpr):
        """acc + a @ w.T, fp32 (IEEE: full fp32 products, for fp32 inputs)."""
        if IEEE:
            out = acc + tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            out = acc + tl.dot(a, tl.trans(w))
        return out

    @triton.jit
    def _swiglu_fc1_kernel(
        x_ptr,
        w_ptr,
        ends_ptr,
        source_ptr,
        scale_ptr,
        out_ptr,
        F,
        K,
        stride_x,
        stride_we,
        stride_wn,
        stride_out,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        g = tl.program_id(0)
        n = tl.program_id(1)
        start, end = _group_rows(ends_ptr, g)
        cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < F
        w_gate = w_ptr + g.to(tl.int64) * stride_we + cols[:, None] * stride_wn
        w_up = w_gate + F * stride_wn
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            src = tl.load(source_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                a = tl.load(
                    x_ptr + src[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                )
                wg = tl.load(w_gate + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                wu = tl.load(w_up + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                gate = _add_dot_t(gate, a, wg, IEEE)
                up = _add_dot_t(up, a, wu, IEEE)
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            act = gate * tl.sigmoid(gate) * up * scale[:, None]
            out = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
            tl.store(out, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _rows_fc2_kernel(
        a_ptr,
        w_ptr,
        ends_ptr,
        target_ptr,
        out_ptr,
        N,
        K,
        stride_a,
        stride_we,
        stride_wn,
        stride_out,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        g = tl.program_id(0)
        n = tl.program_id(1)
        start, end = _group_rows(ends_ptr, g)
        cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        w_tile = w_ptr + g.to(tl.int64) * stride_we + cols[:, None] * stride_wn
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                a = tl.load(
                    a_ptr + rows[:, None].to(tl.int64) * stride_a + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                w = tl.load(w_tile + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                acc = _add_dot_t(acc, a, w, IEEE)
            dst = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            out = out_ptr + dst[:, None] * stride_out + cols[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages) of each kernel, picked on the H200 by benchmarks/experts_decode_gpu.py
FC1_CONFIG = (64, 128, 4, 3)
FC2_CONFIG = (64, 128, 4, 3)


def _check(x, weight, ends, rows):
    if weight.dim() != 3 or x.shape[-1] != weight.shape[-1] or ends.shape != (weight.shape[0],):
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, ends {tuple(ends.shape)} do not fit")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and the weights need unit stride on the reduced dimension")
    if rows.dim() != 1:
        raise ValueError(f"row indices must be 1-D, got {tuple(rows.shape)}")


def swiglu_fc1(x, fc1, ends, source, scale, config=None) -> torch.Tensor:
    """`swiglu_fc1_reference` in one kernel (the torch reference without Triton)."""
    _check(x, fc1, ends, source)
    if triton is None:
        return swiglu_fc1_reference(x, fc1, ends, source, scale)
    block_n, block_k, warps, stages = config or FC1_CONFIG
    features = fc1.shape[1] // 2
    out = torch.empty(source.shape[0], features, dtype=x.dtype, device=x.device)
    grid = (fc1.shape[0], triton.cdiv(features, block_n))
    _swiglu_fc1_kernel[grid](
        x,
        fc1,
        ends.to(torch.int32),
        source,
        scale,
        out,
        features,
        x.shape[-1],
        x.stride(0),
        fc1.stride(0),
        fc1.stride(1),
        out.stride(0),
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def rows_fc2(act, fc2, ends, target, out_rows: int, config=None) -> torch.Tensor:
    """`rows_fc2_reference` in one kernel; every output row must be some row's target (no zero fill)."""
    _check(act, fc2, ends, target)
    if triton is None:
        return rows_fc2_reference(act, fc2, ends, target, out_rows)
    block_n, block_k, warps, stages = config or FC2_CONFIG
    out = torch.empty(out_rows, fc2.shape[1], dtype=act.dtype, device=act.device)
    grid = (fc2.shape[0], triton.cdiv(fc2.shape[1], block_n))
    _rows_fc2_kernel[grid](
        act,
        fc2,
        ends.to(torch.int32),
        target,
        out,
        fc2.shape[1],
        act.shape[-1],
        act.stride(0),
        fc2.stride(0),
        fc2.stride(1),
        out.stride(0),
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        IEEE=act.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages,
    )
    return out
