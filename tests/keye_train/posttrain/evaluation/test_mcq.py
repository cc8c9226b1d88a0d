"""The video multiple-choice evaluator: the input formats, accuracy with breakdowns, and the runner."""

import json

import pytest

from keye_train.posttrain.evaluation.jsonl import write_jsonl
from keye_train.posttrain.evaluation.mcq import (
    DIRECT_PROMPT,
    REASONING_PROMPT,
    evaluate_mcq,
    mcq_metrics,
    mcq_prompt,
    read_mcq,
)

ROWS = [
    # Video-MME style: lettered option strings, a letter answer
    {"question_id": "v1", "videoID": "abc", "duration": "short", "question": "What colour is the car?",
     "options": ["A. red", "B. blue", "C. green", "D. white"], "answer": "B"},
    # LongVideoBench style: candidates and a 0-based correct_choice
    {"id": "l1", "video_path": "x.mp4", "duration": "long", "question": "Who speaks first?",
     "candidates": ["the man", "the woman", "the child"], "correct_choice": 2},
    # a mapping of options, an `A. text` answer, 8 options (Video-MME-v2)
    {"id": "m1", "duration": "long", "question": "Which step comes third?",
     "options": {k: f"step {k}" for k in "ABCDEFGH"}, "answer": "H. step H"},
]  # fmt: skip


@pytest.fixture
def items(tmp_path):
    path = tmp_path / "mcq.jsonl"
    write_jsonl(path, ROWS)
    return read_mcq(path)


def test_the_formats_read_into_letters_and_texts(items):
    assert [(i.id, i.answer, i.video) for i in items] == [("v1", "B", "abc"), ("l1", "C", "x.mp4"), ("m1", "H", None)]
    assert items[0].options == {"A": "red", "B": "blue", "C": "green", "D": "white"}
    assert items[1].options == {"A": "the man", "B": "the woman", "C": "the child"}
    assert items[0].fields["duration"] == "short"


def test_the_prompt_lists_the_options_and_the_answer_instruction(items):
    assert mcq_prompt(items[1]) == "Who speaks first?\nA. the man\nB. the woman\nC. the child\n" + DIRECT_PROMPT
    assert mcq_prompt(items[1], reasoning=True).endswith(REASONING_PROMPT)


def test_accuracy_and_its_breakdown_by_hand(items):
    responses = ["B", "<think>the child talks</think><answer>the child</answer>", "Final Answer: G"]
    metrics = mcq_metrics(responses, items, by=["duration"])
    assert metrics["accuracy"] == pytest.approx(200 / 3) and metrics["unparsed"] == 0.0
    assert metrics["accuracy/duration=short"] == 100.0 and metrics["accuracy/duration=long"] == 50.0
    metrics = mcq_metrics(["E", "no idea", "(H)"], items)  # E is not an option of a 4-option question
    assert metrics["accuracy"] == pytest.approx(100 / 3) and metrics["unparsed"] == 2.0


def test_the_runner_passes_prompts_and_settings(items):
    seen = []

    def generate(requests):
        seen.extend(requests)
        return ["B", "C", "H"]

    metrics, records = evaluate_mcq(items, generate, reasoning=True, settings={"frames": 64})
    assert metrics["accuracy"] == 100.0 and metrics["settings"] == {"frames": 64} and metrics["reasoning"]
    assert seen[0].prompt.endswith(REASONING_PROMPT) and seen[0].video == "abc"
    assert [r["chosen"] for r in records] == ["B", "C", "H"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q", "options": ["a", "b"], "answer": "C"}, "answer 'C' is not one of the options"),
        ({"question": "q", "options": ["a"], "answer": "A"}, ">= 2 options"),
        ({"question": "q", "answer": "A"}, "none of \\['options', 'candidates'\\]"),
        ({"question": "q", "options": ["a", "b"]}, "no 'answer' or 'correct_choice'"),
        ({"options": ["a", "b"], "answer": "A"}, "none of \\['question'\\]"),
    ],
)
def test_bad_questions_are_refused_naming_the_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:1: .*{message}"):
        read_mcq(path)
