"""The ContextRL judge reward and the mistake-report re-sampling, with an in-process tiny judge and policy."""

import pytest

from keye_train.posttrain.rewards import build_reward, build_weighted
from keye_train.posttrain.rewards.base import answer_text
from keye_train.posttrain.rewards.context_rl import (
    Group,
    JudgeRequest,
    JudgeVerdict,
    TextJudge,
    conditioned_prompt,
    judge_prompt,
    parse_judge_reply,
    resample_all_negative,
    resample_requests,
)

QUESTION = "A box has 3 red and 4 blue balls. How many balls are there?"
SOLUTION = "Add the red and blue balls: 3 + 4 = 7. <answer>7</answer>"
REFERENCE = {"question": QUESTION, "solution": SOLUTION, "answer": "7"}


def tiny_judge(request: JudgeRequest) -> JudgeVerdict:
    """Full marks only for the reference answer reached by adding (the reasoning step of the solution); a right
    answer without it gets 0.2. Reports name the missing step, not the answer."""
    right = answer_text(request.response) == answer_text(request.reference_solution)
    reasoned = "3 + 4" in request.response
    score = 1.0 if right and reasoned else 0.2 if right else 0.0
    report = "You did not add the two colours together; count every ball." if request.want_report else ""
    return JudgeVerdict(score, report)


def test_the_judge_scores_the_reasoning_not_only_the_answer():
    reward = build_reward("context_judge", judge=tiny_judge)
    assert reward("3 + 4 = 7 <answer>7</answer>", REFERENCE) == 1.0
    assert reward("I guess <answer>7</answer>", REFERENCE) == pytest.approx(0.2)  # right answer, no reasoning
    assert reward("<answer>3</answer>", REFERENCE) == 0.0
    with pytest.raises(KeyError, match="solution"):
        reward("x", {"question": QUESTION})
    with pytest.raises(ValueError, match="callable"):
        build_reward("context_judge", judge="not a judge")


def test_a_hosted_judge_is_a_text_callable_behind_the_same_protocol():
    prompts = []

    def complete(prompt: str) -> str:
        prompts.append(prompt)
        return "The student skipped a step.\nScore: 0.25\nMistakes: the blue balls were not counted."

    verdict = TextJudge(complete)(JudgeRequest(QUESTION, SOLUTION, "<answer>3</answer>", want_report=True))
    assert verdict == JudgeVerdict(0.25, "the blue balls were not counted.")
    assert SOLUTION in prompts[0] and QUESTION in prompts[0] and "Mistakes:" in prompts[0]
    assert "Mistakes:" not in judge_prompt(JudgeRequest(QUESTION, SOLUTION, "x"))
    assert parse_judge_reply("Score: 7") == JudgeVerdict(0.0, "")  # out of range: no valid score
    assert parse_judge_reply("score = 1.5").score == 1.0  # clipped


def test_the_judge_joins_a_weighted_reward_from_config_like_terms():
    class Term:
        def __init__(self, name, weight=1.0, options=None):
            self.name, self.weight, self.options = name, weight, options or {}

    reward = build_weighted([Term("context_judge", 0.9), Term("exact_match", 0.1)], [Term("format")], judge=tiny_judge)
    assert reward("<think>3 + 4 = 7</think><answer>7</answer>", REFERENCE) == pytest.approx(1.0)
    assert reward("3 + 4 = 7 <answer>7</answer>", REFERENCE) == 0.0  # the format gate
    assert reward("<think>guess</think><answer>7</answer>", REFERENCE) == pytest.approx(0.9 * 0.2 + 0.1)
    # scored: the same reward and each term's raw score (what rl_term_<name>_sum logs), the judge asked once
    calls = []
    counted = build_weighted(
        [Term("context_judge", 0.9), Term("exact_match", 0.1)],
        [Term("format")],
        judge=lambda request: calls.append(request) or tiny_judge(request),
    )
    for response, judged, formatted in (
        ("<think>guess</think><answer>7</answer>", 0.2, 1.0),
        ("3 + 4 = 7 <answer>7</answer>", 1.0, 0.0),  # gated to 0, its terms still logged
    ):
        calls.clear()
        total, terms = counted.scored(response, REFERENCE)
        assert len(calls) == 1 and total == pytest.approx(reward(response, REFERENCE))
        assert terms == {"context_judge": pytest.approx(judged), "exact_match": 1.0, "format": formatted}


def tiny_policy(prompts, n):
    """Answers 3 unless a reviewer's report is in the context, then reasons its way to 7."""
    out = []
    for messages in prompts:
        told = any(m["role"] == "user" and "reviewer found" in m["content"] for m in messages)
        out.append(["3 + 4 = 7 <answer>7</answer>" if told else "<answer>3</answer>"] * n)
    return out


def test_all_negative_groups_are_resampled_on_the_report_and_recover():
    prompt = [{"role": "user", "content": QUESTION}]
    judge_reward = build_reward("context_judge", judge=tiny_judge)
    groups = [
        Group(prompt, REFERENCE, ["<answer>3</answer>", "<answer>4</answer>"], [0.0, 0.0]),  # all negative
        Group(prompt, REFERENCE, ["3 + 4 = 7 <answer>7</answer>", "<answer>3</answer>"], [1.0, 0.0]),  # mixed
    ]
    recovered = resample_all_negative(groups, tiny_judge, tiny_policy, judge_reward, group_size=2)
    assert [g.group_index for g in recovered] == [0]
    group = recovered[0]
    assert group.rewards == [1.0, 1.0] and group.metrics == {"recovered": 1.0}
    assert group.prompt == conditioned_prompt(prompt, "<answer>3</answer>", group.report)
    assert [m["role"] for m in group.prompt] == ["user", "assistant", "user"]
    assert "count every ball" in group.prompt[-1]["content"]


def test_a_report_that_gives_the_answer_away_is_not_used():
    def leaky(request):
        return JudgeVerdict(0.0, "The answer is 7." if request.want_report else "")

    groups = [Group([{"role": "user", "content": QUESTION}], REFERENCE, ["<answer>3</answer>"], [0.0])]
    assert resample_requests(groups, leaky) == []


def test_generate_must_return_group_size_responses_per_request():
    groups = [Group([{"role": "user", "content": QUESTION}], REFERENCE, ["<answer>3</answer>"], [0.0])]
    with pytest.raises(ValueError, match="expected 1 x 2"):
        resample_all_negative(groups, tiny_judge, lambda p, n: [["x"]], lambda r, ref: 0.0, group_size=2)
