"""The training loop shared by every stage: given a data source, an objective and a schedule, step the model.

Per step: take this rank's micro-batches, let the schedule run them through the model with the objective's loss,
let the bad-step policy judge the result, update, log. Around the steps: resume, checkpoints, preemption.

Counting: `step` is the number of global batches consumed (train.steps of them make a run; a skipped step counts),
`updates` the number of optimizer updates applied. The LR schedule follows `updates`, so a skipped step (empty,
non-finite or a spike) does not advance it, as Megatron-LM does for skipped iterations. Both are checkpointed.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Protocol

import torch.distributed as dist

from keye_train import checkpoint
from keye_train.training.fault_policy import BadStepPolicy
from keye_train.training.metrics import MetricsLogger, StepMetrics
from keye_train.training.objectives import StepLoss
from keye_train.training.optim import lr_at, optimizer_step, set_lr
from keye_train.training.preemption import PreemptionWatch, hang_watchdog


class DataSource(Protocol):
    def next_step(self) -> list: ...  # this rank's micro-batches of the next step
    def counters(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


class Trainer:
    def __init__(self, cfg, ctx, model, data: DataSource, objective, schedule):
        """ctx: training/setup.py RankContext; model: its TrainModel; objective and schedule: see their packages."""
        self.cfg, self.ctx, self.model, self.data = cfg, ctx, model, data
        self.objective, self.schedule = objective, schedule
        self.device, self.placement = ctx.device, ctx.placement
        self.policy = BadStepPolicy(cfg.train, self.device, log=self._owner_print)
        self.collector = StepMetrics(cfg, model.parts, data, self.placement, ctx.num_microbatches, self.device)
        self.preemption = PreemptionWatch(Path(cfg.run_dir))
        self.run_dir = Path(cfg.run_dir)
        self.step = 0
        self.updates = 0
        self.run_id = uuid.uuid4().hex[:12]
        if cfg.checkpoint.resume:
            self._resume()
        if self.step == 0 and cfg.checkpoint.init_from:
            fresh = checkpoint.load_weights(cfg.checkpoint.init_from, model.parts, ctx.layout)
            model.optimizer.reload_model_params()  # mixed precision keeps fp32 main copies of the weights
            self._owner_print(
                f"initialised from {cfg.checkpoint.init_from}"
                + (f"; {len(fresh)} indexer tensors start fresh" if fresh else "")
            )

    def is_metrics_owner(self) -> bool:
        return self.placement.is_metrics_owner()

    def _owner_print(self, line: str) -> None:
        if self.is_metrics_owner():
            print(line, flush=True)

    def _resume(self) -> None:
        latest = checkpoint.latest_checkpoint(self.run_dir)
        if latest is None:
            return
        extra = checkpoint.load(latest, self.model.parts, self.model.optimizer, self.ctx.layout)
        self.step = extra["step"]
        self.updates = int(extra.get("updates", self.step))  # written before updates were counted: no skips
        if "data_by_dp_rank" in extra:  # written under another layout
            regroup = getattr(self.data, "load_regrouped_state", None)
            if regroup is None:
                raise RuntimeError(
                    f"checkpoint {latest} was written under another layout and {type(self.data).__name__} cannot "
                    "map its data state to this one; resume with the checkpoint's layout, or start from its "
                    "weights with checkpoint.init_from"
                )
            regroup(extra["data_by_dp_rank"])
        else:
            self.data.load_state_dict(extra["data"])
        self.run_id = extra["run_id"]
        self.policy.load_state_dict(extra)
        self._owner_print(f"resumed from {latest} at step {self.step}")

    def save(self) -> Path:
        extra = {
            "data": self.data.state_dict(),
            "run_id": self.run_id,
            "updates": self.updates,
            **self.policy.state_dict(),
        }
        return checkpoint.save(
            self.run_dir,
            self.step,
            self.model.parts,
            self.model.optimizer,
            extra,
            self.ctx.layout,
            self.cfg.checkpoint.keep_last,
        )

    def train_step(self) -> dict:
        """One optimizer step over a global batch; returns the step's metrics (meaningful on the owner rank).
        A step slower than train.hang_timeout_s prints every thread's stack (this frame among them)."""
        with hang_watchdog(self.cfg.train.hang_timeout_s):
            return self._step()

    def _step(self) -> dict:
        started = time.perf_counter()
        microbatches = [batch.to(self.device) for batch in self.data.next_step()]
        self.model.zero_grad()
        lr = lr_at(self.updates, self.cfg.optim, self.cfg.train.steps)
        set_lr(self.model.optimizer, lr)
        updated, grad_norm = False, float("nan")
        if self.objective.begin_step(microbatches) == 0:  # nothing to learn from: no forward, no update
            result = StepLoss(float("nan"), 0.0, 0, {"supervised_tokens": 0.0})
            self.policy.empty(self.step)
        else:
            outputs = self.schedule.run(microbatches, self.objective)
            self.policy.drill(self.step, self.model.ddp_chunks)
            result = self.objective.end_step(outputs)
            if self.policy.judge(self.step, result, self.model.ddp_chunks) is None:
                updated, grad_norm = optimizer_step(self.model.optimizer, self.model.ddp_chunks)
                self.updates += int(updated)
        metrics = {
            "loss": result.loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "update_skipped": float(not updated),
            "nonfinite_skips": float(self.policy.streak),
            **result.metrics,
            "train/empty_steps": float(self.policy.empty_steps),
        }
        metrics.update(self.collector.collect(self.step))
        elapsed = time.perf_counter() - started
        tokens = self.cfg.train.global_batch * self.cfg.train.seq_length
        metrics.update(
            {
                "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed,
                "tokens_per_s_per_rank": tokens / elapsed / dist.get_world_size(),
            }
        )
        self.step += 1
        return metrics

    def fit(self) -> list[dict]:
        cfg = self.cfg
        logger = None
        if self.is_metrics_owner():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            logger = MetricsLogger(
                self.run_dir, cfg.logging, dataclasses.asdict(cfg), cfg.train.steps, self.step, self.run_id
            )
        history = []
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                history.append(metrics)
                if logger is not None:
                    logger.log(self.step, metrics)
                preempted = self.preemption.agreed(self.device)
                every = cfg.checkpoint.interval
                if preempted or (every > 0 and (self.step % every == 0 or self.step == cfg.train.steps)):
                    path = self.save()
                if preempted:
                    self._owner_print(
                        f"preempted ({self.preemption.signal_name or 'another rank was signalled'}): "
                        f"checkpoint {path} written at step {self.step}; run again to resume"
                    )
                    break
        finally:
            self.data.close()
            if logger is not None:
                logger.close()
        return history
