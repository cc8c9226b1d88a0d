"""Operations around the step: preemption signals, non-finite gradients, and a hang watchdog.

Every decision that changes control flow is agreed by an all-reduce, so all ranks checkpoint, skip or stop at
the same step even when only some of them saw the signal or the bad value.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import math
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption; SLURM's --signal before the time limit
NONFINITE_POLICIES = ("skip", "abort")


PREEMPT_REQUEST = ".preempt_request"  # in run_dir: a SLURM batch script touches it on its pre-timeout signal


class PreemptionWatch:
    """Notes SIGTERM / SIGUSR1, or a request file appearing; the trainer checkpoints at the next step boundary and
    exits cleanly. The file lets a batch shell ask for a checkpoint without signalling every rank through srun
    and torchrun (whose agent gives its workers only a short grace period)."""

    def __init__(self, request_file: Path | None = None):
        self.signal_name: str | None = None
        self.request_file = request_file
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                signal.signal(sig, self._note)

    def _note(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        """Collective: whether any rank was signalled or saw the request file."""
        if self.signal_name is None and self.request_file is not None and self.request_file.exists():
            self.signal_name = f"request file {self.request_file}"
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class LossSpikeGuard:
    """A step whose loss exceeds `factor` x the mean of the last `window` accepted losses is a spike (judged only
    once the window is full; factor 0 turns the guard off). Every rank keeps the same window of global losses."""

    def __init__(self, factor: float, window: int, recent: list[float] | None = None):
        self.factor = factor
        self.recent: collections.deque = collections.deque(recent or [], maxlen=max(1, window))

    def is_spike(self, loss: float) -> bool:
        if self.factor <= 0 or not math.isfinite(loss):
            return False
        full = len(self.recent) == self.recent.maxlen
        if full and loss > self.factor * sum(self.recent) / len(self.recent):
            return True
        self.recent.append(loss)
        return False


def global_loss(loss: float, last_stage: bool, device) -> float:
    """Collective: the last pipeline stage's loss on every rank (NaN stays NaN)."""
    value = torch.tensor([loss if last_stage else float("-inf")], dtype=torch.float64, device=device)
    if last_stage and loss != loss:
        value.fill_(float("inf"))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    result = float(value.item())
    return float("nan") if result == float("inf") else result


def gradients_nonfinite(ddp_chunks, local_loss: float, device) -> bool:
    """Collective: whether any rank holds a NaN/Inf gradient (or last-stage loss) this step."""
    bad = not (local_loss == local_loss and abs(local_loss) != float("inf"))
    for chunk in ddp_chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if buffer.grad_data.numel() and not torch.isfinite(buffer.grad_data).all():
                bad = True
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def poison_gradients(ddp_chunks) -> None:
    """Fault drill: put a NaN into this rank's first non-empty gradient buffer."""
    for chunk in ddp_chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if buffer.grad_data.numel():
                buffer.grad_data.view(-1)[0] = float("nan")
                return


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run a child process tree; SIGTERM / SIGUSR1 sent to us reach it as SIGTERM (torchrun's agent forwards
    SIGTERM to its workers, which then checkpoint at the next step boundary and stop)."""
    import subprocess

    child = subprocess.Popen(cmd)
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, lambda *_: child.send_signal(signal.SIGTERM))
    return child.wait()


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
