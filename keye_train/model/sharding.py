"""Map each local parameter shard to its canonical full tensor, whatever the TP/PP/EP layout.

A canonical name uses global layer and expert numbers, so the same name denotes the same tensor under every
layout. `local_slice` cuts a rank's shard out of the full tensor exactly as megatron shards it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_layer import TransformerLayer


@dataclass
class ShardInfo:
    name: str  # canonical name
    full_shape: tuple[int, ...]
    cut: Callable[[torch.Tensor], torch.Tensor]  # full tensor -> this rank's shard
    split: tuple | None = None  # (dim, rank, size, gated) when the tensor is split over a TP group


def join_shards(shards: dict[int, torch.Tensor], dim: int, gated: bool) -> torch.Tensor:
    """The inverse of the cuts: TP rank -> shard back to the full tensor."""
    ordered = [shards[r] for r in sorted(shards)]
    if gated:  # each shard is [gate_r; up_r]
        halves = [s.chunk(2, dim=dim) for s in ordered]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)],
                         dim=dim)
    return torch.cat(ordered, dim=dim)


def mark_tensor_parallel_attributes(module: torch.nn.Module) -> None:
    """Set the TP attributes megatron sets only when it initialises weights itself (we skip that, see init.py).
    DDP, the grad norm and `canonical_shards` rely on them."""
    for sub in module.modules():
        if isinstance(sub, (VocabParallelEmbedding, ColumnParallelLinear)):
            targets = [(sub.weight, 0), (getattr(sub, "bias", None), 0)]
        elif isinstance(sub, RowParallelLinear):
            targets = [(sub.weight, 1)]
        else:
            continue
        # A size-1 group holds a full replica (the ViT under LM TP), except for experts, which megatron
        # always treats as parallel: they are distinct per EP rank and its expert grad norm relies on it.
        sharded = getattr(sub, "is_expert", False) or _group_rank_size(sub.tp_group)[1] > 1
        for param, dim in targets:
            if isinstance(param, torch.nn.Parameter) and not hasattr(param, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(param, is_parallel=sharded, dim=dim, stride=1)


def _group_rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _shard_cut(param: torch.nn.Parameter, rank: int, size: int, gated: bool) -> tuple[tuple, Callable, tuple | None]:
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return tuple(param.shape), lambda full: full, None
    dim = param.partition_dim
    full_shape = list(param.shape)
    full_shape[dim] *= size
    if gated:  # SwiGLU fc1 = [gate; up]; each rank holds [gate_r; up_r]
        def cut(full):
            gate, up = full.chunk(2, dim=dim)
            return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    else:
        def cut(full):
            return full.chunk(size, dim=dim)[rank]
    return tuple(full_shape), cut, (dim, rank, size, gated)


def _prefix_maps(module: torch.nn.Module) -> tuple[dict[str, int], dict[str, list[int]]]:
    layers, experts = {}, {}
    for name, sub in module.named_modules():
        if isinstance(sub, TransformerLayer):
            layers[name + "."] = sub.layer_number - 1
        if isinstance(sub, MoELayer):
            experts[name + ".experts.local_experts."] = list(sub.local_expert_indices)
    return layers, experts


def canonical_shards(module: torch.nn.Module, prefix: str, tp_group, expert_tp_group=None,
                     gated_mlp: bool = False) -> Iterator[tuple[torch.nn.Parameter, ShardInfo]]:
    """Yield (local parameter, ShardInfo) for every parameter of an unwrapped megatron module."""
    layers, experts = _prefix_maps(module)
    for name, param in module.named_parameters():
        canonical = name
        for layer_prefix, global_index in layers.items():
            if name.startswith(layer_prefix):
                local = layer_prefix.rsplit(".", 2)[-2]
                canonical = re.sub(rf"layers\.{local}\.", f"layers.{global_index}.", name, count=1)
                break
        is_expert = False
        for expert_prefix, indices in experts.items():
            if name.startswith(expert_prefix):
                local = int(name[len(expert_prefix):].split(".", 1)[0])
                canonical = canonical.replace(f"local_experts.{local}.", f"expert_{indices[local]}.", 1)
                is_expert = True
                break
        group = expert_tp_group if is_expert else tp_group
        rank, size = _group_rank_size(group)
        gated = gated_mlp and name.endswith("linear_fc1.weight")
        full_shape, cut, split = _shard_cut(param, rank, size, gated)
        yield param, ShardInfo(prefix + canonical, full_shape, cut, split)
