"""GPU kernel time by kind under torch.profiler, shared by the GPU benchmarks."""

from __future__ import annotations

import time
from pathlib import Path

import torch

KERNEL_KINDS = (  # (kind, substrings of a CUDA kernel's name), first match wins
    ("attention", ("flash", "fmha", "cudnn", "attn")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_")),
    ("norm", ("layer_norm", "layernorm", "rms")),
    ("softmax_ce", ("softmax", "cross_entropy", "nll")),
    ("copy_index", ("copy", "cat", "index", "gather", "scatter", "fill", "memset", "memcpy")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
    ("triton", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profiled(fn, wall_label: str, table_path: Path | None) -> dict:
    """Run fn once under torch.profiler: GPU kernel time by kind, the GPU's busy share of the wall time and the
    top kernels; the full table goes to table_path."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # kernels only: little host overhead
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kinds: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e3
    busy = sum(kinds.values())
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    if table_path is not None:
        table_path.write_text(
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=90)
        )
    return {
        "what": wall_label,
        "wall_ms": wall_ms,
        "gpu_busy_ms": busy,
        "gpu_busy_share": busy / wall_ms,
        "kernel_ms_by_kind": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {
                "name": e.key[:120],
                "kind": kernel_kind(e.key),
                "ms": round(e.self_device_time_total / 1e3, 2),
                "calls": e.count,
            }
            for e in top
        ],
    }
