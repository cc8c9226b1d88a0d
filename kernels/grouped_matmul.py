"""Grouped matmul of row groups against stacked weights: out[rows of g] = x[rows of g] @ weight[g].T.

The MoE experts' GEMMs: x holds each expert's tokens contiguously, `counts` (host ints) says how many rows each
group has. torch's grouped GEMM (`torch.nn.functional.grouped_mm`, CUTLASS on sm90) runs them as one kernel on
CUDA in bf16, and as torch's own loop on CPU in fp32; everything else loops here. No megatron imports.

Kernel rules on CUDA (torch 2.10-2.13): operands' leading strides must be multiples of 16 bytes; rows past the
last offset and the weight gradients of empty groups are left uninitialised by some kernels. So callers pad each
group to `group_alignment()` rows, never leave a group empty, and size x to exactly the sum of the counts
(`padded_counts`, `padded_rows`).
"""

from __future__ import annotations

import itertools

import torch

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def uses_grouped_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `grouped_matmul` runs torch's grouped GEMM for these operands (else the per-group loop)."""
    if _grouped_mm is None or x.dtype != weight.dtype or x.device != weight.device:
        return False
    kernel_dtype = {"cuda": torch.bfloat16, "cpu": torch.float32}.get(x.device.type)
    dtype_ok = x.dtype == kernel_dtype
    aligned = all(size * x.element_size() % 16 == 0 for size in weight.shape[1:])
    return dtype_ok and aligned


def group_alignment(x: torch.Tensor, weight: torch.Tensor) -> int:
    """Rows each group is padded to: 16 bytes of rows' elements on the CUDA kernel (8 in bf16), else none."""
    if x.is_cuda and uses_grouped_kernel(x, weight):
        return 16 // x.element_size()
    return 1


def padded_counts(counts: list[int], align: int) -> list[int]:
    """Each group rounded up to a multiple of `align`; with align > 1 an empty group gets `align` rows too."""
    if align == 1:
        return list(counts)
    return [max(align, -(-c // align) * align) for c in counts]


def padded_rows(counts: list[int], padded: list[int], device) -> torch.Tensor:
    """Row of each input row in the padded layout ([sum(counts)] int64), built on `device` from the host counts
    without a device sync (a pinned host-to-device copy of two [G] vectors)."""
    starts = [0, *itertools.accumulate(counts)][:-1]
    padded_starts = [0, *itertools.accumulate(padded)][:-1]
    host = torch.tensor([counts, [p - s for p, s in zip(padded_starts, starts)]], dtype=torch.int64)
    on = _to_device(host, device)
    total = sum(counts)
    shift = torch.repeat_interleave(on[1], on[0], output_size=total)
    return torch.arange(total, device=device) + shift


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [M, K] with groups of `counts` rows (sum = M), weight [G, N, K] -> [M, N], differentiable in both."""
    if len(counts) != weight.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(
            f"{len(counts)} groups of {sum(counts)} rows for weight {tuple(weight.shape)} and x {tuple(x.shape)}"
        )
    if uses_grouped_kernel(x, weight) and x.shape[0] > 0:
        offsets = _to_device(torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32), x.device)
        return _grouped_mm(x.contiguous(), weight.transpose(-2, -1), offs=offsets)
    return grouped_matmul_loop(x, weight, counts)


def grouped_matmul_by_offsets(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The same product with the group ends on the device (`offsets` [G] int32, cumulative, last = M), so no host
    read: what a CUDA-graph-captured forward needs. Groups may be empty or of any size; forward only (the kernel
    leaves empty groups' weight gradients uninitialised, see above). Without the grouped kernel it reads the
    offsets back and loops."""
    if offsets.shape != (weight.shape[0],):
        raise ValueError(f"{tuple(offsets.shape)} offsets for weight {tuple(weight.shape)}")
    if uses_grouped_kernel(x, weight) and x.shape[0] > 0:
        return _grouped_mm(x.contiguous(), weight.transpose(-2, -1), offs=offsets.to(torch.int32))
    ends = offsets.tolist()
    return grouped_matmul_loop(x, weight, [e - s for s, e in zip([0, *ends[:-1]], ends)])


def grouped_matmul_loop(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The per-group reference: one matmul per group."""
    pieces = [rows @ w.t() for rows, w in zip(x.split(counts), weight.unbind(0))]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[1])


def _to_device(host: torch.Tensor, device) -> torch.Tensor:
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
