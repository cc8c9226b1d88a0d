"""From a response's raw token advantages to the A^_t the loss uses (training_recipe.md §7 steps 5-6):

A^_t = gamma_{c(t)} A_t - lambda_rep 1[t >= tau]      and A^ = 0 for a response SPRR rejected
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from keye_train.posttrain.mopd.categories import category_weights
from keye_train.posttrain.mopd.repetition import repetition_penalty


def shaped_advantages(
    raw: torch.Tensor,
    response_ids: Sequence[int],
    categories: Sequence[str],
    gamma: Mapping[str, float],
    repetition,
    aligned: bool = True,
) -> torch.Tensor:
    """[R] float64. repetition: mopd.repetition (penalty, max_period, min_repeats, min_span)."""
    if not (raw.numel() == len(response_ids) == len(categories)):
        raise ValueError(f"{raw.numel()} advantages, {len(response_ids)} ids, {len(categories)} categories")
    if not aligned:
        return torch.zeros(raw.numel(), dtype=torch.float64)
    scaled = raw.double().cpu() * category_weights(categories, gamma)
    penalty = repetition_penalty(
        response_ids, repetition.penalty, repetition.max_period, repetition.min_repeats, repetition.min_span
    )
    return scaled + penalty
