"""The torchrun command of one node: standalone on a single node, c10d rendezvous across nodes."""

from __future__ import annotations

import shlex
import sys


def torchrun_command(
    launch,
    train_args: list[str],
    rdzv_id: str,
    master_addr: str | None = None,
    python: str = sys.executable,
    command: str = "train",
) -> list[str]:
    """`python -m torch.distributed.run ... -m keye_train.cli <command> <train_args>` for this node; `launch` is a
    LaunchConfig (nodes, gpus_per_node, max_restarts, master_addr, master_port).

    One node without a master address rendezvouses on a free local port (--standalone); otherwise every node
    joins the c10d store at master_addr:master_port under the same rdzv_id, and ranks are numbered by node
    arrival (a rank's role never depends on which host it landed on)."""
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={launch.nodes}",
        f"--nproc-per-node={launch.gpus_per_node}",
        f"--max-restarts={launch.max_restarts}",
    ]
    host = master_addr or launch.master_addr
    if launch.nodes == 1 and host is None:
        cmd.append("--standalone")
    else:
        if host is None:
            raise ValueError(
                f"launch.master_addr: {launch.nodes} nodes need a rendezvous host (the first node's "
                "address); SLURM jobs take it from the allocation"
            )
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{launch.master_port}", f"--rdzv-id={rdzv_id}"]
    return cmd + ["-m", "keye_train.cli", command, *train_args]


def render(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """The command as one shell line, with its environment in front."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items()))
    return (exports + " " if exports else "") + shlex.join(cmd)
