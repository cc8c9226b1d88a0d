"""Typed configuration: one dataclass per component, composed by Hydra from `recipes/` and checked here.

Choice fields are `StrEnum`s (OmegaConf rejects any other value, naming the key); each section checks its own
values in `__post_init__`; `compose.load_checked_config` adds the layout, batch and data checks. All of it runs
before any rank starts. Model presets (`tiny`, `keye_vl2_30b_a3b`) are registered in Hydra's ConfigStore.
"""

from keye_train.config.data import DataConfig, DataSource
from keye_train.config.launch import LaunchConfig, SlurmConfig
from keye_train.config.model import (
    MODEL_PRESETS,
    AttentionBackend,
    DSABackend,
    DSAConfig,
    DSAMode,
    ExpertsImpl,
    Fusion,
    LMConfig,
    LossImpl,
    ModelConfig,
    ProjectorConfig,
    ViTConfig,
    indexer_mrope_section,
    keye_vl2_30b_a3b,
    loss_chunk_tokens,
    resolve_experts_impl,
    tiny,
)
from keye_train.config.parallel import (
    CommBackend,
    ParallelConfig,
    Placement,
    Recompute,
    RecomputeModule,
    VisionParallelConfig,
)
from keye_train.config.rl import Correction, RecoveredSamples, RewardTerm, RLConfig
from keye_train.config.root import KeyeTrainConfig
from keye_train.config.training import (
    BadStepAction,
    CheckpointConfig,
    DecayStyle,
    DType,
    LoggingConfig,
    OptimConfig,
    StageConfig,
    TrainablePart,
    TrainConfig,
    WandbMode,
)

__all__ = [
    "MODEL_PRESETS",
    "AttentionBackend",
    "BadStepAction",
    "CheckpointConfig",
    "CommBackend",
    "Correction",
    "DSABackend",
    "DSAConfig",
    "DSAMode",
    "DType",
    "DataConfig",
    "DataSource",
    "DecayStyle",
    "ExpertsImpl",
    "Fusion",
    "KeyeTrainConfig",
    "LMConfig",
    "LaunchConfig",
    "LoggingConfig",
    "LossImpl",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "Placement",
    "ProjectorConfig",
    "RLConfig",
    "RecoveredSamples",
    "Recompute",
    "RecomputeModule",
    "RewardTerm",
    "SlurmConfig",
    "StageConfig",
    "TrainConfig",
    "TrainablePart",
    "ViTConfig",
    "VisionParallelConfig",
    "WandbMode",
    "indexer_mrope_section",
    "keye_vl2_30b_a3b",
    "loss_chunk_tokens",
    "resolve_experts_impl",
    "tiny",
]
