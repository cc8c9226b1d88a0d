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


def split_serving(vision_groups: int, dp: int) -> list[list[int]]:
    """placement=split: the ViT groups (TP groups of ViT ranks, by index) that encode each LM replica's micro-batches.
    With at least as many groups as replicas, replica d gets groups d, d + dp, ...; with fewer, group d % groups
    serves replica d."""
    if vision_groups >= dp:
        return [list(range(d, vision_groups, dp)) for d in range(dp)]
    return [[d % vision_groups] for d in range(dp)]


def _own_group(rank_lists: list[list[int]]):
    """Collective over the world: a group per list (every rank creates all of them); the one holding this rank."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


class SplitPlacement:
    """The first `vision_ranks` global ranks hold only the ViT + projector: tensor-parallel over consecutive blocks
    of `vision_tp` of them (a ViT group), data-parallel across the groups; megatron's groups span the LM ranks after
    them (parallel/layout.py builds them there). Each step, the first stage of LM replica d deals its micro-batches
    with visual input over the ViT groups of `serving(d)` (the schedule balances by cost), sends them to every rank
    of each group and receives their embeddings back from its first rank (the group's leader)."""

    name = "split"

    def __init__(self, vision_ranks: int, dp: int, tp: int, pp: int, vision_tp: int = 1):
        """Collective over the world (group creation). dp, tp, pp: the LM's sizes."""
        self.vision_ranks, self.dp, self.tp, self._lm_pp = vision_ranks, dp, tp, pp
        self.vision_tp = vision_tp
        self.vision_dp = vision_ranks // vision_tp
        self._single, _ = dist.new_subgroups(group_size=1)
        self._vision = dist.new_group(list(range(vision_ranks)))
        blocks = [list(range(g * vision_tp, (g + 1) * vision_tp)) for g in range(self.vision_dp)]
        self._vision_tp = _own_group(blocks)
        self._vision_dp = _own_group([list(range(t, vision_ranks, vision_tp)) for t in range(vision_tp)])
        self._serving = [[blocks[g][0] for g in groups] for groups in split_serving(self.vision_dp, dp)]

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
        """Tensor parallelism over this rank's ViT group, data parallelism over the ranks of the same TP rank in
        the other groups; every other model-parallel group is this rank alone. The distributed optimizer's grad
        norm sums over all the ViT ranks (TP duplicates counted on TP rank 0)."""
        groups = ProcessGroupCollection()
        for name in _VISION_UNSHARDED + ("embd", "pos_embd"):
            setattr(groups, name, self._single)
        groups.tp = groups.tp_cp = groups.mp = self._vision_tp
        groups.dp = groups.dp_cp = self._vision_dp
        groups.expt_dp = None
        groups.intra_dist_opt = self._vision
        return groups

    def is_metrics_owner(self) -> bool:
        return self.hosts_lm() and ColocatedPlacement.is_metrics_owner(self)

    def data_parallel_group(self):
        """On ViT ranks the ranks of this TP rank in every ViT group: together they hold every micro-batch of the
        step exactly once."""
        return parallel_state.get_data_parallel_group() if self.hosts_lm() else self._vision_dp

    def data_context_parallel_group(self):
        if not self.hosts_lm():
            return self._vision_dp
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    gather_over_data_parallel = ColocatedPlacement.gather_over_data_parallel

    def pipeline_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size() if self.hosts_lm() else self._lm_pp

    @staticmethod
    def loss_elsewhere() -> bool:
        return True  # the ViT ranks never compute it

    # ---- the embedding exchange ----------------------------------------------------------------------------------

    def serving(self, replica: int) -> list[int]:
        """The leaders (global ranks) of the ViT groups that encode for this LM replica."""
        return self._serving[replica]

    def vision_group(self, leader: int) -> list[int]:
        """The global ranks of the ViT group led by `leader`: each needs the patches and the gradients."""
        return list(range(leader, leader + self.vision_tp))

    def vision_leader(self) -> int:
        """ViT ranks: the leader of this rank's ViT group (the rank that sends the group's embeddings)."""
        return dist.get_rank() - dist.get_rank() % self.vision_tp

    def served_replicas(self) -> list[int]:
        """ViT ranks: the LM replicas this rank's group encodes for."""
        return [d for d, leaders in enumerate(self._serving) if self.vision_leader() in leaders]

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
        return SplitPlacement(sizes.vision_ranks, sizes.dp, sizes.tp, sizes.pp, sizes.vision_tp)
    if par.placement == "spread":
        return SpreadPlacement(sizes.tp)
    if par.placement == "colocated":
        return ColocatedPlacement()
    raise ValueError(f"parallel.placement={par.placement}: no placement to train with")
