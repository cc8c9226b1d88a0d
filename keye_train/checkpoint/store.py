"""Checkpoints: one pickle-free file set per rank, published atomically.

Layout: <run_dir>/checkpoints/step_00000010/{rank_00000.npz, rank_00000.json, ..., meta.json}.
Each rank writes its own model shards, optimizer state and RNG as raw arrays (`np.savez`, read back with
`allow_pickle=False`) plus a JSON of plain values (step, data-loader state, run id). Ranks write into
`step_N.partial`; after a barrier rank 0 writes meta.json and renames the folder, so a folder without the
`.partial` suffix is always complete and a crash mid-save never becomes "latest". meta.json records the
parallel layout.

Each rank also writes `rank_N.shards.json`: which of its arrays holds which slice of which canonical tensor
(keye_train/model/sharding.py names, TP split). With it a weights-only start (`checkpoint.init_from`) loads into
any other layout: every rank reads only the arrays that hold its own parameters, joins their TP slices and cuts
its own. `rank_N.optim.json` does the same for the optimizer state (optimizer_shards.py), so a full resume
(`checkpoint.resume`) continues under another layout too, the data state regrouped for the new DP size by the data
source; a checkpoint without these indexes resumes only under its own layout.

Model tensors are keyed by megatron's state-dict names, which grouped and sequential MoE experts share
(keye_train/model/experts.py), so weights load into either. The optimizer state is kept per parameter, and the
two hold experts in different parameters, so a resume must use the implementation the checkpoint was written
with (meta.json records it; checkpoints without the field predate grouped experts and are sequential).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from keye_train.checkpoint.optimizer_shards import load_resharded_optimizer, optimizer_index
from keye_train.model.experts import experts_impl_of

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))
    if like.dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.to(like.device)


def _optimizer_slots(optimizer):
    """(key, torch optimizer, param) for every parameter of every inner optimizer, in a stable order."""
    if optimizer is None:  # a weights-only checkpoint (an imported model)
        return
    for k, wrapper in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = wrapper.optimizer
        for g, group in enumerate(inner.param_groups):
            for i, param in enumerate(group["params"]):
                yield f"optim.{k}.{g}.{i}", inner, param


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    """Every tensor the update depends on: main params and Adam moments of each inner optimizer."""
    out = {}
    for key, inner, param in _optimizer_slots(optimizer):
        out[f"{key}.param"] = param.data
        for name, value in inner.state.get(param, {}).items():
            out[f"{key}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer(optimizer, arrays) -> None:
    for key, inner, param in _optimizer_slots(optimizer):
        param.data.copy_(_from_numpy(arrays[f"{key}.param"], param.data))
        state = {}
        for name in ("step", "exp_avg", "exp_avg_sq"):
            if f"{key}.{name}" in arrays:
                like = param.data if name != "step" else torch.zeros((), dtype=torch.float32)
                state[name] = _from_numpy(arrays[f"{key}.{name}"], like)
        if state:
            inner.state[param] = state


def _model_tensors(parts) -> dict[str, torch.Tensor]:
    out = {}
    for part_name, module in (("lm", parts.lm), ("vision", parts.vision)):
        if module is not None:
            for name, value in module.state_dict().items():
                if torch.is_tensor(value):
                    out[f"model.{part_name}.{name}"] = value
    return out


def _shard_index(parts) -> dict | None:
    """canonical name -> {key, split, full_shape} for this rank's model arrays; None if some parameter is held by
    no state-dict tensor (then the checkpoint loads only into its own layout)."""
    from keye_train.model.builder import parameter_shards

    keys = {(t.data_ptr(), tuple(t.shape)): k for k, t in _model_tensors(parts).items()}
    index = {}
    for tensor, info in parameter_shards(parts):
        key = keys.get((tensor.data_ptr(), tuple(tensor.shape)))
        if key is None:
            return None
        index[info.name] = {"key": key, "split": info.split and list(info.split), "full_shape": list(info.full_shape)}
    return index


def _rng_tensors() -> dict[str, torch.Tensor]:
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
        for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
            rng[f"rng.tracker.{name}"] = state  # megatron's model-parallel streams (dropout, TP-aware init)
    return rng


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return max(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


def save(run_dir: Path, step: int, parts, optimizer, extra: dict, layout: dict, keep_last: int) -> Path:
    rank = dist.get_rank()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    arrays = {
        k: _to_numpy(v) for k, v in {**_model_tensors(parts), **optimizer_tensors(optimizer), **_rng_tensors()}.items()
    }
    with open(partial / f"rank_{rank:05d}.npz", "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    (partial / f"rank_{rank:05d}.json").write_text(json.dumps({"step": step, **extra}))
    index = _shard_index(parts)
    if index is not None:
        (partial / f"rank_{rank:05d}.shards.json").write_text(json.dumps(index))
        slots = optimizer_index(parts, optimizer)
        if slots is not None:
            (partial / f"rank_{rank:05d}.optim.json").write_text(json.dumps(slots))
    impls = [None] * dist.get_world_size()  # every LM rank builds the same; split's ViT ranks none
    dist.all_gather_object(impls, experts_impl_of(parts.lm))  # also: every rank's files are written
    if rank == 0:
        (partial / "meta.json").write_text(
            json.dumps(
                {
                    "step": step,
                    "world_size": dist.get_world_size(),
                    "layout": layout,
                    "experts_impl": next(impl for impl in impls if impl is not None),
                }
            )
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: p.name)
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_weights(source: str, parts, layout: dict) -> list[str]:
    """Weights-only start (a new stage) from a checkpoint directory or a run directory's latest checkpoint.

    Parameters the source lacks are allowed only for DSA indexers (a dense stage before the DSA warm-up); they
    keep their fresh initialisation. Returns the names of the parameters that were not loaded."""
    path = Path(source)
    if not (path / "meta.json").is_file():
        path = latest_checkpoint(path)
        if path is None:
            raise FileNotFoundError(f"checkpoint.init_from={source}: no complete checkpoint there")
    meta = json.loads((path / "meta.json").read_text())
    if meta["layout"] != layout:
        if not all((path / f"rank_{r:05d}.shards.json").is_file() for r in range(meta["world_size"])):
            raise RuntimeError(
                f"checkpoint.init_from={source} was written with layout {meta['layout']} and has no shard index "
                f"(rank_N.shards.json: written before resharding existed); this run uses {layout}: start from it "
                "with the same layout"
            )
        return _load_resharded(path, source, meta["world_size"], parts)
    fresh = []
    with np.load(path / f"rank_{dist.get_rank():05d}.npz", allow_pickle=False) as arrays:
        for key, tensor in _model_tensors(parts).items():
            if key in arrays.files:
                tensor.data.copy_(_from_numpy(arrays[key], tensor))
            elif ".indexer." in key:
                fresh.append(key)
            else:
                raise KeyError(f"checkpoint.init_from={source} has no tensor {key}")
    return fresh


def _load_resharded(path: Path, source: str, world: int, parts, allow_fresh: bool = True) -> list[str]:
    """Weights from a checkpoint of another layout: each local parameter's canonical tensor is rebuilt from the
    written TP slices (one data-parallel copy each), then cut for this rank."""
    from keye_train.model.builder import parameter_shards
    from keye_train.model.sharding import join_shards

    holders: dict[str, list] = {}
    for r in range(world):
        for name, entry in json.loads((path / f"rank_{r:05d}.shards.json").read_text()).items():
            holders.setdefault(name, []).append((r, entry))
    files: dict[int, np.lib.npyio.NpzFile] = {}

    def read(r: int, key: str, like: torch.Tensor) -> torch.Tensor:
        if r not in files:
            files[r] = np.load(path / f"rank_{r:05d}.npz", allow_pickle=False)
        return _from_numpy(files[r][key], like)

    fresh = []
    try:
        for tensor, info in parameter_shards(parts):
            pieces = holders.get(info.name)
            if not pieces:
                if allow_fresh and ".indexer." in info.name:
                    fresh.append(info.name)
                    continue
                raise KeyError(f"checkpoint {source} has no tensor {info.name}")
            split = pieces[0][1]["split"]
            if split is None:
                r, entry = pieces[0]
                full = read(r, entry["key"], tensor)
            else:
                dim, _, size, gated = split
                by_rank = {}
                for r, entry in pieces:
                    by_rank.setdefault(entry["split"][1], (r, entry["key"]))
                if len(by_rank) != size:
                    raise ValueError(f"checkpoint.init_from={source}: {info.name} has {len(by_rank)} of {size} slices")
                full = join_shards({k: read(r, key, tensor) for k, (r, key) in by_rank.items()}, dim, gated)
            if tuple(full.shape) != tuple(info.full_shape):
                raise ValueError(
                    f"checkpoint.init_from={source}: {info.name} is {tuple(full.shape)} there, "
                    f"{tuple(info.full_shape)} in this model"
                )
            tensor.data.copy_(info.cut(full))
    finally:
        for f in files.values():
            f.close()
    return fresh


def load(path: Path, parts, optimizer, layout: dict) -> dict:
    """Restore this rank's state in place; return its JSON extras (step, data state, ...).

    Under another layout than the checkpoint's (`_load_other_layout`) the extras hold `data_by_dp_rank`, the
    data state of every written DP rank, in place of `data`: the data source regroups them."""
    meta = json.loads((path / "meta.json").read_text())
    written, ours = meta.get("experts_impl", "sequential"), experts_impl_of(parts.lm)
    if ours is not None and written != ours:
        raise RuntimeError(
            f"checkpoint {path} was written with {written} MoE experts but this run builds {ours} "
            f"ones; the optimizer state does not carry over: resume with "
            f"model.lm.experts_impl={written} (or start from its weights with checkpoint.init_from)"
        )
    if meta["layout"] != layout:
        return _load_other_layout(path, meta, parts, optimizer, layout)
    rank = dist.get_rank()
    with np.load(path / f"rank_{rank:05d}.npz", allow_pickle=False) as arrays:
        for key, tensor in _model_tensors(parts).items():
            tensor.data.copy_(_from_numpy(arrays[key], tensor))
        if optimizer is not None:
            _load_optimizer(optimizer, arrays)
        _load_rng(arrays)
    return json.loads((path / f"rank_{rank:05d}.json").read_text())


def _load_rng(arrays) -> None:
    torch.set_rng_state(torch.from_numpy(np.array(arrays["rng.cpu"])))
    if torch.cuda.is_available() and "rng.cuda" in arrays.files:
        torch.cuda.set_rng_state(torch.from_numpy(np.array(arrays["rng.cuda"])))
        prefix = "rng.tracker."
        tracker = {k[len(prefix) :]: torch.from_numpy(np.array(arrays[k])) for k in arrays.files if prefix in k}
        if tracker:
            tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def _load_other_layout(path: Path, meta: dict, parts, optimizer, layout: dict) -> dict:
    """A resume under another layout: weights through the shard index, the fp32 main weights and Adam moments
    through the optimizer index (optimizer_shards.py), the step and counters from rank 0, the data state of every
    written DP rank (a split checkpoint's ViT ranks hold none). The RNG streams are this rank's number's (rank 0's
    if the old world was smaller)."""
    world = meta["world_size"]
    needed = [f"rank_{r:05d}.{kind}.json" for r in range(world) for kind in ("shards", "optim")]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise RuntimeError(
            f"checkpoint {path} was written with layout {meta['layout']} but this run uses {layout}, and it lacks "
            f"{missing[0]} (the index that maps its weights and optimizer state to other layouts: checkpoints "
            "written before cross-layout resume lack it); resume with the same layout, or start from its weights "
            "with checkpoint.init_from"
        )
    _load_resharded(path, str(path), world, parts, allow_fresh=False)
    if optimizer is not None:
        with _ArrayReader(path) as read:
            load_resharded_optimizer(path, world, parts, optimizer, read)
    rank = dist.get_rank()
    with np.load(path / f"rank_{rank if rank < world else 0:05d}.npz", allow_pickle=False) as a:
        _load_rng(a)
    extras = [json.loads((path / f"rank_{r:05d}.json").read_text()) for r in range(world)]
    by_dp_rank = {}
    for extra in extras:
        if extra["data"]:  # empty on ranks that read no data (placement=split's ViT ranks)
            by_dp_rank.setdefault(int(extra["data"].get("dp_rank", 0)), extra["data"])
    out = {k: v for k, v in extras[0].items() if k != "data"}
    out["data_by_dp_rank"] = [by_dp_rank[r] for r in sorted(by_dp_rank)]
    return out


class _ArrayReader:
    """read(rank, key) -> that rank's array as float32 (None when absent), opening each rank's file once and
    keeping the last few arrays (a slot read for several canonical pieces)."""

    def __init__(self, path: Path):
        self.path, self.files, self.recent = path, {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()

    def __call__(self, rank: int, key: str) -> torch.Tensor | None:
        if (rank, key) not in self.recent:
            if rank not in self.files:
                self.files[rank] = np.load(self.path / f"rank_{rank:05d}.npz", allow_pickle=False)
            if key not in self.files[rank].files:
                return None
            values = self.files[rank][key]
            if values.dtype != np.float32:
                raise ValueError(f"{self.path} rank {rank}: optimizer array {key} is {values.dtype}, not float32")
            if len(self.recent) >= 8:
                self.recent.pop(next(iter(self.recent)))
            self.recent[(rank, key)] = torch.from_numpy(np.array(values)).reshape(-1)
        return self.recent[(rank, key)]
