"""Parameter counts of the whole model, by part, without allocating it: the real modules are built on the meta
device (shapes only, no storage) inside a throw-away 1-rank gloo group."""

from __future__ import annotations

import contextlib

import torch

from keye_train.config import ModelConfig, ParallelConfig

LM_PARTS = ("embedding", "attention", "indexer", "router", "experts", "norms", "output_head")


@contextlib.contextmanager
def single_rank_megatron():
    """A private 1-rank gloo world with megatron's groups (all of size 1), destroyed on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        raise RuntimeError(
            "count_parameters builds its own 1-rank process group; call it before "
            "torch.distributed is initialised (e.g. from `keye-train plan`)"
        )
    from parallel import cpu_compat

    cpu_compat.install_if_needed()  # megatron asks torch.cuda for a device while building
    from parallel.layout import init_single_process

    init_single_process("gloo")
    try:
        parallel_state.initialize_model_parallel()
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def build_on_meta(model: ModelConfig):
    """The unsharded LM (all stages) and vision tower, as meta tensors."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from keye_train.model.lm import build_lm, lm_transformer_config
    from keye_train.model.vision import VisionTower, vit_transformer_config

    with single_rank_megatron(), torch.device("meta"):
        lm = build_lm(
            model.lm,
            lm_transformer_config(model.lm, ParallelConfig(), torch.bfloat16, on_gpu=False),
            pre_process=True,
            post_process=True,
        )
        # In a 1-rank world megatron's own groups are the singleton groups the tower expects.
        vision = VisionTower(
            model,
            vit_transformer_config(model.vit, torch.bfloat16, on_gpu=False),
            ProcessGroupCollection.use_mpu_process_groups(),
        )
    return lm, vision


def lm_part_of(name: str) -> str:
    """Part of a megatron GPTModel parameter name (norm weights, QK norms included, count as norms)."""
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "output_head"
    if ".indexer." in name:
        return "indexer"
    if "layernorm" in name:
        return "norms"
    if ".mlp.router." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    if ".self_attention." in name:
        return "attention"
    raise ValueError(f"unclassified LM parameter {name}")


_COUNTS: dict[str, dict] = {}  # repr(ModelConfig) -> counts; a build takes seconds at full size


def _count(model: ModelConfig) -> dict:
    lm, vision = build_on_meta(model)
    lm_parts = dict.fromkeys(LM_PARTS, 0)
    for name, param in lm.named_parameters():
        lm_parts[lm_part_of(name)] += param.numel()
    vit = sum(p.numel() for p in vision.encoder.parameters())
    projector = sum(p.numel() for p in vision.projector.parameters())
    lm_total = sum(lm_parts.values())

    # Active per token: top-k of the experts; everything else of the LM counts in full,
    # embeddings and head included. The ViT is left out (it runs only on visual inputs).
    active_parts = dict(lm_parts)
    active_parts["experts"] = lm_parts["experts"] * model.lm.moe_topk // model.lm.num_experts
    return {
        "vit": vit,
        "projector": projector,
        "lm": lm_total,
        "total": vit + projector + lm_total,
        "lm_parts": lm_parts,
        "active": sum(active_parts.values()),
        "active_parts": active_parts,
    }


def count_parameters(model: ModelConfig) -> dict:
    """Parameter counts of the whole model (unsharded), split by part, plus active LM parameters per token.

    Keys: vit, projector, lm, total (ints); lm_parts and active_parts ({part: int} over LM_PARTS); active.
    """
    key = repr(model)
    if key not in _COUNTS:
        _COUNTS[key] = _count(model)
    result = _COUNTS[key]
    return {k: dict(v) if isinstance(v, dict) else v for k, v in result.items()}
