"""Freezing, the megatron DDP + (distributed) optimizer wrapping, and the LR schedule."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import ChainedOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from keye_train.config import DecayStyle, OptimConfig, TrainablePart
from keye_train.model.builder import ModelParts
from keye_train.model.dsa import dsa_core_attentions


def apply_freezing(parts: ModelParts, trainable: list[TrainablePart]) -> None:
    """`lm` is the whole LM including its DSA indexers; `indexer` alone is the DSA warm-up's choice."""
    groups = {"lm": [parts.lm]} if parts.lm is not None else {}
    if parts.vision is not None:
        groups["vit"] = [parts.vision.encoder]
        groups["projector"] = [parts.vision.projector]
    for name, modules in groups.items():
        for module in modules:
            module.requires_grad_(name in trainable)
    if parts.lm is not None:
        for attention in dsa_core_attentions(parts.lm):
            attention.indexer.requires_grad_("lm" in trainable or "indexer" in trainable)


def wrap_ddp(module: torch.nn.Module, distributed_optimizer: bool, pg_collection=None):
    """megatron DDP around a module. Frozen modules are wrapped too (with empty grad buffers), so every rank
    takes part in the optimizer's collectives even when its pipeline stage has nothing to train.
    pg_collection: the module's own groups where megatron's global ones do not cover it (the split ViT ranks)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    chunk = DistributedDataParallel(
        config=module.config, ddp_config=ddp_config, module=module, pg_collection=pg_collection
    )
    chunk.own_groups = pg_collection  # finalize_grads and the optimizer use them instead of megatron's
    return chunk


def build_optimizer(ddp_chunks, optim: OptimConfig, dtype: torch.dtype, distributed_optimizer: bool):
    """One megatron optimizer over the chunks; over the groups of chunks with their own (see wrap_ddp)."""
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
    own_groups = ddp_chunks[0].own_groups
    return get_megatron_optimizer(
        config, ddp_chunks, use_gloo_process_groups=own_groups is None, pg_collection=own_groups
    )


def chain_optimizers(optimizers: list):
    """One megatron ChainedOptimizer over several (flattened); with different grad-stats groups it clips all of
    them by the root of their norms' squares."""
    flat = [inner for opt in optimizers for inner in getattr(opt, "chained_optimizers", [opt])]
    return ChainedOptimizer(flat)


class SharedNormOptimizer:
    """A megatron optimizer that clips by the gradient norm over every module of the world (placement=split:
    the LM's on its ranks, the ViT's on its own), so both modules scale alike.

    Each side computes its module's norm over its own groups (the same value on all of its ranks); a MAX
    all-reduce over the world of [LM norm^2, ViT norm^2] gives every rank both. Everything but `step` is the
    wrapped optimizer's."""

    def __init__(self, inner, hosts_lm: bool):
        self.inner, self.hosts_lm = inner, hosts_lm

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def global_norm(self, local: float, device) -> float:
        squares = torch.zeros(2, dtype=torch.float64, device=device)
        squares[0 if self.hosts_lm else 1] = float(local) ** 2
        dist.all_reduce(squares, op=dist.ReduceOp.MAX)
        return math.sqrt(float(squares.sum()))

    @torch.no_grad()
    def step(self):
        inner = self.inner
        if inner.prepare_grads():
            return False, None, None
        params = inner.get_parameters()
        device = params[0].device if params else torch.device("cpu")
        norm = self.global_norm(inner.get_grad_norm(), device)
        for optimizer in getattr(inner, "chained_optimizers", [inner]):
            own = optimizer.get_parameters()
            if own and optimizer.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(
                    own,
                    max_norm=optimizer.config.clip_grad,
                    total_norm=norm,
                    use_decoupled_grad=optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
        return inner.step_with_ready_grads(), norm, None


def finalize_grads(ddp_chunks) -> None:
    """Collective: reduce the gradients over data parallelism (megatron's finalize for chunks on its groups; the
    DP reduction alone for chunks with their own, which are unsharded)."""
    megatron_chunks = [c for c in ddp_chunks if getattr(c, "own_groups", None) is None]
    for chunk in ddp_chunks:
        if chunk not in megatron_chunks:
            chunk.finish_grad_sync()
    if megatron_chunks:
        finalize_model_grads(megatron_chunks)


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
        finalize_grads(ddp_chunks)
    updated, grad_norm, _ = optimizer.step()
    return bool(updated), float(grad_norm) if grad_norm is not None else float("nan")
