"""Objectives: what a step's loss is. The loop hands an objective to the schedule, which calls its per-micro-batch
loss function inside megatron's forward-backward; the objective then reduces the step's loss.

A new objective is a new module here with the `Objective` shape; `objective_for` picks one for a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.distributed as dist


@dataclass
class StepLoss:
    loss: float  # the step's global loss, the same on every rank (NaN when non-finite)
    local_sum: float  # this rank's summed loss before any reduction (0 off the last pipeline stage)
    supervised_tokens: int  # across the global batch
    metrics: dict = field(default_factory=dict)


class Objective(Protocol):
    def begin_step(self, microbatches: list) -> int:
        """Called before the schedule runs (collective over data-parallel ranks if it needs global counts); returns
        the global batch's number of target tokens, the same on every rank (0: the step has nothing to learn)."""

    def loss_func(self, batch) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict]]:
        """megatron's loss function for one micro-batch: model output -> (loss to backpropagate, logged values)."""

    def end_step(self, outputs: list[dict]) -> StepLoss:
        """Collective: the step's loss from the last stage's logged values (outputs is empty elsewhere)."""


def last_stage_value(value: float, last_stage: bool, device) -> float:
    """Collective: the last pipeline stage's value on every rank (NaN stays NaN)."""
    carried = torch.tensor([value if last_stage else float("-inf")], dtype=torch.float64, device=device)
    if last_stage and value != value:
        carried.fill_(float("inf"))
    dist.all_reduce(carried, op=dist.ReduceOp.MAX)
    result = float(carried.item())
    return float("nan") if result == float("inf") else result


def objective_for(cfg, placement, device) -> Objective:
    """Every stage of pretraining and SFT trains on next-token CE (SFT masks the loss to assistant turns); an RL
    stage (rl.enabled) on GSPO over its rollouts; a MOPD stage (mopd.enabled, on rl's rollouts) on the
    teacher-advantage-weighted log-prob (objectives/mopd.py)."""
    from keye_train.training.objectives.next_token import NextTokenObjective

    if cfg.mopd.enabled:
        from keye_train.training.objectives.mopd import mopd_objective

        return mopd_objective(cfg, placement, device)

    if cfg.rl.enabled:
        from keye_train.training.objectives.gspo import gspo_objective

        return gspo_objective(cfg, placement, device)

    return NextTokenObjective(placement, device)
