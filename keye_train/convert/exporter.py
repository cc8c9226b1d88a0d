"""Export a model under any layout as a Keye-VL-2.0 HF checkpoint: every canonical tensor gathered whole on
rank 0, written as sharded safetensors with their index and a config.json with our settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from keye_train.config import ModelConfig
from keye_train.convert.hf_names import keye_hf_tensors
from keye_train.model.builder import parameter_shards
from keye_train.model.sharding import join_shards


def hf_config(model: ModelConfig) -> dict:
    """config.json of an exported checkpoint: the Keye-VL-2.0 fields plus every setting we train with."""
    lm, vit, dsa = model.lm, model.vit, model.lm.dsa
    return {
        "model_type": "keye_vl2",
        "architectures": ["KeyeVL2ForConditionalGeneration"],
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen3_vl_moe_text",
            "hidden_size": lm.hidden_size,
            "num_hidden_layers": lm.num_layers,
            "num_attention_heads": lm.num_heads,
            "num_key_value_heads": lm.num_kv_heads,
            "head_dim": lm.head_dim,
            "num_experts": lm.num_experts,
            "num_experts_per_tok": lm.moe_topk,
            "moe_intermediate_size": lm.moe_ffn_hidden_size,
            "norm_topk_prob": True,
            "vocab_size": lm.vocab_size,
            "rms_norm_eps": lm.norm_eps,
            "rope_theta": lm.rope_theta,
            "max_position_embeddings": lm.max_position_embeddings,
            "rope_scaling": {"rope_type": "default", "mrope_section": list(lm.mrope_section)},
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": vit.hidden_size,
            "num_hidden_layers": vit.num_layers,
            "num_attention_heads": vit.num_heads,
            "intermediate_size": vit.ffn_hidden_size,
            "patch_size": vit.patch_size,
            "image_size": vit.patch_size * vit.pos_grid,
            "layer_norm_eps": vit.norm_eps,
            "rope_theta": vit.rope_theta,
        },
        "projector_config": {"merge_size": model.projector.merge, "layer_norm_eps": model.projector.norm_eps},
        "sa_config": {
            "mode": dsa.mode,
            "indexer_num_heads": dsa.index_heads,
            "indexer_head_dim": dsa.index_head_dim,
            "topk": dsa.topk,
        },
        "image_token_id": model.tokens.image_pad,
        "video_token_id": model.tokens.video_pad,
        "vision_start_token_id": model.tokens.vision_start,
        "vision_end_token_id": model.tokens.vision_end,
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
    mine = [
        (info.name, info.split, value_of(param).detach().to(device="cpu", dtype=dtype, copy=True))
        for param, info in parameter_shards(parts)
    ]
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
def export_keye_hf(
    parts,
    model: ModelConfig,
    dst: str | Path,
    passthrough: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 << 30,
) -> dict | None:
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
