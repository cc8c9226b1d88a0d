"""Compatibility shims that let megatron-core 0.16.1 run on CPU over gloo.

Installed only when CUDA is absent (see `install_if_needed`). On a GPU host this module does nothing.
Each shim answers one item of the verified recipe in the project docs:

a. `torch.cuda.current_device()` returns "cpu", so allocations that use it land on the CPU.
b. `torch.cuda.synchronize()` is a no-op.
c. A TorchFunctionMode rewrites `device="cuda"` in tensor factories and `.to()`, makes `.cuda()` a no-op
   and reports CPU tensors as `torch.cuda.*Tensor` (the optimizer checks that string).
h. megatron's CUDA RNG tracker cannot hold states without CUDA: its `fork()` becomes a plain context
   (CPU RNG is seeded by the trainer; dropout is off in our configs, so no stream is consumed there).
i. Activation recomputation saves and restores the CUDA RNG state around each checkpoint: without CUDA there
   is none, so getting it returns None and setting it does nothing (the CPU RNG state is still saved).
(d, a missing `te_general_gemm`, also hits GPUs without Transformer Engine: `keye_train/model/lm.py` fixes it.)
e/f/g are handled by the model code: a project-owned core attention, the allgather dispatcher and an
SP-safe RMSNorm.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(value):
    return "cpu" if _is_cuda(value) else value


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            return func(*args, **kwargs).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_cpu_if_cuda(a) if i > 0 else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def install() -> None:
    """Install the shims process-wide. Idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    _CudaToCpuMode().__enter__()  # stays on the mode stack for the life of the process
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    _INSTALLED = True


def install_if_needed() -> bool:
    """Install the shims when CUDA is absent; return whether they are active."""
    if torch.cuda.is_available():
        return False
    install()
    return True
