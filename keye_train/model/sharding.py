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

from keye_train.model.experts import GroupedExperts


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
        return torch.cat(
            [torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)], dim=dim
        )
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


def _shard_cut(
    shape: tuple[int, ...], parallel: bool, dim: int, rank: int, size: int, gated: bool
) -> tuple[tuple, Callable, tuple | None]:
    if size == 1 or not parallel:
        return tuple(shape), lambda full: full, None
    full_shape = list(shape)
    full_shape[dim] *= size
    if gated:  # SwiGLU fc1 = [gate; up]; each rank holds [gate_r; up_r]

        def cut(full):
            gate, up = full.chunk(2, dim=dim)
            return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    else:

        def cut(full):
            return full.chunk(size, dim=dim)[rank]

    return tuple(full_shape), cut, (dim, rank, size, gated)


def _param_cut(param: torch.nn.Parameter, rank: int, size: int, gated: bool):
    parallel = getattr(param, "tensor_model_parallel", False)
    return _shard_cut(tuple(param.shape), parallel, getattr(param, "partition_dim", 0), rank, size, gated)


def _expert_slice(param: torch.nn.Parameter, index: int) -> torch.Tensor:
    """Expert `index` of a stacked [experts, out, in] weight: a view (writes land in the weight) carrying the
    matching slices of its .grad and .main_grad as they are now."""
    view = param.detach()[index]
    for attr in ("grad", "main_grad"):
        value = getattr(param, attr, None)
        if value is not None:
            setattr(view, attr, value[index])
    return view


def _prefix_maps(module: torch.nn.Module):
    layers, experts, stacked = {}, {}, {}
    for name, sub in module.named_modules():
        if isinstance(sub, TransformerLayer):
            layers[name + "."] = sub.layer_number - 1
        if isinstance(sub, MoELayer):
            if isinstance(sub.experts, GroupedExperts):
                stacked[name + ".experts."] = (sub.experts, list(sub.local_expert_indices))
            else:
                experts[name + ".experts.local_experts."] = list(sub.local_expert_indices)
    return layers, experts, stacked


def _global_layer_name(name: str, layers: dict[str, int]) -> str:
    for layer_prefix, global_index in layers.items():
        if name.startswith(layer_prefix):
            local = layer_prefix.rsplit(".", 2)[-2]
            return re.sub(rf"layers\.{local}\.", f"layers.{global_index}.", name, count=1)
    return name


def canonical_shards(
    module: torch.nn.Module, prefix: str, tp_group, expert_tp_group=None, gated_mlp: bool = False
) -> Iterator[tuple[torch.Tensor, ShardInfo]]:
    """Yield (local parameter, ShardInfo) for every parameter of an unwrapped megatron module. Grouped experts
    yield one view of their stacked weights per local expert, named and ordered as SequentialMLP's experts."""
    layers, experts, stacked = _prefix_maps(module)
    done = set()
    for name, param in module.named_parameters():
        group_prefix = next((p for p in stacked if name.startswith(p)), None)
        if group_prefix is not None:
            if group_prefix not in done:
                done.add(group_prefix)
                experts_prefix = prefix + _global_layer_name(group_prefix, layers)
                yield from _grouped_expert_shards(*stacked[group_prefix], experts_prefix, expert_tp_group, gated_mlp)
            continue
        canonical = _global_layer_name(name, layers)
        is_expert = False
        for expert_prefix, indices in experts.items():
            if name.startswith(expert_prefix):
                local = int(name[len(expert_prefix) :].split(".", 1)[0])
                canonical = canonical.replace(f"local_experts.{local}.", f"expert_{indices[local]}.", 1)
                is_expert = True
                break
        group = expert_tp_group if is_expert else tp_group
        rank, size = _group_rank_size(group)
        gated = gated_mlp and name.endswith("linear_fc1.weight")
        full_shape, cut, split = _param_cut(param, rank, size, gated)
        yield param, ShardInfo(prefix + canonical, full_shape, cut, split)


def _grouped_expert_shards(experts, indices: list[int], name_prefix: str, expert_tp_group, gated_mlp: bool):
    """Expert by expert, fc1 then fc2, each a view of the stacked weight cut like one SequentialMLP expert's."""
    rank, size = _group_rank_size(expert_tp_group)
    for local, global_index in enumerate(indices):
        for linear in ("linear_fc1", "linear_fc2"):
            weight = getattr(experts, linear).weight
            dim = weight.partition_dim - 1  # in one expert's [out, in]
            full_shape, cut, split = _shard_cut(
                tuple(weight.shape[1:]), True, dim, rank, size, gated_mlp and linear == "linear_fc1"
            )
            yield (
                _expert_slice(weight, local),
                ShardInfo(f"{name_prefix}expert_{global_index}.{linear}.weight", full_shape, cut, split),
            )
