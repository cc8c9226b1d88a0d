"""Which modules a rank holds, and their process groups.

`SplitPlacement` (placement=split): the ViT on ranks of its own, the LM on the rest; see the class.

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


def split_assignment(vision_ranks: int, dp: int, microbatches: int) -> list[list[tuple[int, int]]]:
    """placement=split: which (LM replica, micro-batch) each ViT rank encodes, in the order it sends them.

    Micro-batch m of replica d is the step's item g = m * dp + d (every replica's first micro-batch first, the
    order the LM consumes them); item g goes to ViT rank g % vision_ranks, so loads differ by at most one
    micro-batch and every ViT rank starts with an early one."""
    work: list[list[tuple[int, int]]] = [[] for _ in range(vision_ranks)]
    for m in range(microbatches):
        for d in range(dp):
            work[(m * dp + d) % vision_ranks].append((d, m))
    return work


class SplitPlacement:
    """The first `vision_ranks` global ranks hold only the ViT + projector, data-parallel over one group of them;
    megatron's groups span the LM ranks after them (parallel/layout.py builds them there). LM stage-0 rank r of
    replica d receives micro-batch m's visual embeddings from ViT rank `sender(d, m)` and sends their gradients
    back to it."""

    name = "split"

    def __init__(self, vision_ranks: int, microbatches: int, dp: int, tp: int, pp: int):
        """Collective over the world (group creation). microbatches: per LM replica and step; dp, tp, pp: the LM's."""
        self.vision_ranks, self.microbatches, self.dp, self.tp, self._lm_pp = vision_ranks, microbatches, dp, tp, pp
        self._single, _ = dist.new_subgroups(group_size=1)
        self._vision = dist.new_group(list(range(vision_ranks)))
        self.work = split_assignment(vision_ranks, dp, microbatches)
        self._sender = {item: v for v, items in enumerate(self.work) for item in items}

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

    # ---- the embedding exchange ----------------------------------------------------------------------------------

    def my_work(self) -> list[tuple[int, int]]:
        """ViT ranks: the (replica, micro-batch) items this rank encodes, in sending order."""
        return self.work[dist.get_rank()]

    def sender(self, replica: int, microbatch: int) -> int:
        return self._sender[(replica, microbatch)]

    def receivers(self, replica: int) -> list[int]:
        """The global ranks of replica's first LM pipeline stage (its TP group): each needs the embeddings."""
        return [self.vision_ranks + r for r in _first_stage_ranks(self.dp, self.tp)[replica]]


def _first_stage_ranks(dp: int, tp: int) -> list[list[int]]:
    """LM-local ranks of each replica's stage 0 in megatron's default order tp-cp-ep-dp-pp (cp = 1 here)."""
    return [[d * tp + t for t in range(tp)] for d in range(dp)]


def placement_for(par, sizes, num_microbatches: int):
    """The placement object of parallel.placement (collective: call on every rank after the groups exist).
    sizes: parallel/layout.py LayoutSizes; num_microbatches: per LM replica and step."""
    if par.placement == "split":
        return SplitPlacement(sizes.vision_ranks, num_microbatches, sizes.dp, sizes.tp, sizes.pp)
    if par.placement == "colocated":
        return ColocatedPlacement()
    raise ValueError(f"parallel.placement={par.placement}: no placement to train with")
