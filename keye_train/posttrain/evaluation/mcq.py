"""Video multiple-choice accuracy (Video-MME v1/v2, LongVideoBench, MLVU M-Avg: training_recipe.md §8).

Inputs (JSONL, one question per line): `question`; the options as `options` (a list in letter order, `A. text`
prefixes allowed, or a mapping letter -> text) or `candidates` (LongVideoBench); the answer as `answer` (a letter
or `A. text`) or `correct_choice` (0-based, LongVideoBench); an id from `id` / `question_id` / `qid` (else the line
number); the video from `video` / `video_path` / `videoID`; any other string fields (`category`, `task_type`,
`duration`, ...) can break the accuracy down. Letters are extracted by `rewards.match.extract_letter`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keye_train.posttrain.evaluation.jsonl import first_key, read_jsonl
from keye_train.posttrain.evaluation.request import EvalRequest, Generate
from keye_train.posttrain.rewards.match import LETTERS, extract_letter, option_texts, reference_letter

DIRECT_PROMPT = "Answer with the option's letter from the given choices directly."
REASONING_PROMPT = "Think step by step, then give the final answer as 'Final Answer: <letter>'."


@dataclass(frozen=True)
class MCQItem:
    id: str
    question: str
    options: Mapping[str, str]  # letter -> text
    answer: str  # the correct letter
    video: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)  # other string fields, for breakdowns


def mcq_item(record: dict, where: str, number: int) -> MCQItem:
    question = first_key(record, ("question",), where)
    raw = dict(record)
    if "options" not in raw and "candidates" in raw:
        raw["options"] = raw["candidates"]
    if "options" not in raw:
        raise ValueError(f"{where}: none of ['options', 'candidates'] is present")
    options = option_texts(raw)
    if len(options) < 2:
        raise ValueError(f"{where}: a question needs >= 2 options")
    if set(options) != set(LETTERS[: len(options)]):
        raise ValueError(f"{where}: option letters {sorted(options)} are not A.. in order")
    try:
        answer = reference_letter(raw)
    except (KeyError, ValueError, IndexError) as err:
        raise ValueError(f"{where}: {err}") from err
    if answer not in options:
        raise ValueError(f"{where}: answer {answer!r} is not one of the options {sorted(options)}")
    ident = record.get("id", record.get("question_id", record.get("qid", number)))
    video = record.get("video", record.get("video_path", record.get("videoID")))
    skip = {"question", "options", "candidates", "answer", "correct_choice", "id", "question_id", "qid"}
    extra = {k: v for k, v in record.items() if isinstance(v, str) and k not in skip}
    return MCQItem(str(ident), str(question), options, answer, video, extra)


def read_mcq(path: str | Path) -> list[MCQItem]:
    items = [mcq_item(record, f"{path}:{number}", number) for number, record in read_jsonl(path)]
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids repeat")
    return items


def mcq_prompt(item: MCQItem, reasoning: bool = False) -> str:
    lines = [item.question, *(f"{letter}. {text}" for letter, text in sorted(item.options.items()))]
    return "\n".join([*lines, REASONING_PROMPT if reasoning else DIRECT_PROMPT])


def chosen_letter(response: str, item: MCQItem) -> str | None:
    return extract_letter(response, LETTERS[: len(item.options)], item.options)


def mcq_metrics(responses: Sequence[str], items: Sequence[MCQItem], by: Sequence[str] = ()) -> dict:
    """Accuracy in percent (an unparsed answer is wrong), the counts, and `accuracy/<field>=<value>` for each
    field in `by` (a question without the field counts under `<field>=?`)."""
    if len(responses) != len(items):
        raise ValueError(f"{len(responses)} responses for {len(items)} questions")
    if not items:
        raise ValueError("no questions to evaluate")
    letters = [chosen_letter(r, item) for r, item in zip(responses, items)]
    correct = [letter == item.answer for letter, item in zip(letters, items)]
    metrics = {
        "accuracy": 100.0 * sum(correct) / len(correct),
        "questions": float(len(items)),
        "unparsed": float(sum(letter is None for letter in letters)),
    }
    for key in by:
        buckets: dict[str, list[bool]] = {}
        for item, ok in zip(items, correct):
            buckets.setdefault(str(item.fields.get(key, "?")), []).append(ok)
        for value, oks in sorted(buckets.items()):
            metrics[f"accuracy/{key}={value}"] = 100.0 * sum(oks) / len(oks)
    return metrics


def evaluate_mcq(
    items: Sequence[MCQItem],
    generate: Generate,
    reasoning: bool = False,
    by: Sequence[str] = (),
    settings: Mapping | None = None,
) -> tuple[dict, list[dict]]:
    """Asks `generate` for every question's response and scores them; `settings` travel with the requests and
    the result (see grounding.evaluate_grounding)."""
    settings = dict(settings or {})
    requests = [EvalRequest(item.id, mcq_prompt(item, reasoning), item.video, settings) for item in items]
    responses = list(generate(requests))
    metrics = mcq_metrics(responses, items, by)
    records = [
        {"id": item.id, "response": response, "chosen": chosen_letter(response, item), "answer": item.answer}
        for item, response in zip(items, responses)
    ]
    return {**metrics, "settings": settings, "reasoning": reasoning}, records
