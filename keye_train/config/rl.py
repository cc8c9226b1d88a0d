"""RL stages (GSPO): group size, clipping, advantage normalisation, the train/rollout correction, dynamic sampling
and the rewards, built by name from keye_train/posttrain/rewards (training_recipe.md §5-6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Dict, List


class Correction(StrEnum):
    none = "none"
    tis = "tis"  # w = min(pi_old / pi_rollout, tis_cap)
    icepop = "icepop"  # w = 1 inside [icepop_low, icepop_high], else 0


class RecoveredSamples(StrEnum):
    conditioned = "conditioned"  # re-sampled responses train in the report-conditioned context (context_rl.py)
    none = "none"  # no ContextRL re-sampling


@dataclass
class RewardTerm:
    name: str = "format"  # a registered reward (keye_train/posttrain/rewards)
    weight: float = 1.0
    options: Dict[str, Any] = field(default_factory=dict)


def _default_rewards() -> list:
    return [RewardTerm("mcq_letter", 1.0)]


@dataclass
class RLConfig:
    enabled: bool = False  # train this stage with GSPO on rollouts (keye_train/posttrain/rl_data.py)
    prompts: str = ""  # the prompt JSONL: {"id", "prompt", and the reference keys its rewards read}
    judge: str = ""  # "module:factory" of the context_judge reward's judge (a JudgeRequest -> JudgeVerdict)
    recompute_old_logp: bool = True  # pi_old by a no-grad trainer forward at rollout time (else: the ratio is 1)
    group_size: int = 8  # G responses per prompt
    prompts_per_step: int = 32  # prompts whose groups make one optimizer step (after dynamic sampling)
    clip_ratio_low: float = 3e-4  # verl GSPO example (Qwen3-30B-A3B)
    clip_ratio_high: float = 4e-4
    adv_eps: float = 1e-6  # delta in A = (R - mean) / (std + delta)
    correction: Correction = Correction.none
    tis_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    dynamic_sampling: bool = True  # drop groups of equal rewards, refill from over-sampled ones
    oversample_factor: float = 1.5  # groups generated per needed group in one round
    max_sampling_rounds: int = 3  # generation rounds before a step trains on what it has
    rewards: List[RewardTerm] = field(default_factory=_default_rewards)
    reward_gates: List[RewardTerm] = field(default_factory=list)  # rewards in {0, 1} that multiply the sum
    recovered_samples: RecoveredSamples = RecoveredSamples.none  # ContextRL re-sampling of all-negative groups
    positive_threshold: float = 0.5  # a reward >= this is a positive (ContextRL's all-negative test)
    routing_replay: bool = False  # R3: the training forward and pi_old replay the experts chosen at rollout

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"rl.group_size={self.group_size} must be >= 2 (advantages are normalised per group)")
        if self.enabled and not self.prompts:
            raise ValueError("rl.prompts is empty: an RL stage (rl.enabled=true) needs a prompt JSONL")
        judged = any(t.name == "context_judge" for t in [*self.rewards, *self.reward_gates])
        if self.enabled and judged and not self.judge:
            raise ValueError("rl.judge is empty: the context_judge reward needs a judge ('module:factory')")
        if self.enabled and self.recovered_samples == RecoveredSamples.conditioned and not self.judge:
            raise ValueError(
                "rl.judge is empty: rl.recovered_samples=conditioned needs a judge ('module:factory') to write the "
                "mistake reports"
            )
        if self.judge and ":" not in self.judge:
            raise ValueError(f"rl.judge={self.judge!r}: expected 'module:factory'")
        if self.routing_replay and not self.enabled:
            raise ValueError("rl.routing_replay=true needs rl.enabled=true: it replays the RL rollouts' routes")
        if self.prompts_per_step < 1:
            raise ValueError(f"rl.prompts_per_step={self.prompts_per_step} must be >= 1")
        for key in ("clip_ratio_low", "clip_ratio_high"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"rl.{key}={getattr(self, key)} must be in (0, 1)")
        if self.adv_eps <= 0:
            raise ValueError(f"rl.adv_eps={self.adv_eps} must be > 0")
        if self.tis_cap <= 0:
            raise ValueError(f"rl.tis_cap={self.tis_cap} must be > 0")
        if not 0 <= self.icepop_low < 1 < self.icepop_high:
            raise ValueError(
                f"rl.icepop_low={self.icepop_low} and rl.icepop_high={self.icepop_high}: need low < 1 < high"
            )
        if self.oversample_factor < 1:
            raise ValueError(f"rl.oversample_factor={self.oversample_factor} must be >= 1")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"rl.max_sampling_rounds={self.max_sampling_rounds} must be >= 1")
        if not self.rewards and not self.reward_gates:
            raise ValueError("rl.rewards is empty: an RL stage needs at least one reward")
        from keye_train.posttrain.rewards import reward_names

        known = reward_names()
        for key in ("rewards", "reward_gates"):
            for k, term in enumerate(getattr(self, key)):
                if term.name not in known:
                    raise ValueError(f"rl.{key}[{k}].name={term.name!r} is not a registered reward: {known}")
                if key == "rewards" and term.weight < 0:
                    raise ValueError(f"rl.{key}[{k}].weight={term.weight} must be >= 0")
