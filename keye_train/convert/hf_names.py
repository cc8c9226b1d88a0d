"""Our canonical tensors <-> Hugging Face checkpoint tensors (Keye-VL-2.0, Qwen3-MoE, SigLIP), as pure functions
on full tensors.

Canonical names are those of `keye_train.model.sharding` (global layer and expert numbers, "lm." / "vision."
prefixes). Three HF layouts are read: Keye-VL-2.0 (`keye_vl`: visual / mlp_AR / model / lm_head, fused experts
[E, in, out]), Qwen3-MoE (`qwen3_moe`: the LM only; experts per expert, or fused [E, out, in] as transformers 5
holds them) and SigLIP (`siglip`: the vision tower only). Exports always write the Keye-VL-2.0 layout.

Fusions undone here: megatron's linear_qkv holds, per KV group, its query heads' rows then its key and value
rows; expert fc1 is [gate; up] and fc2 is down, one tensor per expert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from keye_train.config import ModelConfig

VIT_PREFIX = {"keye_vl": "visual.vision_model.", "siglip": "vision_model."}
PACKING_TABLE = "visual.vision_model.embeddings.packing_position_embedding.weight"  # unused; carried through

# canonical suffix -> HF suffix, for tensors copied as they are
_LM_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "self_attention.core_attention.indexer.q_proj.weight": "self_attn.sa_indexer.q_proj.weight",
    "self_attention.core_attention.indexer.k_proj.weight": "self_attn.sa_indexer.k_proj.weight",
    "self_attention.core_attention.indexer.q_norm.weight": "self_attn.sa_indexer.q_norm.weight",
    "self_attention.core_attention.indexer.k_norm.weight": "self_attn.sa_indexer.k_norm.weight",
    "self_attention.core_attention.indexer.k_norm.bias": "self_attn.sa_indexer.k_norm.bias",
}
_LM_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_VIT_LAYER = {
    "input_layernorm": "layer_norm1",
    "pre_mlp_layernorm": "layer_norm2",
    "self_attention.linear_proj": "self_attn.out_proj",
    "mlp.linear_fc1": "mlp.fc1",
    "mlp.linear_fc2": "mlp.fc2",
}
_VIT_TOP = {
    "encoder.patch_weight": "embeddings.patch_embedding.weight",
    "encoder.patch_bias": "embeddings.patch_embedding.bias",
    "encoder.pos_table": "embeddings.position_embedding.weight",
    "encoder.blocks.final_layernorm.weight": "post_layernorm.weight",
    "encoder.blocks.final_layernorm.bias": "post_layernorm.bias",
}
_PROJECTOR = {"norm": "pre_norm", "linear_1": "linear_1", "linear_2": "linear_2"}

_LM_LAYER_RE = re.compile(r"^lm\.decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.expert_(\d+)\.linear_fc([12])\.weight$")
_VIT_LAYER_RE = re.compile(r"^vision\.encoder\.blocks\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class Source:
    """How to read one canonical tensor: the HF tensors it needs and how to combine them."""

    names: list[str]
    combine: Callable[..., torch.Tensor]  # called with the named tensors (expert tensors: already indexed)
    expert: int | None = None  # fused expert tensors: read only this expert's slice


def _qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.cat([torch.cat(parts) for parts in zip(q.chunk(groups), k.chunk(groups), v.chunk(groups))])


def _qkv_split(qkv: torch.Tensor, groups: int, heads_per_group: int) -> tuple[torch.Tensor, ...]:
    per_group = qkv.chunk(groups)
    rows = per_group[0].shape[0] // (heads_per_group + 2)
    q = torch.cat([g[: heads_per_group * rows] for g in per_group])
    k = torch.cat([g[heads_per_group * rows : (heads_per_group + 1) * rows] for g in per_group])
    v = torch.cat([g[(heads_per_group + 1) * rows :] for g in per_group])
    return q, k, v


def source_of(
    name: str, model: ModelConfig, layout: str, expert_format: str = "fused_in_out", vit_prefix: str | None = None
) -> Source:
    """Where canonical tensor `name` comes from in an HF checkpoint of this `layout`.

    expert_format: "fused_in_out" (Keye-VL, Qwen3-VL-MoE: [E, in, out]), "fused_out_in" (transformers 5's
    Qwen3-MoE: [E, out, in]) or "per_expert" (released Qwen3-MoE: experts.{j}.{gate,up,down}_proj).
    vit_prefix: where the vision tower's tensors start (default per layout; a bare SiglipVisionModel saved by
    transformers 5 has none)."""
    lm = model.lm
    if name.startswith("lm."):
        key = name[3:]
        if key in _LM_TOP:
            return Source([_LM_TOP[key]], lambda t: t)
        layer, rest = _LM_LAYER_RE.match(name).groups()
        base = f"model.layers.{layer}."
        if rest in _LM_LAYER:
            return Source([base + _LM_LAYER[rest]], lambda t: t)
        if rest == "self_attention.linear_qkv.weight":
            return Source(
                [base + f"self_attn.{p}_proj.weight" for p in "qkv"],
                lambda q, k, v: _qkv_fuse(q, k, v, lm.num_kv_heads),
            )
        expert, fc = _EXPERT_RE.match(rest).groups()
        expert = int(expert)
        if expert_format == "per_expert":
            e = f"{base}mlp.experts.{expert}."
            if fc == "1":
                return Source([e + "gate_proj.weight", e + "up_proj.weight"], lambda g, u: torch.cat([g, u]))
            return Source([e + "down_proj.weight"], lambda d: d)
        fused = base + ("mlp.experts.gate_up_proj" if fc == "1" else "mlp.experts.down_proj")
        flip = expert_format == "fused_in_out"
        return Source([fused], (lambda t: t.t()) if flip else (lambda t: t), expert=expert)
    if layout == "qwen3_moe":
        raise KeyError(f"{name}: a Qwen3-MoE checkpoint holds no vision tower")
    prefix = VIT_PREFIX[layout] if vit_prefix is None else vit_prefix
    if name.startswith("vision.projector."):
        part, kind = name[len("vision.projector.") :].split(".")
        if layout == "siglip":
            raise KeyError(f"{name}: a SigLIP checkpoint holds no projector")
        return Source([f"mlp_AR.{_PROJECTOR[part]}.{kind}"], lambda t: t)
    key = name[len("vision.") :]
    if key in _VIT_TOP:
        return Source([prefix + _VIT_TOP[key]], lambda t: t)
    layer, module, kind = _VIT_LAYER_RE.match(name).groups()
    base = f"{prefix}encoder.layers.{layer}."
    if module == "self_attention.linear_qkv":
        heads = model.vit.num_heads
        return Source([base + f"self_attn.{p}_proj.{kind}" for p in "qkv"], lambda q, k, v: _qkv_fuse(q, k, v, heads))
    return Source([f"{base}{_VIT_LAYER[module]}.{kind}"], lambda t: t)


def to_keye_hf(name: str, tensor: torch.Tensor, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The Keye-VL-2.0 HF tensors of one full canonical tensor; expert tensors come back keyed by the fused
    name with the expert number as a suffix ("...gate_up_proj#3"), for the writer to stack."""
    source = source_of(name, model, "keye_vl")
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        if name.startswith("lm."):
            groups, per_group = model.lm.num_kv_heads, model.lm.num_heads // model.lm.num_kv_heads
        else:
            groups, per_group = model.vit.num_heads, 1
        return dict(zip(source.names, _qkv_split(tensor, groups, per_group)))
    if source.expert is not None:
        return {f"{source.names[0]}#{source.expert}": tensor.t()}
    return {source.names[0]: tensor}


def stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn the "name#expert" entries of `to_keye_hf` into fused [E, ...] tensors."""
    out, experts = {}, {}
    for key, value in tensors.items():
        if "#" in key:
            fused, index = key.split("#")
            experts.setdefault(fused, {})[int(index)] = value
        else:
            out[key] = value
    for fused, parts in experts.items():
        out[fused] = torch.stack([parts[i] for i in range(len(parts))])
    return out


def keye_hf_tensors(full: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Full canonical tensors (name -> tensor) as Keye-VL-2.0 HF tensors, the experts stacked."""
    tensors = {}
    for name, tensor in full.items():
        tensors.update(to_keye_hf(name, tensor, model))
    return stack_experts(tensors)
