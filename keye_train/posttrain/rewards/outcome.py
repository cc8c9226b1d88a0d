"""The outcome reward of mixed RL data: each sample says what kind of answer it has, and the matching reward
scores it (KEYE's General RL "outcome" term over options, phrases and numbers; Video RL's TVG and QA).

Reference key `answer_type`: `choice` (mcq_letter), `number` (numeric_match), `text` (exact_match), `segment`
(temporal_iou), `segments` (temporal_iou_multi). Without it: `choice` when the sample has `options`, `segment`
when it has windows, `number` when `answer` is a number, else `text`.
"""

from __future__ import annotations

from collections.abc import Mapping

from keye_train.posttrain.rewards.base import build_reward, register

KINDS = {
    "choice": "mcq_letter",
    "number": "numeric_match",
    "text": "exact_match",
    "segment": "temporal_iou",
    "segments": "temporal_iou_multi",
}


def answer_type(reference: Mapping) -> str:
    if "answer_type" in reference:
        kind = reference["answer_type"]
        if kind not in KINDS:
            raise ValueError(f"reference answer_type={kind!r}, expected one of {sorted(KINDS)}")
        return kind
    if "options" in reference or "candidates" in reference:
        return "choice"
    if any(key in reference for key in ("windows", "relevant_windows", "span")):
        return "segment"
    answer = reference.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return "number"
    return "text"


@register("outcome")
class OutcomeReward:
    """Dispatches on the sample's answer type; `options` maps a type to its reward's options, e.g.
    `{number: {rel_tol: 0.01}, segment: {shaping: time_r1}}`."""

    def __init__(self, **options):
        unknown = set(options) - set(KINDS)
        if unknown:
            raise ValueError(f"outcome: unknown answer types {sorted(unknown)}, expected {sorted(KINDS)}")
        self.rewards = {kind: build_reward(name, **dict(options.get(kind, {}))) for kind, name in KINDS.items()}

    def __call__(self, response: str, reference: Mapping) -> float:
        reference = dict(reference)
        if "candidates" in reference and "options" not in reference:
            reference["options"] = reference["candidates"]
        return self.rewards[answer_type(reference)](response, reference)
