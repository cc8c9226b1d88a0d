"""Format, exact, numeric and multiple-choice rewards on hand-written responses."""

import pytest

from keye_train.posttrain.rewards import build_reward, reward_names
from keye_train.posttrain.rewards.base import answer_text
from keye_train.posttrain.rewards.match import extract_letter, parse_numbers


def test_every_builtin_reward_is_registered_and_an_unknown_name_lists_them():
    assert {"format", "exact_match", "numeric_match", "mcq_letter", "temporal_iou", "temporal_iou_multi"} <= set(
        reward_names()
    )
    with pytest.raises(ValueError, match="unknown reward 'nope'.*mcq_letter"):
        build_reward("nope")
    with pytest.raises(ValueError, match="numeric_match.*bad options"):
        build_reward("numeric_match", tolerance=1)


def test_the_answer_is_the_last_answer_block_then_boxed_then_after_think():
    assert answer_text("<think>maybe <answer>1</answer></think> <answer> 2 </answer>") == "2"
    assert answer_text(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert answer_text("<think>hmm</think> Paris") == "Paris"
    assert answer_text("  Paris ") == "Paris"


@pytest.mark.parametrize(
    "response, strict, lenient",
    [
        ("<think>count them</think><answer>3</answer>", 1.0, 1.0),
        ("  <think>a\nb</think>\n<answer>3</answer>\n", 1.0, 1.0),
        ("<answer>3</answer>", 0.0, 1.0),
        ("<think>a</think>", 0.0, 0.0),
        ("<think>a</think><answer> </answer>", 0.0, 0.0),
        ("<think> </think><answer>3</answer>", 0.0, 0.0),
        ("<think>a</think><answer>3</answer> and more", 0.0, 0.0),
        ("<think>a</think><answer>3</answer><answer>4</answer>", 0.0, 0.0),
        ("prefix <think>a</think><answer>3</answer>", 0.0, 0.0),
    ],
)
def test_the_format_reward_wants_one_think_then_one_answer_block(response, strict, lenient):
    assert build_reward("format")(response, {}) == strict
    assert build_reward("format", require_think=False)(response, {}) == lenient


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("<answer>The Eiffel Tower.</answer>", "eiffel tower", 1.0),
        ("<answer>an apple</answer>", ["Apple", "pear"], 1.0),
        ("<answer>Eiffel</answer>", "eiffel tower", 0.0),
        ("<answer>  new   york </answer>", "New York", 1.0),
    ],
)
def test_exact_match_normalises_case_punctuation_articles_and_spaces(response, answer, expected):
    assert build_reward("exact_match")(response, {"answer": answer}) == expected


def test_exact_match_can_be_case_sensitive():
    assert build_reward("exact_match", case_sensitive=True)("<answer>paris</answer>", {"answer": "Paris"}) == 0.0


def test_numbers_are_read_with_commas_signs_fractions_exponents_and_percents():
    text = "costs $1,234.5 or -3 units, 3/4 of 2e-3 and 45% of .5; list 1,2,30"
    assert parse_numbers(text) == [
        (1234.5, False),
        (-3.0, False),
        (0.75, False),
        (0.002, False),
        (45.0, True),
        (0.5, False),
        (1.0, False),
        (2.0, False),
        (30.0, False),
    ]


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("<answer>1,234</answer>", 1234, 1.0),
        ("<answer>about 12.00004 km</answer>", "12 km", 1.0),  # within rel_tol 1e-4
        ("<answer>12.01</answer>", 12, 0.0),
        ("step 1 gives 7, so the total is 42", "42", 1.0),  # the last number
        ("<answer>45%</answer>", 0.45, 1.0),
        ("<answer>45%</answer>", 45, 1.0),
        ("<answer>0.45</answer>", 45, 0.0),
        ("<answer>3/4</answer>", "0.75", 1.0),
        ("<answer>−5</answer>", -5, 1.0),  # a unicode minus
        ("<answer>none</answer>", 3, 0.0),
    ],
)
def test_numeric_match_compares_the_last_number_within_tolerance(response, answer, expected):
    assert build_reward("numeric_match")(response, {"answer": answer}) == expected


