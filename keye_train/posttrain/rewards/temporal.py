"""Temporal grounding: timestamp parsers, temporal IoU, and the single- and multi-segment tIoU rewards.

Two parsers (training_recipe.md §8):
- `parse_timelens`: the official TimeLens parser (lmms-eval `tasks/timelens`), used by the evaluator unchanged,
  first rule that finds anything wins: (1) `HH:MM:SS(.x)` / `MM:SS(.x)` clock times, paired in order; (2) `a - b`
  pairs, else `a to b` pairs; (3) the numbers of the text, paired in order.
- `parse_segments`: the RL reward's parser, on the final answer (`<answer>...</answer>` when present) and broader:
  clock times become seconds, then every `a - b`, `a to b`, `from a to b`, `between a and b` (Time-R1's
  `number (to|and) number`), `[a, b]` list item and `a ~ b` pair, each number optionally followed by `s` / `sec` /
  `seconds`; else the first two numbers.
Times are seconds. Reward: tIoU, 0 when unparsable or start >= end.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from keye_train.posttrain.rewards.assignment import MAX_SIDE, max_weight_assignment
from keye_train.posttrain.rewards.base import answer_text, register

Segment = tuple[float, float]

_CLOCK = re.compile(r"\b(\d{1,2}:\d{2}:\d{2}(?:\.\d+)?|\d{1,2}:\d{2}(?:\.\d+)?)\b")
_NUM = r"(\d+(?:\.\d+)?|\.\d+)"


def clock_seconds(text: str) -> float:
    """`1:02:03.5` -> 3723.5, `02:03` -> 123.0."""
    parts = text.split(":")
    if len(parts) == 3:
        return int(parts[0]) * 3600 + int(parts[1]) * 60 + float(parts[2])
    if len(parts) == 2:
        return int(parts[0]) * 60 + float(parts[1])
    raise ValueError(f"{text!r} is not a clock time")


def _pairs(values: list[float]) -> list[Segment]:
    return [(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]


def parse_timelens(text: str) -> list[Segment]:
    """The official TimeLens parser; the first segment is the top-1 prediction. Empty when nothing parses."""
    text = text.lower()
    clocks = _CLOCK.findall(text)
    if len(clocks) >= 2:
        return _pairs([clock_seconds(c) for c in clocks])
    for pattern in (r"(\d+\.?\d*)\s*-\s*(\d+\.?\d*)", r"(\d+\.?\d*)\s+to\s+(\d+\.?\d*)"):
        found = re.findall(pattern, text)
        if found:
            return [(float(a), float(b)) for a, b in found]
    return _pairs([float(n) for n in re.findall(r"\b\d+\.?\d*\b", text)])


_UNIT = r"(?:\s*(?:seconds|second|secs|sec|s)\b)?"
_PAIR = re.compile(_NUM + _UNIT + r"\s*(?:-|\u2013|\u2014|~|to|and|,)\s*" + _NUM + _UNIT)


def parse_segments(response: str) -> list[Segment]:
    """All segments of a response's final answer, in order (see the module docstring). Clock times are turned
    into seconds first, so mixed answers (`from 1:05 to 90 s`) read right. Empty when unparsable."""
    text = _CLOCK.sub(lambda m: f"{clock_seconds(m.group(1)):.6f}", answer_text(response).lower())
    found = _PAIR.findall(text)
    if found:
        return [(float(a), float(b)) for a, b in found]
    numbers = [float(n) for n in re.findall(_NUM, text)]
    return _pairs(numbers[:2])


def temporal_iou(pred: Segment, ref: Segment) -> float:
    """tIoU = max(0, min(p_e, g_e) - max(p_s, g_s)) / (max(p_e, g_e) - min(p_s, g_s)); 0 when p_s >= p_e."""
    (ps, pe), (gs, ge) = pred, ref
    if ps >= pe:
        return 0.0
    hull = max(pe, ge) - min(ps, gs)
    return max(0.0, min(pe, ge) - max(ps, gs)) / hull if hull > 0 else 0.0


def time_r1_iou(pred: Segment, ref: Segment, duration: float) -> float:
    """Time-R1's shaped reward: tIoU * (1 - |p_s - g_s| / T) * (1 - |p_e - g_e| / T), T the video duration."""
    if duration <= 0:
        raise ValueError(f"time_r1_iou: duration={duration} must be > 0")
    (ps, pe), (gs, ge) = pred, ref
    return temporal_iou(pred, ref) * max(0.0, 1 - abs(ps - gs) / duration) * max(0.0, 1 - abs(pe - ge) / duration)


