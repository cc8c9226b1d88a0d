"""The rollout engine: sampling on the training model with a KV cache inside its core attention."""

from keye_train.posttrain.rollout.api import Rollout, RolloutBatch, pack_routes, routes_for_pack, sample_batch
from keye_train.posttrain.rollout.engine import Prompt, RolloutEngine, Sample
from keye_train.posttrain.rollout.routing import ModelRoutes
from keye_train.posttrain.rollout.sampler import SamplingParams

__all__ = [
    "ModelRoutes",
    "Prompt",
    "Rollout",
    "RolloutBatch",
    "RolloutEngine",
    "Sample",
    "SamplingParams",
    "pack_routes",
    "routes_for_pack",
    "sample_batch",
]
