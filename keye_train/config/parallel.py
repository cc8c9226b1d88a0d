"""Parallel layout: the LM's TP/PP/EP/DP sizes, the ViT's placement, recomputation and process launching."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Placement(StrEnum):
    colocated = "colocated"  # the ViT runs unsharded on the LM's first pipeline stage
    split = "split"  # the ViT on its own ranks (the first parallel.vision.ranks), the LM on the rest


class Recompute(StrEnum):
    none = "none"
    full = "full"  # each ViT and LM layer keeps only its input and re-runs in backward


class CommBackend(StrEnum):
    auto = "auto"  # nccl with CUDA, gloo on the CPU
    nccl = "nccl"
    gloo = "gloo"


@dataclass
class VisionParallelConfig:
    """The ViT's own layout under placement=split: the first `ranks` ranks of the world run it, in
    ranks / tp data-parallel replicas. Colocated placement runs it unsharded on the LM's first pipeline stage."""

    tp: int = 1
    ranks: int = 0


@dataclass
class ParallelConfig:
    placement: Placement = Placement.colocated
    vision: VisionParallelConfig = field(default_factory=VisionParallelConfig)
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; None: same as tp
    sequence_parallel: bool | None = None  # None: on whenever tp > 1 (MoE with TP needs it)
    distributed_optimizer: bool = True
    recompute: Recompute = Recompute.none
    nproc: int = 1  # processes started by `keye-train` itself when not under torchrun
    backend: CommBackend = CommBackend.auto

    def __post_init__(self):
        if self.nproc < 1:
            raise ValueError(f"parallel.nproc={self.nproc} must be >= 1")
        if self.etp is not None and self.etp < 1:
            raise ValueError(f"parallel.etp={self.etp} must be >= 1 (or unset: the same as parallel.tp)")
