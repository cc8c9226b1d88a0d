"""How a launcher runs rank processes and asks them to stop: preemption signals and the request file."""

from __future__ import annotations

import signal
import subprocess

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption; SLURM's --signal before the time limit
PREEMPT_REQUEST = ".preempt_request"  # in run_dir: a SLURM batch script touches it on its pre-timeout signal


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run a child process tree; SIGTERM / SIGUSR1 sent to us reach it as SIGTERM (torchrun's agent forwards
    SIGTERM to its workers, which then checkpoint at the next step boundary and stop)."""
    child = subprocess.Popen(cmd)
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, lambda *_: child.send_signal(signal.SIGTERM))
    return child.wait()
