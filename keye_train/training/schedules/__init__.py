"""Schedules: how a step's micro-batches flow through this rank's model chunks (which module runs where and
when, forward and backward). The loop calls `run`; the objective supplies each micro-batch's loss function.

A new placement of the ViT is a new module here with the `Schedule` shape; `schedule_for` picks one.
"""

from __future__ import annotations

from typing import Protocol


class Schedule(Protocol):
    def run(self, microbatches: list, objective, forward_only: bool = False) -> list[dict]:
        """Forward (and backward) every micro-batch; returns the objective's logged values of each micro-batch
        on the last pipeline stage (empty elsewhere)."""


def schedule_for(cfg, model, placement) -> Schedule:
    from keye_train.training.schedules.colocated import ColocatedSchedule
    from keye_train.training.schedules.split import SplitLMSchedule, SplitVisionSchedule
    from keye_train.training.schedules.spread import SpreadSchedule

    if placement.name == "colocated":
        return ColocatedSchedule(model, cfg.model.tokens, placement)
    vision_trains = any(part in cfg.stage.trainable for part in ("vit", "projector"))
    if placement.name == "spread":
        return SpreadSchedule(model, cfg.model.tokens, placement, vision_trains)
    if placement.name == "split":
        if placement.hosts_lm():
            return SplitLMSchedule(model, cfg.model.tokens, placement, vision_trains)
        return SplitVisionSchedule(model, placement, vision_trains)
    raise ValueError(f"parallel.placement={placement.name}: no schedule for it yet")
