"""Bad steps: a global batch with no supervised tokens, a non-finite gradient or loss, or a loss spike skips the
update or aborts the run (train.nonfinite_policy), and `train.max_nonfinite_skips` bad steps in a row abort it.

`BadStepPolicy` judges each step: an empty one before its forward pass (every rank knows the global token count),
the others after the backward pass, by an all-reduce so every rank skips or updates together. It keeps the window
of recent losses that spikes are judged against and the count of empty steps, which a checkpoint carries so a
resumed run judges the same way.
"""

from __future__ import annotations

import collections
import math

import torch
import torch.distributed as dist

from keye_train.config import BadStepAction


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


class BadStepPolicy:
    def __init__(self, train, device, log=print):
        """train: the TrainConfig (nonfinite_policy, max_nonfinite_skips, loss_spike_*, inject_nonfinite_at_step)."""
        self.train, self.device, self.log = train, device, log
        self.spikes = LossSpikeGuard(train.loss_spike_factor, train.loss_spike_window)
        self.streak = 0  # bad steps in a row
        self.empty_steps = 0  # global batches without a supervised token, since the run began

    def drill(self, step: int, ddp_chunks) -> None:
        """train.inject_nonfinite_at_step: rank 0 poisons its gradients after that step's backward."""
        if step == self.train.inject_nonfinite_at_step and dist.get_rank() == 0:
            poison_gradients(ddp_chunks)

    def empty(self, step: int) -> str:
        """A global batch with nothing to learn from: never an update (the MoE aux loss alone would be one)."""
        self.empty_steps += 1
        reason = "no supervised tokens in the global batch (every sample of the step was rejected)"
        self._skip(step, reason)
        return reason

    def judge(self, step: int, step_loss, ddp_chunks) -> str | None:
        """Collective: None when the update may go ahead, else why it is skipped (raising under abort)."""
        if gradients_nonfinite(ddp_chunks, step_loss.local_sum, self.device):
            reason = "non-finite gradients or loss"
        elif self.spikes.is_spike(step_loss.loss):
            reason = (
                f"loss spike ({step_loss.loss:.4g} > train.loss_spike_factor={self.train.loss_spike_factor}"
                f" x the mean of the last {len(self.spikes.recent)} steps)"
            )
        else:
            self.streak = 0
            return None
        self._skip(step, reason)
        return reason

    def _skip(self, step: int, reason: str) -> None:
        """The update is skipped (the gradients are zeroed at the next step); abort by policy or streak."""
        self.streak += 1
        train = self.train
        if train.nonfinite_policy == BadStepAction.abort or self.streak > train.max_nonfinite_skips:
            raise RuntimeError(
                f"{reason} at step {step + 1} ({self.streak} bad steps in a row, "
                f"train.nonfinite_policy={train.nonfinite_policy}, train.max_nonfinite_skips="
                f"{train.max_nonfinite_skips}); the last good checkpoint is untouched"
            )
        self.log(f"step {step + 1}: {reason}, update skipped ({self.streak} in a row)")

    def state_dict(self) -> dict:
        return {"loss_window": list(self.spikes.recent), "empty_steps": self.empty_steps, "bad_streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.spikes.recent.extend(state.get("loss_window", []))
        self.empty_steps = int(state.get("empty_steps", 0))
        self.streak = int(state.get("bad_streak", 0))
