"""Dynamic sampling (DAPO, arXiv 2503.14476; training_recipe.md §5): over-sample groups, drop those whose rewards
are all equal (their group-normalised advantages are all 0, so they add no gradient, only dilute the batch), and
refill until the step has its number of groups. The filtered fraction is logged.

A group is any object with a `rewards` list (context_rl.Group, or the rollout's own record). Optionally a
`recover` hook (ContextRL's mistake-report re-sampling, `context_rl.resample_all_negative`) gets the dropped groups
and returns replacements, which are filtered the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def is_informative(rewards: Sequence[float], atol: float = 0.0) -> bool:
    """False when every reward of the group is the same (within atol): A = 0 for all of them."""
    return len(rewards) > 1 and max(rewards) - min(rewards) > atol


def split_groups(groups: Sequence[Any], atol: float = 0.0) -> tuple[list, list]:
    """(informative groups, equal-reward groups), each in input order."""
    kept = [g for g in groups if is_informative(g.rewards, atol)]
    dropped = [g for g in groups if not is_informative(g.rewards, atol)]
    return kept, dropped


@dataclass
class SamplingReport:
    rounds: int  # generation rounds used
    generated: int  # groups generated over all rounds (recovered replacements not included)
    dropped: int  # generated groups with equal rewards
    recovered: int  # replacements from `recover` that were informative and kept
    surplus: int  # informative groups generated beyond the batch (discarded)
    short: int  # groups missing from the batch after the last round (0: full)

    @property
    def filtered_fraction(self) -> float:
        return self.dropped / self.generated if self.generated else 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "rl/filtered_fraction": self.filtered_fraction,
            "rl/sampling_rounds": float(self.rounds),
            "rl/groups_generated": float(self.generated),
            "rl/groups_recovered": float(self.recovered),
            "rl/groups_short": float(self.short),
        }


def dynamic_sample(
    sample_groups: Callable[[int], list],
    batch_groups: int,
    oversample_factor: float = 1.5,
    max_rounds: int = 3,
    recover: Callable[[list], list] | None = None,
    atol: float = 0.0,
) -> tuple[list, SamplingReport]:
    """Calls `sample_groups(n)` (n new prompts, G responses each, rewarded) for ceil(missing * oversample_factor)
    groups per round until `batch_groups` informative groups are kept or `max_rounds` rounds have run. Returns the
    first `batch_groups` kept groups in generation order (fewer, with `report.short` > 0, when the rounds ran out:
    the GSPO loss normalises by the responses it gets) and the report."""
    if batch_groups < 1 or oversample_factor < 1 or max_rounds < 1:
        raise ValueError("dynamic_sample: batch_groups and max_rounds must be >= 1, oversample_factor >= 1")
    kept: list = []
    rounds = generated = dropped_count = recovered = 0
    while len(kept) < batch_groups and rounds < max_rounds:
        want = math.ceil((batch_groups - len(kept)) * oversample_factor)
        groups = sample_groups(want)
        if len(groups) != want:
            raise ValueError(f"sample_groups({want}) returned {len(groups)} groups")
        rounds, generated = rounds + 1, generated + want
        good, dropped = split_groups(groups, atol)
        dropped_count += len(dropped)
        if recover is not None and dropped:
            rescued, _ = split_groups(recover(dropped), atol)
            recovered += len(rescued)
            good += rescued
        kept += good
    surplus = max(0, len(kept) - batch_groups)
    report = SamplingReport(rounds, generated, dropped_count, recovered, surplus, max(0, batch_groups - len(kept)))
    return kept[:batch_groups], report