def test_numeric_tolerance_is_configurable():
    loose = build_reward("numeric_match", rel_tol=1e-2)
    assert loose("<answer>12.1</answer>", {"answer": 12}) == 1.0
    assert build_reward("numeric_match", abs_tol=0.5)("<answer>0.4</answer>", {"answer": 0}) == 1.0


@pytest.mark.parametrize(
    "response, expected",
    [
        ("C", "C"),
        ("(B) the red car", "B"),
        ("D. A man walking", "D"),
        ("<think>A is wrong, B is wrong</think><answer>C</answer>", "C"),
        ("The answer is (E).", "E"),
        ("I compared A and B. Final Answer: B", "B"),
        ("the answer is a cat", None),
        ("Looking at the clip, option (G) fits", "G"),
        ("It must be F.", "F"),
        ("A or B", None),
        ("Z", None),  # not among A-H
    ],
)
def test_the_option_letter_is_extracted_by_the_documented_rules(response, expected):
    assert extract_letter(response) == expected


def test_an_answer_equal_to_an_option_text_picks_that_letter():
    options = {"A": "a red car", "B": "a blue bus"}
    assert extract_letter("<answer>A blue bus.</answer>", "AB", options) == "B"


def test_the_mcq_reward_reads_letter_or_index_answers_and_the_option_count():
    mcq = build_reward("mcq_letter")
    options = ["A. dog", "B. cat", "C. bird"]
    assert mcq("<answer>B</answer>", {"answer": "B", "options": options}) == 1.0
    assert mcq("<answer>B</answer>", {"correct_choice": 1, "options": options}) == 1.0
    assert mcq("<answer>cat</answer>", {"answer": "B. cat", "options": options}) == 1.0
    assert mcq("<answer>D</answer>", {"answer": "D", "options": options}) == 0.0  # only A-C exist
    assert mcq("H", {"answer": "H"}) == 1.0  # A-H by default (Video-MME-v2)
    with pytest.raises(KeyError, match="answer"):
        mcq("A", {})


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("<answer>B</answer>", {"answer": "B", "options": ["x", "y"]}, 1.0),  # choice, from the options
        ("<answer>B</answer>", {"correct_choice": 1, "candidates": ["x", "y"]}, 1.0),  # LongVideoBench
        ("<answer>1,000</answer>", {"answer": 1000}, 1.0),  # number, from the answer's type
        ("<answer>The cat</answer>", {"answer": "cat"}, 1.0),  # text
        ("<answer>12</answer>", {"answer": "12.0", "answer_type": "number"}, 1.0),  # declared
        ("<answer>12</answer>", {"answer": "12.0"}, 0.0),  # as text it differs
        ("<answer>2 to 6</answer>", {"windows": [[4, 10]]}, 0.25),  # segment
        ("<answer>[[0, 10], [20, 30]]</answer>", {"windows": [[0, 10], [20, 30]], "answer_type": "segments"}, 1.0),
    ],
)
def test_the_outcome_reward_picks_the_reward_of_the_answer_type(response, reference, expected):
    assert build_reward("outcome")(response, reference) == pytest.approx(expected)


def test_the_outcome_reward_passes_options_per_type_and_refuses_unknown_types():
    loose = build_reward("outcome", number={"rel_tol": 0.1})
    assert loose("<answer>105</answer>", {"answer": 100}) == 1.0
    with pytest.raises(ValueError, match="unknown answer types"):
        build_reward("outcome", numbers={})
    with pytest.raises(ValueError, match="answer_type='date'"):
        build_reward("outcome")("x", {"answer": "x", "answer_type": "date"})


def test_distinct_words_is_the_share_of_words_said_once_or_first():
    from keye_train.posttrain.rewards.base import REGISTRY

    reward = REGISTRY["distinct_words"]()
    assert reward("a a a a", {}) == 0.25
    assert reward("there are 3 dots", {}) == 1.0
    assert reward("a b a b", {}) == 0.5
    assert reward("   ", {}) == 0.0
