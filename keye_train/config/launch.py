"""Where the ranks run: torchrun on one or several nodes, or a SLURM job (launch/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class SlurmConfig:
    """sbatch settings (launch/slurm.py). Logs go to <run_dir>/logs unless log_dir is set."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 32  # per node: one launcher task per node starts its GPUs' ranks
    mem: str | None = None  # e.g. "0" for all of each node's memory
    job_name: str | None = None  # default: the run_dir's name
    log_dir: str | None = None
    signal_lead_s: int = 300  # SIGUSR1 this long before the time limit: checkpoint, exit, requeue
    requeue: bool = True
    setup: List[str] = field(default_factory=list)  # shell lines run first on the batch node (module load, venv)
    extra_sbatch: List[str] = field(default_factory=list)  # more "#SBATCH ..." options, e.g. "--exclusive"


@dataclass
class LaunchConfig:
    """Where the ranks run: `keye-train launch torchrun|slurm` (launch/)."""

    nodes: int = 1
    gpus_per_node: int = 8  # processes per node
    master_addr: str | None = None  # torchrun multi-node: the rendezvous host (SLURM: the allocation's first node)
    master_port: int = 29500
    rdzv_id: str | None = None  # default: the SLURM job id, or the run_dir's name
    max_restarts: int = 0  # torchrun restarts of a failed node group (each resumes from the last checkpoint)
    env: Dict[str, str] = field(default_factory=dict)  # exported on every node before the ranks start
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"launch.nodes={self.nodes}, launch.gpus_per_node={self.gpus_per_node}: both must be >= 1")
