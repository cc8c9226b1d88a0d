"""Starting this machine's ranks: under torchrun when a command needs several, or as a 1-rank world."""

from __future__ import annotations

import os

from keye_train.config import LaunchConfig
from launch.processes import run_forwarding_signals
from launch.torchrun import torchrun_command


def spawn_local(nproc: int, argv: list[str], command: str = "train") -> int:
    """Run `keye-train <command> <argv>` as nproc ranks under torchrun here, forwarding preemption signals."""
    return run_forwarding_signals(
        torchrun_command(LaunchConfig(gpus_per_node=nproc), argv, rdzv_id="local", command=command)
    )


def single_process_env() -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def needs_spawn(nproc: int) -> bool:
    """Not yet under a launcher, and the layout asks for several ranks."""
    return "RANK" not in os.environ and nproc > 1
