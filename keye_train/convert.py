"""Import Hugging Face checkpoints into a built (sharded) model, and export it as a Keye-VL-2.0 HF checkpoint.

Import streams: every rank walks its own parameter shards (`parameter_shards`), reads from the safetensors
files only the HF tensors each one needs (a fused expert tensor by its one expert's slice), combines them into
the canonical tensor (keye_train/hf_names.py) and copies its shard. The full model is never in memory.
Export writes sharded safetensors, their index and a config.json with our settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from keye_train.config import ModelConfig
from keye_train.hf_names import PACKING_TABLE, keye_hf_tensors, source_of
from keye_train.model.builder import parameter_shards
from keye_train.model.sharding import join_shards


class HFCheckpoint:
    """The tensors of an HF checkpoint folder (one model.safetensors or an index of shards), read lazily."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.root / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.root / "model.safetensors").is_file():
            with safe_open(self.root / "model.safetensors", framework="pt") as f:
                self.files = {k: self.root / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.root}: no model.safetensors or model.safetensors.index.json")
        config = self.root / "config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}
        self._open: dict[Path, object] = {}  # a few open files: a closed one releases its mapped pages
        self.read: set[str] = set()

    def _handle(self, name: str):
        if name not in self.files:
            raise KeyError(f"{self.root}: tensor {name} is missing")
        path = self.files[name]
        if path not in self._open:
            if len(self._open) >= 2:
                self._open.pop(next(iter(self._open)))
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        self.read.add(name)
        if index is None:
            return self._handle(name).get_tensor(name)
        return self._handle(name).get_slice(name)[index]

    def layout(self) -> str:
        kind = self.config.get("model_type", "")
        if kind == "qwen3_moe":
            return "qwen3_moe"
        if kind.startswith("siglip"):
            return "siglip"
        return "keye_vl"

    def vit_prefix(self) -> str | None:
        if self.layout() == "siglip" and not any(k.startswith("vision_model.") for k in self.files):
            return ""  # a bare SiglipVisionModel
        return None

    def expert_format(self) -> str:
        if any(".mlp.experts.0.gate_proj.weight" in k for k in self.files):
            return "per_expert"
        return "fused_out_in" if self.layout() == "qwen3_moe" else "fused_in_out"


def _part_in(layout: str, name: str) -> bool:
    if layout == "qwen3_moe":
        return name.startswith("lm.")
    if layout == "siglip":
        return name.startswith("vision.") and not name.startswith("vision.projector.")
    return True


@torch.no_grad()
def import_hf(parts, model: ModelConfig, src: str | Path, log=lambda line: None, progress: bool = False) -> dict:
    """Load this rank's shards from the HF checkpoint at `src`; returns {loaded, kept, unused, sha256}."""
    ckpt = HFCheckpoint(src)
    layout, experts, prefix = ckpt.layout(), ckpt.expert_format(), ckpt.vit_prefix()
    digest, loaded, kept = hashlib.sha256(), 0, []
    shards = list(parameter_shards(parts))
    show = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    for param, info in tqdm(shards, desc=f"import {Path(src).name}", unit="tensor", disable=not show):
        if not _part_in(layout, info.name):
            kept.append(info.name)  # e.g. the projector and ViT when importing a Qwen3-MoE LM
            continue
        source = source_of(info.name, model, layout, experts, prefix)
        full = source.combine(*[ckpt.get(n, source.expert) for n in source.names])
        if tuple(full.shape) != tuple(info.full_shape):
            raise ValueError(f"{info.name} from {source.names}: shape {tuple(full.shape)}, the model expects "
                             f"{tuple(info.full_shape)}; is model.* the checkpoint's configuration?")
        shard = info.cut(full).to(param.dtype)
        param.copy_(shard)
        digest.update(info.name.encode())
        digest.update(shard.contiguous().view(torch.uint8).numpy())  # the bytes in place, no copy
        loaded += 1
    unused = sorted(set(ckpt.files) - ckpt.read)
    log(f"imported {loaded} tensors from {src} ({layout}, experts {experts}); kept {len(kept)}; "
        f"unused in the checkpoint: {len(unused)}")
    return {"loaded": loaded, "kept": kept, "unused": unused, "sha256": digest.hexdigest()}


def hf_config(model: ModelConfig) -> dict:
    """config.json of an exported checkpoint: the Keye-VL-2.0 fields plus every setting we train with."""
    lm, vit, dsa = model.lm, model.vit, model.lm.dsa
    return {
        "model_type": "keye_vl2", "architectures": ["KeyeVL2ForConditionalGeneration"], "torch_dtype": "bfloat16",
        "text_config": {"model_type": "qwen3_vl_moe_text", "hidden_size": lm.hidden_size,
                        "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads,
                        "num_key_value_heads": lm.num_kv_heads, "head_dim": lm.head_dim,
                        "num_experts": lm.num_experts, "num_experts_per_tok": lm.moe_topk,
                        "moe_intermediate_size": lm.moe_ffn_hidden_size, "norm_topk_prob": True,
                        "vocab_size": lm.vocab_size, "rms_norm_eps": lm.norm_eps, "rope_theta": lm.rope_theta,
                        "max_position_embeddings": lm.max_position_embeddings,
                        "rope_scaling": {"rope_type": "default", "mrope_section": list(lm.mrope_section)},
                        "tie_word_embeddings": False},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": vit.hidden_size,
                          "num_hidden_layers": vit.num_layers, "num_attention_heads": vit.num_heads,
                          "intermediate_size": vit.ffn_hidden_size, "patch_size": vit.patch_size,
                          "image_size": vit.patch_size * vit.pos_grid, "layer_norm_eps": vit.norm_eps,
                          "rope_theta": vit.rope_theta},
        "projector_config": {"merge_size": model.projector.merge, "layer_norm_eps": model.projector.norm_eps},
        "sa_config": {"mode": dsa.mode, "indexer_num_heads": dsa.index_heads,
                      "indexer_head_dim": dsa.index_head_dim, "topk": dsa.topk},
        "image_token_id": model.tokens.image_pad, "video_token_id": model.tokens.video_pad,
        "vision_start_token_id": model.tokens.vision_start, "vision_end_token_id": model.tokens.vision_end,
    }


