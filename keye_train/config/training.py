"""What a stage trains and how: optimizer and LR schedule, steps and batch, bad-step policy, checkpoints, logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import List


class DecayStyle(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class DType(StrEnum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


class BadStepAction(StrEnum):
    skip = "skip"  # skip the update and log it
    abort = "abort"


class TrainablePart(StrEnum):
    vit = "vit"
    projector = "projector"
    lm = "lm"  # the whole LM, its DSA indexers included
    indexer = "indexer"  # the DSA indexers alone (the warm-up)


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10
    decay_style: DecayStyle = DecayStyle.cosine

    def __post_init__(self):
        if self.lr < 0 or self.min_lr < 0 or self.warmup_steps < 0:
            raise ValueError("optim.lr, optim.min_lr and optim.warmup_steps must be >= 0")


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 8  # packed sequences per optimizer step, across DP ranks
    seq_length: int = 512
    seed: int = 1234
    dtype: DType = DType.auto
    nonfinite_policy: BadStepAction = BadStepAction.skip  # a NaN/Inf gradient or loss, or a loss spike
    max_nonfinite_skips: int = 3  # consecutive skipped steps (non-finite or spike) before the run aborts anyway
    loss_spike_factor: float = 0.0  # > 0: a loss above factor x the recent mean is a spike, handled by nonfinite_policy
    loss_spike_window: int = 50  # accepted steps in that recent mean
    hang_timeout_s: float = 0.0  # > 0: a step slower than this prints every rank's thread stacks
    inject_nonfinite_at_step: int = -1  # fault drill: poison rank 0's gradients at this step (-1: never)

    def __post_init__(self):
        for key in ("steps", "global_batch", "seq_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.max_nonfinite_skips < 0 or self.hang_timeout_s < 0:
            raise ValueError("train.max_nonfinite_skips and train.hang_timeout_s must be >= 0")
        if self.loss_spike_factor < 0:
            raise ValueError(f"train.loss_spike_factor={self.loss_spike_factor} must be >= 0 (0: off)")
        if self.loss_spike_window < 1:
            raise ValueError(f"train.loss_spike_window={self.loss_spike_window} must be >= 1")


@dataclass
class StageConfig:
    name: str = "pretrain"
    trainable: List[TrainablePart] = field(
        default_factory=lambda: [TrainablePart.vit, TrainablePart.projector, TrainablePart.lm]
    )


@dataclass
class CheckpointConfig:
    interval: int = 50  # steps; the last step is always saved. 0: no checkpoints except on preemption
    keep_last: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in run_dir
    init_from: str | None = None  # weights-only start from another checkpoint

    def __post_init__(self):
        if self.interval < 0:
            raise ValueError(f"checkpoint.interval={self.interval} must be >= 0 (0: only on preemption)")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last} must be >= 0 (0: keep all)")


@dataclass
class LoggingConfig:
    wandb_mode: WandbMode = WandbMode.offline
    wandb_project: str = "keye-train"
    wandb_group: str | None = None  # W&B run group; a chain sets it to its name, one run per stage
    log_interval: int = 1
    progress_bar: bool = True

    def __post_init__(self):
        if self.log_interval < 1:
            raise ValueError(f"logging.log_interval={self.log_interval} must be >= 1")
