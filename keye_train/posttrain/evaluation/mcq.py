"""Video multiple-choice accuracy (Video-MME v1/v2, LongVideoBench, MLVU M-Avg: training_recipe.md §8).

Inputs (JSONL, one question per line): `question`; the options as `options` (a list in letter order, `A. text`
prefixes allowed, or a mapping letter -> text) or `candidates` (LongVideoBench); the answer as `answer` (a letter
or `A. text`) or `correct_choice` (0-based, LongVideoBench); an id from `id` / `question_id` / `qid` (else the line
number); the video from `video` / `video_path` / `videoID`; any other string fields (`category`, `task_type`,
`duration`, ...) can break the accuracy down. Letters are extracted by `rewards.match.extract_letter`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
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
    extra = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in record.items()
        if k not in skip and isinstance(v, (str, int, float, list))
    }
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
    """Our extraction (rewards.match.extract_letter), over this question's letters and option texts."""
    return extract_letter(response, LETTERS[: len(item.options)], item.options)


_V2_PREFIXES = (
    "Final Answer:",
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
    "Answer:",
    "Option:",
)


def video_mme_v2_letter(response: str, item: MCQItem | None = None) -> str | None:
    """Video-MME-v2's official extraction (evaluation/test_video_mme_v2.py): drop the answer prefixes, then the
    first capital A-H anywhere in the text (so `Because ...` reads as B, as it does there); None without one."""
    text = response.strip()
    for prefix in _V2_PREFIXES:
        text = text.replace(prefix, "")
    found = re.search(r"[A-H]", text)
    return found.group(0) if found else None


Extractor = Callable[[str, MCQItem], str | None]


def mcq_metrics(
    responses: Sequence[str], items: Sequence[MCQItem], by: Sequence[str] = (), extract: Extractor = chosen_letter
) -> dict:
    """Accuracy in percent (an unparsed answer is wrong), the counts, and `accuracy/<field>=<value>` for each
    field in `by` (a question without the field counts under `<field>=?`). `extract`: chosen_letter, or
    video_mme_v2_letter to reproduce Video-MME-v2's numbers."""
    if len(responses) != len(items):
        raise ValueError(f"{len(responses)} responses for {len(items)} questions")
    if not items:
        raise ValueError("no questions to evaluate")
    letters = [extract(r, item) for r, item in zip(responses, items)]
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


# Video-MME-v2 Non-Lin (training_recipe.md §8): per group of 4 questions, the score of k "counted" correct answers.
_QUADRATIC = (0.0, 100 / 16, 400 / 16, 900 / 16, 100.0)
_LOGIC_MAPS = {
    "[1, 2, 3, 4]": _QUADRATIC,
    "[1, [2, 3], 4]": (0.0, 100 / 12, 400 / 12, 700 / 12, 100.0),
    "[[1, 2], 3, 4]": (0.0, 10.0, 20.0, 50.0, 100.0),
}


def group_score(correct: Sequence[bool], group_type: str, structure: str | None = None) -> float:
    """One group's Non-Lin score. `relevance` (consistency): (k/4)^2 * 100 for k correct. `logic` (coherence):
    the correct answers counted from question 1 up to the first error, where parallel questions of the structure
    count together ([1,[2,3],4]: 1 right, 2 wrong, 3 right counts 2; [[1,2],3,4]: 1 wrong, 2 right counts 1)."""
    if len(correct) != 4:
        raise ValueError(f"a Video-MME-v2 group has 4 questions, got {len(correct)}")
    if group_type == "relevance":
        return _QUADRATIC[sum(bool(c) for c in correct)]
    if group_type != "logic":
        raise ValueError(f"group_type={group_type!r}, expected relevance or logic")
    key = json.dumps(json.loads(structure)) if structure is not None else None
    if key not in _LOGIC_MAPS:
        raise ValueError(f"group_structure={structure!r}, expected one of {list(_LOGIC_MAPS)}")
    counted = 0
    while counted < 4 and correct[counted]:
        counted += 1
    if key == "[1, [2, 3], 4]" and counted == 1 and correct[2]:
        counted = 2
    if key == "[[1, 2], 3, 4]" and counted == 0 and correct[1]:
        counted = 1
    return _LOGIC_MAPS[key][counted]


def video_mme_v2_nonlin(responses: Sequence[str], items: Sequence[MCQItem], extract: Extractor = video_mme_v2_letter):
    """Non-Lin over consecutive groups of 4 questions, each with the fields `group_type` and (logic groups)
    `group_structure`: the mean group score, and the means over relevance and logic groups. An unparsed answer
    is wrong (the official script scores it -1, which its logic count reads as right; we do not copy that)."""
    if len(responses) != len(items) or len(items) % 4:
        raise ValueError(f"{len(responses)} responses for {len(items)} questions, in groups of 4")
    scores: dict[str, list[float]] = {"relevance": [], "logic": []}
    for start in range(0, len(items), 4):
        group = items[start : start + 4]
        correct = [extract(r, item) == item.answer for r, item in zip(responses[start : start + 4], group)]
        kind = group[-1].fields.get("group_type")
        if kind is None:
            raise ValueError(f"question {group[-1].id}: no group_type")
        scores.setdefault(kind, []).append(group_score(correct, kind, group[-1].fields.get("group_structure")))
    every = [s for values in scores.values() for s in values]
    out = {"non_lin": sum(every) / len(every)}
    out.update({f"non_lin/{k}": sum(v) / len(v) for k, v in scores.items() if v})
    return out
