"""TimeLens-style temporal-grounding evaluation (training_recipe.md §8; lmms-eval `tasks/timelens`).

Prompt: the official TimeLens sentence around the query (whitespace-normalised, trailing period removed).
Parser: `rewards.temporal.parse_timelens`, the first parsed segment is the top-1 prediction; unparsable or
start >= end gives IoU 0. Reference: the first annotated window, as lmms-eval scores TimeLens (`span[0]`).
Metrics, in percent: R1@0.3, R1@0.5, R1@0.7 (queries whose top-1 tIoU >= the threshold) and mIoU.

Inputs (JSONL, one query per line), any of:
- QVHighlights (`qid`, `query`, `vid`, `duration`, `relevant_windows`), as in ../shared/testdata/annotations;
- TimeLens / lmms-eval (`video_path`, `query`, `span`: [[start, end], ...]), ids are the line numbers;
- keye-train's `grounding` manifest records (`id`, `video`, `query`, `start`, `end`).
Predictions: `{"id": ..., "response": ...}` per line (evaluation/jsonl.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from keye_train.posttrain.evaluation.jsonl import first_key, read_jsonl
from keye_train.posttrain.evaluation.request import EvalRequest, Generate
from keye_train.posttrain.rewards.temporal import Segment, parse_timelens, temporal_iou

TIMELENS_PROMPT = (
    "Please find the visual event described by the sentence '{query}', determining its starting and ending "
    "times. The format should be: 'The event happens in <start time> - <end time> seconds'."
)
THRESHOLDS = (0.3, 0.5, 0.7)


def normalize_query(query: str) -> str:
    """Whitespace runs become one space; trailing periods are removed."""
    return " ".join(query.split()).rstrip(".").rstrip()


def timelens_prompt(query: str) -> str:
    return TIMELENS_PROMPT.format(query=normalize_query(query))


@dataclass(frozen=True)
class GroundingItem:
    id: str
    query: str
    windows: tuple[Segment, ...]  # seconds; the first is the scored one
    video: str | None = None
    duration: float | None = None


def _windows(value, where: str) -> tuple[Segment, ...]:
    if isinstance(value, Sequence) and value and isinstance(value[0], (int, float)):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"{where}: windows must be a non-empty list of [start, end]")
    out = []
    for window in value:
        if not isinstance(window, Sequence) or len(window) != 2:
            raise ValueError(f"{where}: window {window!r} is not [start, end]")
        start, end = float(window[0]), float(window[1])
        if not 0 <= start <= end:
            raise ValueError(f"{where}: window {window!r} needs 0 <= start <= end")
        out.append((start, end))
    return tuple(out)


def grounding_item(record: dict, where: str, number: int) -> GroundingItem:
    query = first_key(record, ("query", "sentence"), where)
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"{where}: 'query' must be a non-empty string")
    if "relevant_windows" in record or "span" in record:
        key = "relevant_windows" if "relevant_windows" in record else "span"
        windows = _windows(record[key], f"{where}: {key}")
    elif "start" in record and "end" in record:
        windows = _windows([record["start"], record["end"]], f"{where}: start/end")
    else:
        raise ValueError(f"{where}: none of relevant_windows, span, start/end is present")
    ident = record.get("id", record.get("qid", number))
    video = record.get("video", record.get("video_path", record.get("vid")))
    duration = record.get("duration")
    return GroundingItem(str(ident), query, windows, video, float(duration) if duration is not None else None)


def read_grounding(path: str | Path) -> list[GroundingItem]:
    items = [grounding_item(record, f"{path}:{number}", number) for number, record in read_jsonl(path)]
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids repeat")
    return items


def query_iou(response: str, item: GroundingItem) -> float | None:
    """The top-1 tIoU, or None when nothing parses (scored 0)."""
    segments = parse_timelens(response)
    return temporal_iou(segments[0], item.windows[0]) if segments else None


def grounding_metrics(responses: Sequence[str], items: Sequence[GroundingItem]) -> dict[str, float]:
    """R1@0.3/0.5/0.7 and mIoU in percent, plus the query and unparsed counts. responses[k] answers items[k]."""
    if len(responses) != len(items):
        raise ValueError(f"{len(responses)} responses for {len(items)} queries")
    if not items:
        raise ValueError("no queries to evaluate")
    scored = [query_iou(r, item) for r, item in zip(responses, items)]
    ious = [0.0 if s is None else s for s in scored]
    metrics = {f"R1@{t}": 100.0 * sum(v >= t for v in ious) / len(ious) for t in THRESHOLDS}
    metrics["mIoU"] = 100.0 * sum(ious) / len(ious)
    metrics["queries"] = float(len(ious))
    metrics["unparsed"] = float(sum(s is None for s in scored))
    return metrics


def metrics_from_predictions(predictions: Mapping[str, str], items: Sequence[GroundingItem]) -> dict[str, float]:
    """The metrics of an id -> response mapping; a query without a prediction is an error (not a silent 0)."""
    missing = [item.id for item in items if item.id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} queries, e.g. {missing[:3]}")
    return grounding_metrics([predictions[item.id] for item in items], items)


def evaluate_grounding(
    items: Sequence[GroundingItem], generate: Generate, settings: Mapping | None = None
) -> tuple[dict, list[dict]]:
    """Asks `generate` for every query's response (the rollout engine, greedy, as lmms-eval does), then scores
    them. `settings` (fps, frame cap, pixel budget, think mode...) travel with each request and with the result,
    so every number says how it was measured. Returns (metrics + settings, per-query records)."""
    settings = dict(settings or {})
    requests = [EvalRequest(item.id, timelens_prompt(item.query), item.video, settings) for item in items]
    responses = list(generate(requests))
    metrics = grounding_metrics(responses, items)
    records = []
    for item, request, response in zip(items, requests, responses):
        iou = query_iou(response, item)
        records.append({"id": item.id, "prompt": request.prompt, "response": response, "iou": iou or 0.0})
    return {**metrics, "settings": settings, "prompt_template": TIMELENS_PROMPT}, records
