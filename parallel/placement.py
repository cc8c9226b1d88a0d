"""Process groups of each module. Colocated placement: the vision tower lives on the LM's first pipeline
stage with its own (unsharded) tensor group, and its gradients reduce over the LM's data-parallel group."""

from __future__ import annotations

import copy

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

_SINGLETON = None


def _singleton_group():
    global _SINGLETON
    if _SINGLETON is None:
        _SINGLETON, _ = dist.new_subgroups(group_size=1)
    return _SINGLETON


def forget_groups() -> None:
    """Drop cached groups when the process groups are destroyed (a later world must build its own)."""
    global _SINGLETON
    _SINGLETON = None


def lm_process_groups() -> ProcessGroupCollection:
    return ProcessGroupCollection.use_mpu_process_groups()


def vision_process_groups() -> ProcessGroupCollection:
    groups = copy.copy(ProcessGroupCollection.use_mpu_process_groups())
    single = _singleton_group()
    for name in ("tp", "pp", "cp", "tp_cp", "mp", "ep", "expt_tp", "tp_ep", "tp_ep_pp"):
        setattr(groups, name, single)
    return groups


def hosts_vision() -> bool:
    """Colocated mode: ranks of the first LM pipeline stage run the vision tower."""
    return parallel_state.is_pipeline_first_stage(ignore_virtual=True)


def is_metrics_owner() -> bool:
    """The one rank that logs: last pipeline stage, first TP and DP rank."""
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)
