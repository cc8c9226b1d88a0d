"""Which modules a rank holds, and their process groups.

`SplitPlacement` (placement=split): the ViT on ranks of its own, the LM on the rest; `SpreadPlacement`
(placement=spread): the ViT replicated on every rank, each encoding a share of its replica's micro-batches.

`ColocatedPlacement`: the vision tower lives on the LM's first pipeline stage with its own unsharded tensor
group, and its gradients reduce over the LM's data-parallel group. Built once after megatron's groups exist
and passed to whatever needs it (model building, the schedule, logging).
"""

from __future__ import annotations

import copy

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

_VISION_UNSHARDED = ("tp", "pp", "cp", "tp_cp", "mp", "ep", "expt_tp", "tp_ep", "tp_ep_pp")


class ColocatedPlacement:
    name = "colocated"

    def __init__(self):
        """Collective: every rank joins the creation of the size-1 groups."""
        self._single, _ = dist.new_subgroups(group_size=1)

    @staticmethod
    def lm_groups() -> ProcessGroupCollection:
        return ProcessGroupCollection.use_mpu_process_groups()

    def vision_groups(self) -> ProcessGroupCollection:
        """The LM's groups with every model-parallel one replaced by this rank alone (DP stays the LM's)."""
        groups = copy.copy(ProcessGroupCollection.use_mpu_process_groups())
        for name in _VISION_UNSHARDED:
            setattr(groups, name, self._single)
        return groups

    @staticmethod
    def is_first_stage() -> bool:
        return parallel_state.is_pipeline_first_stage(ignore_virtual=True)

    @staticmethod
    def is_last_stage() -> bool:
        return parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    def hosts_vision(self) -> bool:
        return self.is_first_stage()

    @staticmethod
    def hosts_lm() -> bool:
        return True

    def is_metrics_owner(self) -> bool:
        """The one rank that logs: last pipeline stage, first TP, CP and DP rank."""
        return (
            self.is_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )

    @staticmethod
    def data_parallel_group():
        """The ranks that read different packs (CP ranks of one replica share them)."""
        return parallel_state.get_data_parallel_group()

    @staticmethod
    def data_context_parallel_group():
        """DP x CP: every slice of every pack of the global batch (the group DDP averages gradients over)."""
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def gather_over_data_parallel(self, value) -> list:
        """Collective over this rank's data-parallel group: every member's (JSON-able) value, in rank order."""
        group = self.data_parallel_group()
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, value, group=group)
        return gathered

    @staticmethod
    def pipeline_size() -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    def loss_elsewhere(self) -> bool:
        """Whether some rank lacks the step's loss (it lives on the last LM stage), so it must be shared."""
        return self.pipeline_size() > 1


def split_serving(vision_ranks: int, dp: int) -> list[list[int]]:
    """placement=split: the ViT ranks that encode each LM replica's micro-batches. With at least as many ViT ranks
    as replicas, replica d gets ranks d, d + dp, ...; with fewer, ViT rank d % vision_ranks serves replica d."""
    if vision_ranks >= dp:
        return [list(range(d, vision_ranks, dp)) for d in range(dp)]
    return [[d % vision_ranks] for d in range(dp)]


