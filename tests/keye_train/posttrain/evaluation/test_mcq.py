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


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is C", "C"),
        ("Final Answer: (B).", "B"),
        ("because it is d", None),
        ("Because of the dog, D", "B"),  # the official rule: the first capital A-H, whatever the word
    ],
)
def test_the_video_mme_v2_extraction_is_the_official_one(response, expected):
    from keye_train.posttrain.evaluation.mcq import video_mme_v2_letter

    assert video_mme_v2_letter(response) == expected


@pytest.mark.parametrize(
    "correct, group_type, structure, expected",
    [
        ([1, 1, 0, 1], "relevance", None, 900 / 16),  # 3 right, order irrelevant
        ([0, 0, 0, 1], "relevance", None, 100 / 16),
        ([1, 1, 0, 1], "logic", "[1, 2, 3, 4]", 400 / 16),  # truncated at the first error: 2
        ([0, 1, 1, 1], "logic", "[1, 2, 3, 4]", 0.0),
        ([1, 0, 1, 1], "logic", "[1, [2, 3], 4]", 400 / 12),  # 2 and 3 are parallel: 1 + 3 count 2
        ([1, 1, 1, 0], "logic", [1, [2, 3], 4], 700 / 12),
        ([0, 1, 0, 0], "logic", "[[1,2],3,4]", 10.0),  # 1 and 2 are parallel: 2 alone counts 1
        ([1, 1, 1, 1], "logic", "[[1, 2], 3, 4]", 100.0),
    ],
)
def test_video_mme_v2_group_scores_by_hand(correct, group_type, structure, expected):
    import json as _json

    from keye_train.posttrain.evaluation.mcq import group_score

    structure = _json.dumps(structure) if isinstance(structure, list) else structure
    assert group_score([bool(c) for c in correct], group_type, structure) == pytest.approx(expected)


def test_video_mme_v2_nonlin_over_groups_of_four(tmp_path):
    from keye_train.posttrain.evaluation.mcq import video_mme_v2_nonlin

    rows = []
    for g, (kind, structure) in enumerate([("relevance", None), ("logic", [1, [2, 3], 4])]):
        for q in range(4):
            row = {"id": f"{g}-{q}", "question": "q", "options": [f"o{k}" for k in range(8)], "answer": "A"}
            row["group_type"] = kind
            if structure is not None:
                row["group_structure"] = structure
            rows.append(row)
    path = tmp_path / "v2.jsonl"
    write_jsonl(path, rows)
    items = read_mcq(path)
    responses = ["A", "B", "A", "A"] + ["Final Answer: A", "C", "A", "E"]
    metrics = video_mme_v2_nonlin(responses, items)
    assert metrics["non_lin/relevance"] == pytest.approx(900 / 16)
    assert metrics["non_lin/logic"] == pytest.approx(400 / 12)
    assert metrics["non_lin"] == pytest.approx((900 / 16 + 400 / 12) / 2)
    with pytest.raises(ValueError, match="groups of 4"):
        video_mme_v2_nonlin(responses[:3], items[:3])