def write_sharded(tensors: dict[str, torch.Tensor], dst: Path, max_shard_bytes: int) -> dict:
    """model-0000i-of-0000n.safetensors and model.safetensors.index.json; returns the index."""
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensors[name].contiguous(), size + nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / file), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return index


@torch.no_grad()
def gather_full_tensors(parts, dtype: torch.dtype, value_of=lambda param: param) -> dict[str, torch.Tensor] | None:
    """Collective: every canonical tensor whole on rank 0 (TP shards joined, PP stages and EP experts merged,
    DP replicas taken once); None elsewhere. Rank 0 then holds the whole model in host memory. `value_of` picks
    what is gathered per parameter (the parameter itself, or e.g. its gradient)."""
    # copy=True: a view into a DDP buffer would otherwise send the whole buffer with every tensor
    mine = [(info.name, info.split, value_of(param).detach().to(device="cpu", dtype=dtype, copy=True))
            for param, info in parameter_shards(parts)]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {name: tensor for name, _, tensor in mine}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    whole, pieces = {}, {}
    for rank_entries in gathered:
        for name, split, tensor in rank_entries:
            if split is None:
                whole.setdefault(name, tensor)
            else:
                dim, rank, _, gated = split
                pieces.setdefault(name, (dim, gated, {}))[2].setdefault(rank, tensor)
    for name, (dim, gated, shards) in pieces.items():
        whole[name] = join_shards(shards, dim, gated)
    return whole


@torch.no_grad()
def export_keye_hf(parts, model: ModelConfig, dst: str | Path, passthrough: dict[str, torch.Tensor] | None = None,
                   dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 << 30) -> dict | None:
    """Collective: write the model, under any layout, as a Keye-VL-2.0 HF checkpoint at `dst` (from rank 0)."""
    full = gather_full_tensors(parts, dtype)
    if full is None:
        return None
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = keye_hf_tensors(full, model)
    for name, tensor in (passthrough or {}).items():
        tensors[name] = tensor.to(dtype)
    index = write_sharded(tensors, dst, max_shard_bytes)
    (dst / "config.json").write_text(json.dumps(hf_config(model), indent=1))
    return index


def passthrough_tensors(src: str | Path) -> dict[str, torch.Tensor]:
    """Checkpoint tensors we do not model but carry through a round trip (the unused ViT packing table)."""
    ckpt = HFCheckpoint(src)
    return {PACKING_TABLE: ckpt.get(PACKING_TABLE)} if PACKING_TABLE in ckpt.files else {}


_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "F8_E4M3": 1, "F8_E5M2": 1}


def import_plan(model: ModelConfig, sizes, src: str | Path) -> dict:
    """What each rank of a layout would read, from the checkpoint headers and a meta-device build (no tensor
    data is read or allocated). Checks every needed tensor exists with the right element count.

    Returns {"roles": {(pp_stage, ep_rank): {"tensors": n, "bytes": b}}, "unused": [...]}: every TP and data-
    parallel rank of a role reads the same tensors (each takes its shard of the full tensor)."""
    from keye_train.model.sharding import canonical_shards
    from keye_train.plan import _build_on_meta

    ckpt = HFCheckpoint(src)
    layout, experts, prefix = ckpt.layout(), ckpt.expert_format(), ckpt.vit_prefix()
    lm, vision = _build_on_meta(model)
    shards = [*canonical_shards(lm, "lm.", None, None, gated_mlp=True), *canonical_shards(vision, "vision.", None)]
    per_stage, per_expert = model.lm.num_layers // sizes.pp, model.lm.num_experts // sizes.ep
    roles = {(s, r): {"tensors": 0, "bytes": 0} for s in range(sizes.pp) for r in range(sizes.ep)}
    headers: dict[Path, object] = {}
    for _, info in shards:
        if not _part_in(layout, info.name):
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
            raise ValueError(f"{info.name}: the checkpoint's {source.names} hold {elements} elements, the model "
                             f"expects {tuple(info.full_shape)}; is model.* the checkpoint's configuration?")
        layer = re.match(r"lm\.decoder\.layers\.(\d+)\.", info.name)
        stage = (int(layer.group(1)) // per_stage if layer else
                 sizes.pp - 1 if info.name.startswith(("lm.output_layer", "lm.decoder.final_layernorm")) else 0)
        expert = re.search(r"\.expert_(\d+)\.", info.name)
        for (s, r), role in roles.items():
            if s == stage and (expert is None or int(expert.group(1)) // per_expert == r):
                role["tensors"] += 1
                role["bytes"] += nbytes
    return {"roles": roles, "unused": sorted(set(ckpt.files) - ckpt.read)}
