"""The localized repetition penalty (training_recipe.md §7 step 6): A^_t = A~_t - lambda_rep 1[t >= tau].

Detector: tau is set by the first span of the response that is periodic, tokens[t + p] == tokens[t] all along it,
with a period p <= max_period, at least min_repeats periods long and at least min_span tokens long. The span's
first period is kept (it is the content being repeated); tau is where the first copy starts, t0 + p. A response
without such a span has no tau and is untouched, however long it is: only the tail of a collapsed response is
penalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collapse_point(ids: Sequence[int], max_period: int, min_repeats: int, min_span: int) -> int | None:
    """The smallest tau over the periods 1..max_period, or None."""
    tokens = torch.as_tensor(list(ids), dtype=torch.int64)
    n, best = tokens.numel(), None
    for p in range(1, min(max_period, n // min_repeats) + 1):
        need = max(min_repeats * p, min_span)  # span length; the run of tokens[t] == tokens[t+p] is span - p
        if need > n:
            continue
        same = (tokens[p:] == tokens[:-p]).tolist()
        run = 0
        for t, eq in enumerate(same):
            run = run + 1 if eq else 0
            if run >= need - p:  # tokens[start : start + need] has period p
                start = t - run + 1
                tau = start + p
                best = tau if best is None else min(best, tau)
                break
    return best


def repetition_penalty(ids: Sequence[int], penalty: float, max_period: int, min_repeats: int, min_span: int):
    """[T] float64: -penalty from tau on, 0 before it (all 0 without a collapse or with penalty 0)."""
    out = torch.zeros(len(ids), dtype=torch.float64)
    if penalty > 0:
        tau = collapse_point(ids, max_period, min_repeats, min_span)
        if tau is not None:
            out[tau:] = -penalty
    return out
