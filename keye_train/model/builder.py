"""Build this rank's model parts (LM pipeline chunk and, where placed, the vision tower) and initialise them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from keye_train.config import Fusion, ModelConfig, ParallelConfig
from keye_train.model import init as model_init
from keye_train.model.lm import build_lm, lm_transformer_config
from keye_train.model.sharding import canonical_shards, mark_tensor_parallel_attributes
from keye_train.model.vision import VisionTower, vit_transformer_config


@dataclass
class ModelParts:
    lm: torch.nn.Module | None  # None on the ViT's own ranks (placement=split)
    vision: torch.nn.Module | None  # None on ranks that do not host the vision tower

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.lm, self.vision) if m is not None]


def vision_recompute(par: ParallelConfig) -> str:
    return par.vision.recompute if par.vision.recompute is not None else par.recompute


def build_model(model: ModelConfig, par: ParallelConfig, dtype: torch.dtype, on_gpu: bool, placement) -> ModelParts:
    """This rank's parts under `placement` (parallel/placement.py), which also gives the vision tower its groups."""
    fused = on_gpu and model.fusion == Fusion.auto
    lm = None
    if placement.hosts_lm():  # placement=split: the ViT's own ranks hold no LM
        lm_config = lm_transformer_config(model.lm, par, dtype, on_gpu, fused)
        lm = build_lm(
            model.lm, lm_config, pre_process=placement.is_first_stage(), post_process=placement.is_last_stage()
        )
    vision = None
    if placement.hosts_vision():
        vit_config = vit_transformer_config(
            model.vit, dtype, on_gpu, vision_recompute(par), par.recompute_modules, fused
        )
        vision = VisionTower(model, vit_config, placement.vision_groups())
    for module in (lm, vision):
        if module is not None:
            mark_tensor_parallel_attributes(module)
    if on_gpu and lm is not None:
        lm.cuda()
        if vision is not None:
            vision.cuda()
    return ModelParts(lm, vision)


def parameter_shards(parts: ModelParts):
    if parts.lm is not None:
        yield from canonical_shards(
            parts.lm,
            "lm.",
            parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_expert_tensor_parallel_group(),
            gated_mlp=True,
        )
    if parts.vision is not None:
        yield from canonical_shards(parts.vision, "vision.", parts.vision.tp_group)


def initialize_weights(parts: ModelParts, model: ModelConfig, seed: int) -> None:
    model_init.initialize(parameter_shards(parts), seed, model.init_std, model.lm.num_layers)