def reference_segments(reference: Mapping) -> list[Segment]:
    """The reference windows: `windows` / `relevant_windows` / `span` ([[s, e], ...]) or `start` and `end`."""
    for key in ("windows", "relevant_windows", "span"):
        if key in reference:
            windows = reference[key]
            if not isinstance(windows, Sequence) or not windows:
                raise ValueError(f"reference {key}={windows!r} is not a non-empty list of [start, end]")
            if isinstance(windows[0], (int, float)):
                windows = [windows]
            return [(float(s), float(e)) for s, e in windows]
    if "start" in reference and "end" in reference:
        return [(float(reference["start"]), float(reference["end"]))]
    raise KeyError("the reference has no windows, relevant_windows, span or start/end")


@register("temporal_iou")
class TemporalIoUReward:
    """tIoU of the first parsed segment against the first reference window (the top-1 protocol);
    `shaping="time_r1"` multiplies the distance factors of Time-R1 (needs the reference's `duration`)."""

    def __init__(self, shaping: str = "none"):
        if shaping not in ("none", "time_r1"):
            raise ValueError(f"temporal_iou: shaping={shaping!r}, expected one of [none, time_r1]")
        self.shaping = shaping

    def __call__(self, response: str, reference: Mapping) -> float:
        predicted = parse_segments(response)
        if not predicted:
            return 0.0
        ref = reference_segments(reference)[0]
        if self.shaping == "time_r1":
            if "duration" not in reference:
                raise KeyError("temporal_iou with shaping=time_r1 needs the reference's 'duration'")
            return time_r1_iou(predicted[0], ref, float(reference["duration"]))
        return temporal_iou(predicted[0], ref)


def deduplicate(segments: list[Segment], dup_iou: float) -> tuple[list[Segment], int]:
    """Drops every segment whose tIoU with an earlier kept one is >= dup_iou; returns (kept, dropped count)."""
    kept: list[Segment] = []
    for segment in segments:
        if any(temporal_iou(segment, k) >= dup_iou for k in kept):
            continue
        kept.append(segment)
    return kept, len(segments) - len(kept)


def multi_segment_iou(
    predicted: list[Segment], refs: list[Segment], dup_iou: float = 0.5, dup_penalty: float = 0.1
) -> float:
    """Hungarian match on tIoU: sum of the matched tIoUs / max(|kept predictions|, |references|) (a missing or an
    extra segment counts as a 0 match), minus dup_penalty per duplicate prediction, floored at 0. Predictions past
    MAX_SIDE are treated as extra (they count in the denominator, unmatched)."""
    kept, duplicates = deduplicate([p for p in predicted if p[0] < p[1]], dup_iou)
    invalid = len(predicted) - duplicates - len(kept)  # start >= end: extra segments that match nothing
    considered = kept[:MAX_SIDE]
    total, _ = max_weight_assignment([[temporal_iou(p, g) for g in refs] for p in considered])
    denominator = max(len(kept) + invalid, len(refs))
    return max(0.0, total / denominator - dup_penalty * duplicates) if denominator else 0.0


@register("temporal_iou_multi")
class MultiSegmentIoUReward:
    """`multi_segment_iou` of every parsed segment against every reference window."""

    def __init__(self, dup_iou: float = 0.5, dup_penalty: float = 0.1):
        if not 0 < dup_iou <= 1 or dup_penalty < 0:
            raise ValueError("temporal_iou_multi: dup_iou must be in (0, 1] and dup_penalty >= 0")
        self.dup_iou, self.dup_penalty = dup_iou, dup_penalty

    def __call__(self, response: str, reference: Mapping) -> float:
        predicted = parse_segments(response)
        if not predicted:
            return 0.0
        return multi_segment_iou(predicted, reference_segments(reference), self.dup_iou, self.dup_penalty)
