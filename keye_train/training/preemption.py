"""Around the step: preemption (a signal, or a launcher's request file) and a hang watchdog.

The stop decision is agreed by an all-reduce, so all ranks checkpoint and stop at the same step even when only
some of them saw the signal.
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from launch.processes import PREEMPT_REQUEST, PREEMPTION_SIGNALS


class PreemptionWatch:
    """Notes SIGTERM / SIGUSR1, or a request file appearing; the trainer checkpoints at the next step boundary and
    exits cleanly. The file lets a batch shell ask for a checkpoint without signalling every rank through srun
    and torchrun (whose agent gives its workers only a short grace period)."""

    def __init__(self, run_dir: Path):
        self.signal_name: str | None = None
        self.request_file = Path(run_dir) / PREEMPT_REQUEST
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                signal.signal(sig, self._note)

    def _note(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        """Collective: whether any rank was signalled or saw the request file."""
        if self.signal_name is None and self.request_file.exists():
            self.signal_name = f"request file {self.request_file}"
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextlib.contextmanager
def hang_watchdog(timeout_s: float):
    """While a step runs: if it takes longer than timeout_s, print every thread's stack to stderr (each rank
    prints its own, so a stuck collective shows where every rank waits). 0 disables it."""
    if timeout_s <= 0:
        yield
        return
    faulthandler.dump_traceback_later(timeout_s, repeat=False, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
