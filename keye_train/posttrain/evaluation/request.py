"""What an evaluator asks the model: one prompt with its video, and the sampling settings it was measured with."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvalRequest:
    id: str
    prompt: str
    video: str | None
    settings: Mapping = field(default_factory=dict)  # fps, frame cap, pixel budget, think mode, ...


Generate = Callable[[list[EvalRequest]], list[str]]  # one response per request, in order (greedy for evals)
