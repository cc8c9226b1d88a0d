"""`keye-train launch torchrun|slurm|slurm-node [--dry-run] [hydra overrides...]`.

    torchrun    this node's torchrun command (run the same line on every node of a multi-node job)
    slurm       render the sbatch script into <run_dir>/launch/ and submit it with sbatch
    slurm-node  inside a SLURM job step: derive the rendezvous from SLURM_* and run torchrun (the script's step)

The recipe is checked for launch.nodes x launch.gpus_per_node ranks before anything starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from data_pipeline.loader import check_data_config
from keye_train.config.compose import load_checked_config
from launch.processes import run_forwarding_signals
from launch.slurm import render_sbatch, rendezvous_from_env
from launch.torchrun import render, torchrun_command
from parallel.layout import rank_roles, require_trainable

USAGE = "usage: keye-train launch {torchrun,slurm,slurm-node} [--dry-run] [overrides...]"


def _run(cmd: list[str], env: dict[str, str]) -> int:
    os.environ.update(env)
    return run_forwarding_signals(cmd)


def run(argv: list[str]) -> int:
    if not argv or argv[0] not in ("torchrun", "slurm", "slurm-node"):
        raise ValueError(USAGE)
    mode, rest = argv[0], argv[1:]
    dry_run = "--dry-run" in rest
    train_args = [a for a in rest if a != "--dry-run"]
    cfg, sizes = load_checked_config(train_args, world="launch", check_data=False)
    if not dry_run:  # a dry run also renders what cannot run yet, and needs no data on this machine
        require_trainable(cfg.parallel, cfg.rl.enabled)
        check_data_config(cfg.data)
    env = {k: str(v) for k, v in cfg.launch.env.items()}
    if mode == "torchrun":
        cmd = torchrun_command(cfg.launch, train_args, cfg.launch.rdzv_id or Path(cfg.run_dir).name)
        print(render(cmd, env), flush=True)
        if dry_run:
            print("\n".join("# " + line for line in rank_roles(cfg.parallel, sizes)))
        return 0 if dry_run else _run(cmd, env)
    if mode == "slurm-node":
        where = rendezvous_from_env(dict(os.environ), cfg.launch.nodes)
        cmd = torchrun_command(cfg.launch, train_args, cfg.launch.rdzv_id or where["job_id"], where["master_addr"])
        print(f"node {where['node_rank']}/{where['nodes']} (restart {where['restarts']}): {render(cmd)}", flush=True)
        return 0 if dry_run else _run(cmd, {})
    script = render_sbatch(cfg, train_args, rank_roles(cfg.parallel, sizes))
    if dry_run:
        print(script)
        print("# each node's step then runs torchrun with the allocation's first node as rendezvous host:")
        print("# " + render(torchrun_command(cfg.launch, train_args, "$SLURM_JOB_ID", "<first node>"), env))
        return 0
    path = Path(cfg.run_dir) / "launch" / f"{Path(cfg.run_dir).name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if shutil.which("sbatch") is None:
        raise ValueError(f"sbatch not found on this machine; the script is at {path}")
    print(f"submitting {path}", flush=True)
    return subprocess.call(["sbatch", str(path)])
