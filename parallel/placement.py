"""Which modules a rank holds, and their process groups.

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