class SplitPlacement:
    """The first `vision_ranks` global ranks hold only the ViT + projector, data-parallel over one group of them;
    megatron's groups span the LM ranks after them (parallel/layout.py builds them there). Each step, the first
    stage of LM replica d deals its micro-batches with visual input over `serving(d)` (the schedule balances by
    cost), sends them there and receives their embeddings back."""

    name = "split"

    def __init__(self, vision_ranks: int, dp: int, tp: int, pp: int):
        """Collective over the world (group creation). dp, tp, pp: the LM's sizes."""
        self.vision_ranks, self.dp, self.tp, self._lm_pp = vision_ranks, dp, tp, pp
        self._single, _ = dist.new_subgroups(group_size=1)
        self._vision = dist.new_group(list(range(vision_ranks)))
        self._serving = split_serving(vision_ranks, dp)

    def hosts_lm(self) -> bool:
        return dist.get_rank() >= self.vision_ranks

    def hosts_vision(self) -> bool:
        return not self.hosts_lm()

    def is_first_stage(self) -> bool:
        return self.hosts_lm() and parallel_state.is_pipeline_first_stage(ignore_virtual=True)

    def is_last_stage(self) -> bool:
        return self.hosts_lm() and parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    lm_groups = ColocatedPlacement.lm_groups

    def vision_groups(self) -> ProcessGroupCollection:
        """Every model-parallel group is this rank alone; data parallelism is over all the ViT ranks."""
        groups = ProcessGroupCollection()
        for name in _VISION_UNSHARDED + ("embd", "pos_embd"):
            setattr(groups, name, self._single)
        groups.dp = groups.dp_cp = self._vision
        groups.expt_dp = None
        groups.intra_dist_opt = self._vision
        return groups

    def is_metrics_owner(self) -> bool:
        return self.hosts_lm() and ColocatedPlacement.is_metrics_owner(self)

    def data_parallel_group(self):
        """On ViT ranks all of them: together they hold every micro-batch of the step exactly once."""
        return parallel_state.get_data_parallel_group() if self.hosts_lm() else self._vision

    def data_context_parallel_group(self):
        return parallel_state.get_data_parallel_group(with_context_parallel=True) if self.hosts_lm() else self._vision

    gather_over_data_parallel = ColocatedPlacement.gather_over_data_parallel

    def pipeline_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size() if self.hosts_lm() else self._lm_pp

    @staticmethod
    def loss_elsewhere() -> bool:
        return True  # the ViT ranks never compute it

    # ---- the embedding exchange ----------------------------------------------------------------------------------

    def serving(self, replica: int) -> list[int]:
        """The ViT ranks (global ranks) that encode for this LM replica."""
        return self._serving[replica]

    def served_replicas(self) -> list[int]:
        """ViT ranks: the LM replicas this rank encodes for."""
        return [d for d, ranks in enumerate(self._serving) if dist.get_rank() in ranks]

    def receivers(self, replica: int) -> list[int]:
        """The global ranks of replica's first LM pipeline stage (its TP group): each needs the embeddings."""
        return [self.vision_ranks + r for r in _first_stage_ranks(self.dp, self.tp)[replica]]


def _first_stage_ranks(dp: int, tp: int) -> list[list[int]]:
    """LM-local ranks of each replica's stage 0 in megatron's default order tp-cp-ep-dp-pp (cp = 1 here)."""
    return [[d * tp + t for t in range(tp)] for d in range(dp)]


class SpreadPlacement(ColocatedPlacement):
    """placement=spread: every rank holds the LM's chunk of its stage and a replica of the ViT + projector. The
    ranks of one LM replica (its TP x PP ranks, which all read the replica's packs) share the encoding of its
    micro-batches and send the embeddings to the replica's first stage; the ViT's gradients reduce over the world.
    """

    name = "spread"

    def __init__(self, tp: int):
        """Collective over the world (group creation). tp: the LM's TP size."""
        super().__init__()
        self.tp = tp
        self._world = dist.new_group(list(range(dist.get_world_size())))

    @staticmethod
    def hosts_vision() -> bool:
        return True

    def vision_groups(self) -> ProcessGroupCollection:
        """Every model-parallel group is this rank alone; data parallelism spans the world."""
        groups = ProcessGroupCollection()
        for name in _VISION_UNSHARDED + ("embd", "pos_embd"):
            setattr(groups, name, self._single)
        groups.dp = groups.dp_cp = groups.intra_dist_opt = self._world
        groups.expt_dp = None
        return groups

    def encoders(self) -> list[int]:
        """The global ranks of this rank's LM replica, stage 0's first (order tp-cp-ep-dp-pp, cp = 1)."""
        replica, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        return [t + self.tp * (replica + dp * p) for p in range(self.pipeline_size()) for t in range(self.tp)]

    def receivers(self) -> list[int]:
        """The global ranks of this replica's first stage (its TP group): each needs the embeddings."""
        return self.encoders()[: self.tp]


def placement_for(par, sizes):
    """The placement object of parallel.placement (collective: call on every rank after the groups exist).
    sizes: parallel/layout.py LayoutSizes."""
    if par.placement == "split":
        return SplitPlacement(sizes.vision_ranks, sizes.dp, sizes.tp, sizes.pp)
    if par.placement == "spread":
        return SpreadPlacement(sizes.tp)
    if par.placement == "colocated":
        return ColocatedPlacement()
    raise ValueError(f"parallel.placement={par.placement}: no placement to train with")
