"""The whole configuration of one run: one typed section per component."""

from __future__ import annotations

from dataclasses import dataclass, field

from keye_train.config.data import DataConfig
from keye_train.config.launch import LaunchConfig
from keye_train.config.model import ModelConfig
from keye_train.config.mopd import MOPDConfig
from keye_train.config.parallel import ParallelConfig
from keye_train.config.rl import RLConfig
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
