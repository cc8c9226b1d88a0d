"""The optimizer state in canonical terms, so a resume can move it to another layout exactly.

Each optimizer slot (one inner-optimizer parameter: a fp32 main weight with its Adam moments) covers a flat range
of one model parameter: the whole parameter, or with megatron's distributed optimizer the part of it this DP rank
owns. A model parameter holds one canonical tensor's TP slice, or several (grouped experts' stacked weights, one
per local expert). `rank_N.optim.json` records, per slot, the pieces of canonical tensors it holds:
[name, TP split (dim, slice index, slices, gated) or None, slice shape, offset in the slice, offset in the slot,
length] (flat elements).

Adam is elementwise, so a canonical tensor's main weight and moments rebuilt from these pieces and cut for another
layout are the state the other layout would hold after the same updates.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STATE_NAMES = ("param", "exp_avg", "exp_avg_sq")


def _wrappers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _main_param_ranges(wrapper) -> dict[int, tuple[torch.Tensor, int, int]]:
    """id(inner-optimizer parameter) -> (model parameter, start, end): the flat range of it the slot covers."""
    out = {}
    inner = wrapper.optimizer
    index_map = getattr(wrapper, "model_param_group_index_map", None)
    if index_map is not None and hasattr(wrapper, "_get_model_param_range_map"):  # distributed optimizer
        for model_param, (group, order) in index_map.items():
            main = inner.param_groups[group]["params"][order]
            span = wrapper._get_model_param_range_map(model_param)["param"]
            out[id(main)] = (model_param, span.start, span.end)
        return out
    for models, mains in zip(getattr(wrapper, "float16_groups", []), getattr(wrapper, "fp32_from_float16_groups", [])):
        for model_param, main in zip(models, mains):
            out[id(main)] = (model_param, 0, model_param.numel())
    for group in inner.param_groups:  # fp32 parameters are their own main weights
        for param in group["params"]:
            out.setdefault(id(param), (param, 0, param.numel()))
    return out


def _canonical_pieces(parts) -> dict[int, list[tuple]]:
    """model parameter storage -> [(name, TP split, slice shape, storage offset, numel)] of the canonical tensors
    in it."""
    from keye_train.model.builder import parameter_shards

    pieces: dict[tuple, list] = {}
    for tensor, info in parameter_shards(parts):
        if not tensor.is_contiguous():
            raise ValueError(f"{info.name}: a non-contiguous view cannot be mapped to optimizer ranges")
        pieces.setdefault(tensor.untyped_storage().data_ptr(), []).append(
            (info.name, info.split and list(info.split), list(tensor.shape), tensor.storage_offset(), tensor.numel())
        )
    return pieces


def _slots(optimizer):
    for k, wrapper in enumerate(_wrappers(optimizer)):
        ranges = _main_param_ranges(wrapper)
        inner = wrapper.optimizer
        for g, group in enumerate(inner.param_groups):
            for i, main in enumerate(group["params"]):
                yield f"optim.{k}.{g}.{i}", inner, main, ranges[id(main)]


def _slot_pieces(model_param, start: int, end: int, pieces: dict) -> list[list] | None:
    """The canonical pieces inside [start, end) of model_param: [name, split, shape, slice offset, slot offset, n]."""
    base = model_param.storage_offset()
    out = []
    for name, index, shape, offset, numel in pieces.get(model_param.untyped_storage().data_ptr(), []):
        lo, hi = max(start, offset - base), min(end, offset - base + numel)
        if lo < hi:
            out.append([name, index, shape, lo - (offset - base), lo - start, hi - lo])
    return out if sum(p[5] for p in out) == end - start else None


def optimizer_index(parts, optimizer) -> dict | None:
    """slot key -> its canonical pieces; None if some slot holds elements of no canonical tensor."""
    if optimizer is None:
        return None
    pieces = _canonical_pieces(parts)
    index = {}
    for key, _inner, _main, (model_param, start, end) in _slots(optimizer):
        found = _slot_pieces(model_param, start, end, pieces)
        if found is None:
            return None
        index[key] = found
    return index


def load_resharded_optimizer(path: Path, world: int, parts, optimizer, read) -> None:
    """Fill this rank's slots from a checkpoint of another layout. read(rank, key) -> that rank's array as a
    float32 tensor; only the ranks holding pieces of this rank's canonical tensors are read."""
    from keye_train.model.builder import parameter_shards
    from keye_train.model.sharding import join_shards

    holders: dict[str, list] = {}
    for r in range(world):
        for key, found in json.loads((path / f"rank_{r:05d}.optim.json").read_text()).items():
            for name, split, shape, at, slot_at, n in found:
                holders.setdefault(name, []).append((r, key, split, shape, at, slot_at, n))
    infos = {info.name: info for _tensor, info in parameter_shards(parts)}
    pieces = _canonical_pieces(parts)

    def rebuild(name: str, state: str) -> torch.Tensor | None:
        """The canonical tensor `name`'s `state`, whole, from the written slices' flat pieces (one copy of each
        element: pieces already covered by a lower rank's are not read)."""
        flats, shapes, spans = {}, {}, {}
        written_split = holders[name][0][2]  # the checkpoint's TP split of this tensor
        for r, key, split, shape, at, slot_at, n in holders[name]:
            index = split and split[1]
            if _covered(spans.get(index, []), at, at + n):
                continue  # a data-parallel copy of elements already read
            values = read(r, f"{key}.{state}")
            if values is None:
                return None  # no update yet: the optimizer has no moments
            flats.setdefault(index, torch.empty(torch.Size(shape).numel()))[at : at + n] = values[slot_at : slot_at + n]
            shapes[index] = shape
            spans.setdefault(index, []).append((at, at + n))
        for index, flat in flats.items():
            if not _covered(spans[index], 0, flat.numel()):
                raise ValueError(f"checkpoint {path}: the optimizer pieces of {name} (slice {index}) leave a gap")
        tensors = {index: flat.view(shapes[index]) for index, flat in flats.items()}
        if written_split is None:
            return next(iter(tensors.values()))
        dim, _rank, size, gated = written_split
        if len(tensors) != size:
            raise ValueError(f"checkpoint {path}: {name} has {len(tensors)} of {size} optimizer slices")
        full = join_shards(tensors, dim, gated)
        if tuple(full.shape) != tuple(infos[name].full_shape):
            raise ValueError(f"checkpoint {path}: {name} is {tuple(full.shape)} there, {infos[name].full_shape} here")
        return full

    for _key, inner, main, (model_param, start, end) in _slots(optimizer):
        state = {}
        for name, _index, _shape, at, slot_at, n in _slot_pieces(model_param, start, end, pieces):
            if name not in holders:
                raise KeyError(f"checkpoint {path} holds no optimizer state for {name}")
            for state_name in STATE_NAMES:
                whole = rebuild(name, state_name)
                if whole is None:
                    continue
                whole = infos[name].cut(whole).reshape(-1)
                target = main.data if state_name == "param" else state.setdefault(state_name, torch.zeros_like(main))
                target.view(-1)[slot_at : slot_at + n] = whole[at : at + n].to(target.dtype)
            r, old_key = holders[name][0][:2]
            step = read(r, f"{old_key}.step")
            if step is not None:
                state["step"] = step.reshape(()).clone()  # Adam counts it in place: one per slot
        if state:
            inner.state[main] = state


def _covered(spans: list, lo: int, hi: int) -> bool:
    """Whether the union of spans covers [lo, hi)."""
    at = lo
    for a, b in sorted(spans):
        if a > at:
            break
        at = max(at, b)
    return at >= hi
