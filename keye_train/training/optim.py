"""Freezing, the megatron DDP + (distributed) optimizer wrapping, and the LR schedule."""

from __future__ import annotations

import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from keye_train.config import DecayStyle, OptimConfig, TrainablePart
from keye_train.model.builder import ModelParts
from keye_train.model.dsa import dsa_core_attentions


def apply_freezing(parts: ModelParts, trainable: list[TrainablePart]) -> None:
    """`lm` is the whole LM including its DSA indexers; `indexer` alone is the DSA warm-up's choice."""
    groups = {"lm": [parts.lm]}
    if parts.vision is not None:
        groups["vit"] = [parts.vision.encoder]
        groups["projector"] = [parts.vision.projector]
    for name, modules in groups.items():
        for module in modules:
            module.requires_grad_(name in trainable)
    for attention in dsa_core_attentions(parts.lm):
        attention.indexer.requires_grad_("lm" in trainable or "indexer" in trainable)


def wrap_ddp(module: torch.nn.Module, distributed_optimizer: bool):
    """megatron DDP around a module. Frozen modules are wrapped too (with empty grad buffers), so every rank
    takes part in the optimizer's collectives even when its pipeline stage has nothing to train."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)


def build_optimizer(ddp_chunks, optim: OptimConfig, dtype: torch.dtype, distributed_optimizer: bool):
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=distributed_optimizer,
    )
    return get_megatron_optimizer(config, ddp_chunks)


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warm-up to optim.lr, then decay to optim.min_lr by the last step."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay_style == DecayStyle.constant:
        return optim.lr
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    if optim.decay_style == DecayStyle.linear:
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer, ddp_chunks) -> tuple[bool, float]:
    """Collective: reduce the gradients over data parallelism, clip, update; returns (updated, grad norm)."""
    if ddp_chunks:
        finalize_model_grads(ddp_chunks)
    updated, grad_norm, _ = optimizer.step()
    return bool(updated), float(grad_norm) if grad_norm is not None else float("nan")
