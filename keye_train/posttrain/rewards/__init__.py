"""Rewards for RL: one protocol (`Reward`: response, reference -> float), a registry by name, and the built-in
rewards, registered on import: `format`, `exact_match`, `numeric_match`, `mcq_letter`, `temporal_iou`,
`temporal_iou_multi`, `outcome` (one of those by the sample's answer type) and `context_judge`.
`build_weighted` turns the config's `rl.rewards` / `rl.reward_gates` into one reward."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from keye_train.posttrain.rewards import context_rl, formatting, match, outcome, temporal  # noqa: F401  (registers)
from keye_train.posttrain.rewards.base import (
    REGISTRY,
    Reward,
    WeightedReward,
    answer_text,
    build_reward,
    register,
    reward_names,
)

__all__ = ["REGISTRY", "Reward", "WeightedReward", "answer_text", "build_reward", "build_weighted", "register"]
__all__ += ["reward_names"]


def _with_runtime(name: str, options: dict, runtime: dict) -> dict:
    """Adds the runtime objects (e.g. `judge`) that the factory takes and the config cannot hold."""
    params = inspect.signature(REGISTRY[name]).parameters if name in REGISTRY else {}
    return {**{k: v for k, v in runtime.items() if k in params and k not in options}, **options}


def build_weighted(terms: Sequence, gates: Sequence = (), **runtime) -> WeightedReward:
    """terms: objects with `name`, `weight`, `options` (rl.RewardTerm); gates: the same, weights unused.
    runtime: objects handed to the factories that take them by that name (`judge=` for context_judge)."""
    built = [
        (t.name, float(t.weight), build_reward(t.name, **_with_runtime(t.name, dict(t.options), runtime)))
        for t in terms
    ]
    gated = [(g.name, build_reward(g.name, **_with_runtime(g.name, dict(g.options), runtime))) for g in gates]
    return WeightedReward(built, gated)
