"""Parallel layout: the LM's TP/CP/PP/EP/DP sizes, the ViT's placement, recomputation and process launching."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import List


class Placement(StrEnum):
    colocated = "colocated"  # the ViT runs unsharded on the LM's first pipeline stage
    split = "split"  # the ViT on its own ranks (the first parallel.vision.ranks), the LM on the rest
    spread = "spread"  # every rank encodes a share of the step's frames; embeddings routed to the stage-0 owners
    auto = "auto"  # `keye-train plan` only: pick colocated, split or spread (and the ViT ranks) by the cost model


class Recompute(StrEnum):
    none = "none"
    full = "full"  # each ViT and LM layer keeps only its input and re-runs in backward
    selective = "selective"  # only parallel.recompute_modules re-run in backward


class RecomputeModule(StrEnum):
    """megatron's selective recompute modules (the ViT takes layernorm and core_attn of them)."""

    moe = "moe"  # the whole MoE block (router, dispatch, experts); its input stays
    moe_act = "moe_act"  # the experts' SwiGLU output (needs grouped experts)
    layernorm = "layernorm"  # both norms of each layer
    core_attn = "core_attn"  # core attention (fused kernels keep little: rarely worth it)


class CommBackend(StrEnum):
    auto = "auto"  # nccl with CUDA, gloo on the CPU
    nccl = "nccl"
    gloo = "gloo"


@dataclass
class VisionParallelConfig:
    """The ViT's own layout. Under placement=split the first `ranks` ranks of the world run it, in ranks / tp
    data-parallel replicas; colocated placement runs it unsharded on the LM's first pipeline stage. `recompute` is
    its activation recomputation in either placement."""

    tp: int = 1
    ranks: int = 0
    recompute: Recompute | None = None  # None: parallel.recompute (the ViT's own, e.g. full under a selective LM)


@dataclass
class ParallelConfig:
    placement: Placement = Placement.colocated
    vision: VisionParallelConfig = field(default_factory=VisionParallelConfig)
    tp: int = 1
    cp: int = 1  # context parallel: each CP rank holds 2 of every packed document's 2*cp chunks
    pp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; None: same as tp
    sequence_parallel: bool | None = None  # None: on whenever tp > 1 (MoE with TP needs it)
    distributed_optimizer: bool = True
    recompute: Recompute = Recompute.none
    recompute_modules: List[RecomputeModule] = field(
        default_factory=lambda: [RecomputeModule.moe, RecomputeModule.layernorm]
    )  # with recompute=selective
    nproc: int = 1  # processes started by `keye-train` itself when not under torchrun
    backend: CommBackend = CommBackend.auto

    def __post_init__(self):
        if self.nproc < 1:
            raise ValueError(f"parallel.nproc={self.nproc} must be >= 1")
        if self.recompute == Recompute.selective and not self.recompute_modules:
            raise ValueError("parallel.recompute=selective with an empty parallel.recompute_modules: use none")
        if self.placement == Placement.spread and (self.vision.ranks or self.vision.tp != 1):
            raise ValueError(
                f"parallel.placement=spread with parallel.vision.ranks={self.vision.ranks} / "
                f"parallel.vision.tp={self.vision.tp}: spread encodes data-parallel over frames on every rank "
                "(no ViT ranks of its own, no ViT TP); use parallel.placement=split for those"
            )
        if self.vision.ranks < 0 or self.vision.tp < 1:
            raise ValueError(
                f"parallel.vision.ranks={self.vision.ranks} must be >= 0 and parallel.vision.tp={self.vision.tp} >= 1"
            )
        if self.cp < 1:
            raise ValueError(f"parallel.cp={self.cp} must be >= 1")
        if self.etp is not None and self.etp < 1:
            raise ValueError(f"parallel.etp={self.etp} must be >= 1 (or unset: the same as parallel.tp)")
