"""Import an HF checkpoint into a built (sharded) model, streaming: every rank walks its own parameter shards
(`parameter_shards`), reads from the safetensors files only the HF tensors each one needs (a fused expert tensor
by its one expert's slice), combines them into the canonical tensor (hf_names.py) and copies its shard. The full
model is never in memory. `import_plan` says what each rank would read, from the headers alone."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from keye_train.config import ModelConfig
from keye_train.convert.hf_checkpoint import HFCheckpoint, holds_part
from keye_train.convert.hf_names import source_of
from keye_train.model.builder import parameter_shards


@torch.no_grad()
def import_hf(parts, model: ModelConfig, src: str | Path, log=lambda line: None, progress: bool = False) -> dict:
    """Load this rank's shards from the HF checkpoint at `src`; returns {loaded, kept, unused, sha256}."""
    ckpt = HFCheckpoint(src)
    layout, experts, prefix = ckpt.layout(), ckpt.expert_format(), ckpt.vit_prefix()
    digest, loaded, kept = hashlib.sha256(), 0, []
    shards = list(parameter_shards(parts))
    show = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    for param, info in tqdm(shards, desc=f"import {Path(src).name}", unit="tensor", disable=not show):
        if not holds_part(layout, info.name):
            kept.append(info.name)  # e.g. the projector and ViT when importing a Qwen3-MoE LM
            continue
        source = source_of(info.name, model, layout, experts, prefix)
        full = source.combine(*[ckpt.get(n, source.expert) for n in source.names])
        if tuple(full.shape) != tuple(info.full_shape):
            raise ValueError(
                f"{info.name} from {source.names}: shape {tuple(full.shape)}, the model expects "
                f"{tuple(info.full_shape)}; is model.* the checkpoint's configuration?"
            )
        shard = info.cut(full).to(param.dtype)
        param.copy_(shard)
        digest.update(info.name.encode())
        digest.update(shard.contiguous().view(torch.uint8).numpy())  # the bytes in place, no copy
        loaded += 1
    unused = sorted(set(ckpt.files) - ckpt.read)
    log(
        f"imported {loaded} tensors from {src} ({layout}, experts {experts}); kept {len(kept)}; "
        f"unused in the checkpoint: {len(unused)}"
    )
    return {"loaded": loaded, "kept": kept, "unused": unused, "sha256": digest.hexdigest()}


_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "F8_E4M3": 1, "F8_E5M2": 1}


def import_plan(model: ModelConfig, sizes, src: str | Path) -> dict:
    """What each rank of a layout would read, from the checkpoint headers and a meta-device build (no tensor
    data is read or allocated). Checks every needed tensor exists with the right element count.

    Returns {"roles": {(pp_stage, ep_rank): {"tensors": n, "bytes": b}}, "unused": [...]}: every TP and data-
    parallel rank of a role reads the same tensors (each takes its shard of the full tensor)."""
    from keye_train.model.sharding import canonical_shards
    from keye_train.planning.parameters import build_on_meta

    ckpt = HFCheckpoint(src)
    layout, experts, prefix = ckpt.layout(), ckpt.expert_format(), ckpt.vit_prefix()
    lm, vision = build_on_meta(model)
    shards = [*canonical_shards(lm, "lm.", None, None, gated_mlp=True), *canonical_shards(vision, "vision.", None)]
    per_stage, per_expert = model.lm.num_layers // sizes.pp, model.lm.num_experts // sizes.ep
    roles = {(s, r): {"tensors": 0, "bytes": 0} for s in range(sizes.pp) for r in range(sizes.ep)}
    headers: dict[Path, object] = {}
    for _, info in shards:
        if not holds_part(layout, info.name):
            continue
        source = source_of(info.name, model, layout, experts, prefix)
        elements, nbytes = 0, 0
        for name in source.names:
            if name not in ckpt.files:
                raise KeyError(f"{src}: tensor {name} (for {info.name}) is missing")
            path = ckpt.files[name]
            headers.setdefault(path, safe_open(path, framework="pt"))
            piece = headers[path].get_slice(name)
            shape = piece.get_shape()[1:] if source.expert is not None else piece.get_shape()
            count = math.prod(shape)
            elements, nbytes = elements + count, nbytes + count * _BYTES.get(piece.get_dtype(), 4)
            ckpt.read.add(name)
        if elements != math.prod(info.full_shape):
            raise ValueError(
                f"{info.name}: the checkpoint's {source.names} hold {elements} elements, the model "
                f"expects {tuple(info.full_shape)}; is model.* the checkpoint's configuration?"
            )
        layer = re.match(r"lm\.decoder\.layers\.(\d+)\.", info.name)
        stage = (
            int(layer.group(1)) // per_stage
            if layer
            else sizes.pp - 1
            if info.name.startswith(("lm.output_layer", "lm.decoder.final_layernorm"))
            else 0
        )
        expert = re.search(r"\.expert_(\d+)\.", info.name)
        for (s, r), role in roles.items():
            if s == stage and (expert is None or int(expert.group(1)) // per_expert == r):
                role["tensors"] += 1
                role["bytes"] += nbytes
    return {"roles": roles, "unused": sorted(set(ckpt.files) - ckpt.read)}
