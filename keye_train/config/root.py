"""The whole configuration of one run: one typed section per component."""

from __future__ import annotations

from dataclasses import dataclass, field

from keye_train.config.data import DataConfig
from keye_train.config.launch import LaunchConfig
from keye_train.config.model import ModelConfig
from keye_train.config.mopd import MOPDConfig
from keye_train.config.parallel import ParallelConfig
from keye_train.config.rl import RLConfig
from keye_train.config.rollout import RolloutConfig
from keye_train.config.training import CheckpointConfig, LoggingConfig, OptimConfig, StageConfig, TrainConfig


@dataclass
class KeyeTrainConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # RL stages only (GSPO); other stages ignore it
    mopd: MOPDConfig = field(default_factory=MOPDConfig)  # MOPD stages only; other stages ignore it
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the RL stages' sampler

    def __post_init__(self):
        sampling = self.rollout.sampling
        if self.mopd.enabled and not self.rl.enabled:
            raise ValueError(
                "mopd.enabled=true needs rl.enabled=true: MOPD distils the student's own rollouts of rl.prompts"
            )
        if self.mopd.enabled and self.mopd.on_support and self.parallel.tp > 1:
            raise ValueError(
                f"mopd.loss={self.mopd.loss} with mopd.mode={self.mopd.mode} (the support loss) needs parallel.tp=1 "
                "(its log-softmax is over the whole vocab); use mopd.loss=sampled or mopd.mode=sampled_token"
            )
        if self.mopd.enabled and self.parallel.pp > 1:
            raise ValueError(f"parallel.pp={self.parallel.pp}: MOPD's in-process teachers and the rollout need pp=1")
        if self.mopd.enabled and self.rl.recovered_samples != "none":
            raise ValueError(
                f"rl.recovered_samples={self.rl.recovered_samples} with mopd.enabled=true: ContextRL's re-sampling is "
                "the GSPO data source's; MOPD trains every response (use rl.recovered_samples=none)"
            )
        if self.rl.routing_replay:
            self._check_routing_replay()
        if self.rl.enabled and self.parallel.pp > 1:
            raise ValueError(
                f"parallel.pp={self.parallel.pp} with rl.enabled=true: the rollout engine runs the whole LM on every "
                "rank; use parallel.pp=1"
            )
        if self.rl.enabled and self.parallel.cp > 1:
            raise ValueError(
                f"parallel.cp={self.parallel.cp} with rl.enabled=true: the RL objectives do not run under context "
                "parallelism yet (a response's mean needs every CP rank's slice); use parallel.cp=1"
            )
        if self.rl.enabled and (sampling.temperature != 1 or sampling.top_p != 1 or sampling.top_k != 0):
            # GSPO's log pi is the trainer's per-token CE of the raw logits: the rollout samples from that same
            # distribution, so pi_old, pi_rollout and pi_theta are one distribution (no 1/T in the trainer)
            raise ValueError(
                f"rollout.sampling.temperature={sampling.temperature}, rollout.sampling.top_p={sampling.top_p}, "
                f"rollout.sampling.top_k={sampling.top_k}: an RL stage samples the unfiltered policy "
                "(temperature 1, top_p 1, top_k 0), the distribution the trainer's log-probs are of"
            )

    def _check_routing_replay(self) -> None:
        """rl.routing_replay: an MoE LM, one micro-batch in flight (the replayed routes are set per micro-batch and
        held through its backward), whole packs on every rank, and the GSPO data source (MOPD does not carry routes)."""
        if self.model.lm.num_experts < 1:
            raise ValueError("rl.routing_replay=true needs an MoE LM (model.lm.num_experts > 0): there are no routes")
        if self.parallel.pp > 1:
            raise ValueError(
                f"rl.routing_replay=true with parallel.pp={self.parallel.pp}: the 1F1B schedule keeps several "
                "micro-batches in flight, replay holds one micro-batch's routes at a time; use parallel.pp=1"
            )
        if self.parallel.cp > 1:
            raise ValueError(f"rl.routing_replay=true with parallel.cp={self.parallel.cp}: use parallel.cp=1")
        if self.mopd.enabled:
            raise ValueError("rl.routing_replay=true with mopd.enabled=true: MOPD packs carry no routes yet")
