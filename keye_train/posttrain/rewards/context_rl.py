"""ContextRL (arXiv 2602.22623, used by KEYE): a judge that sees the verified reference solution, and the
re-sampling of all-negative groups conditioned on the judge's mistake report.

*Identifiability.* The judge is any callable `JudgeRequest -> JudgeVerdict` (an in-process model, a rule, or a
hosted model behind `TextJudge`, which formats `judge_prompt` and parses the reply). It sees the question, the full
verified reference solution and the response, and scores the reasoning, not only the final answer, so a right
answer reached by wrong reasoning scores low.

*Reachability.* When every response of a group scores below the threshold (GSPO would get A = 0 everywhere), the
judge writes a mistake report on the group's best response (without giving the answer away: a report that
contains the reference answer is dropped), and the policy answers again in a multi-turn context: the original
prompt, its failed answer, then the report as a new user turn. `resample_all_negative` builds those prompts,
calls the given `generate` and scores the new responses.

*How recovered samples enter the GSPO loss* (KEYE leaves it open, training_recipe.md §6 options (a)/(b)): we take
option (a). The G re-sampled responses form a new group **in the report-conditioned context** and replace the
all-negative group: the trainer packs `conditioned prompt + response`, supervises the response tokens only, and
takes pi_old and the rollout log-probs from that same context, in which they were sampled; the advantages are
normalised within the new group (still all-equal: dynamic sampling drops it). This keeps every sample on-policy for
its own context, so GSPO's sequence ratio stays near 1. Option (b), training the recovered answer on the original
prompt, needs the sequence-level importance weight pi(y|x) / pi(y|x, report), a product over hundreds of tokens
that is far outside GSPO's [1 - 3e-4, 1 + 4e-4] clip, so nearly every such sample would be clipped to no gradient.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keye_train.posttrain.rewards.base import register
from keye_train.posttrain.rewards.match import normalize_text

Messages = list[dict[str, Any]]  # ChatML-style turns: {"role": ..., "content": ...}


@dataclass(frozen=True)
class JudgeRequest:
    question: str
    reference_solution: str  # the verified full solution, reasoning included
    response: str
    want_report: bool = False  # also write a mistake report (the response failed)


@dataclass(frozen=True)
class JudgeVerdict:
    score: float  # in [0, 1]: 1 = correct answer with sound reasoning
    report: str = ""  # the mistakes found, when asked; must not reveal the reference answer


Judge = Callable[[JudgeRequest], JudgeVerdict]

JUDGE_TEMPLATE = """You are grading a student's solution against a verified reference solution.
Judge the reasoning, not only the final answer: penalise factual errors, invalid deductions, unsupported
assumptions and inconsistent steps. A correct final answer reached by wrong reasoning is wrong.

[Question]
{question}

[Reference solution]
{reference}

[Student solution]
{response}

Reply with a line `Score: <a number from 0 to 1>`.{report_line}"""

REPORT_LINE = """ Then a line `Mistakes:` followed by a short report of the student's mistakes that would let
them correct their own solution. Do not state the reference's final answer."""

RETRY_TEMPLATE = """Your previous answer was checked and it is not correct. A reviewer found these mistakes:
{report}
Please solve the problem again from the start, avoiding these mistakes."""


def judge_prompt(request: JudgeRequest) -> str:
    return JUDGE_TEMPLATE.format(
        question=request.question,
        reference=request.reference_solution,
        response=request.response,
        report_line=REPORT_LINE if request.want_report else "",
    )


_SCORE = re.compile(r"score\s*[:=]\s*([01](?:\.\d+)?|\.\d+)", re.IGNORECASE)
_MISTAKES = re.compile(r"mistakes\s*:\s*(.*)", re.IGNORECASE | re.DOTALL)


def parse_judge_reply(reply: str) -> JudgeVerdict:
    """`Score: x` (clipped to [0, 1]; missing gives 0) and the text after `Mistakes:`."""
    score = _SCORE.search(reply)
    report = _MISTAKES.search(reply)
    value = min(1.0, max(0.0, float(score.group(1)))) if score else 0.0
    return JudgeVerdict(value, report.group(1).strip() if report else "")


class TextJudge:
    """A judge behind a text-completion callable (a hosted model): prompt -> reply."""

    def __init__(self, complete: Callable[[str], str]):
        self.complete = complete

    def __call__(self, request: JudgeRequest) -> JudgeVerdict:
        return parse_judge_reply(self.complete(judge_prompt(request)))


def _reference_fields(reference: Mapping) -> tuple[str, str]:
    for key in ("question", "solution"):
        if key not in reference:
            raise KeyError(f"the context_judge reward needs the reference's {key!r}")
    return str(reference["question"]), str(reference["solution"])


@register("context_judge")
class ContextJudgeReward:
    """The judge's score of a response given the verified solution. Reference keys: `question`, `solution`."""

    def __init__(self, judge: Judge):
        if not callable(judge):
            raise ValueError("context_judge: judge must be a callable JudgeRequest -> JudgeVerdict")
        self.judge = judge

    def __call__(self, response: str, reference: Mapping) -> float:
        question, solution = _reference_fields(reference)
        verdict = self.judge(JudgeRequest(question, solution, response))
        return min(1.0, max(0.0, float(verdict.score)))


@dataclass
class Group:
    """One prompt's G responses and their rewards, as the rollout produced them."""

    prompt: Messages
    reference: Mapping[str, Any]
    responses: list[Any]  # str, or objects with a `.text` (the rollout's response records)
    rewards: list[float]


@dataclass
class ResampleRequest:
    """What to generate for one all-negative group: G new responses to `prompt` (the report-conditioned turns)."""

    group_index: int
    prompt: Messages
    report: str
    failed_response: str
    failed_index: int = 0  # which of the group's responses failed_response is (the one the judge reported on)


@dataclass
class RecoveredGroup:
    """The new group that replaces group `group_index`: its responses live in the conditioned `prompt`."""

    group_index: int
    prompt: Messages
    responses: list[Any]
    rewards: list[float]
    report: str
    metrics: dict = field(default_factory=dict)


def text_of(response: Any) -> str:
    return response if isinstance(response, str) else response.text


def conditioned_prompt(prompt: Messages, failed_response: str, report: str) -> Messages:
    """The multi-turn re-sampling context: the prompt, the failed answer, then the report as a user turn."""
    return [
        *prompt,
        {"role": "assistant", "content": failed_response},
        {"role": "user", "content": RETRY_TEMPLATE.format(report=report)},
    ]


def leaks_answer(report: str, reference: Mapping) -> bool:
    """True when the report states the reference's final answer (normalised substring, answers of >= 1 char)."""
    answer = reference.get("answer")
    answers = answer if isinstance(answer, (list, tuple)) else [answer] if answer is not None else []
    words = f" {normalize_text(report)} "
    return any(normalize_text(str(a)) and f" {normalize_text(str(a))} " in words for a in answers)


def resample_requests(groups: Sequence[Group], judge: Judge, threshold: float = 0.5) -> list[ResampleRequest]:
    """One request per all-negative group (every reward < threshold) whose judge report is usable."""
    requests = []
    for index, group in enumerate(groups):
        if not group.rewards or max(group.rewards) >= threshold:
            continue
        question, solution = _reference_fields(group.reference)
        failed = max(range(len(group.rewards)), key=group.rewards.__getitem__)
        best = text_of(group.responses[failed])
        verdict = judge(JudgeRequest(question, solution, best, want_report=True))
        report = verdict.report.strip()
        if not report or leaks_answer(report, group.reference):
            continue
        requests.append(ResampleRequest(index, conditioned_prompt(group.prompt, best, report), report, best, failed))
    return requests


def resample_all_negative(
    groups: Sequence[Group],
    judge: Judge,
    generate: Callable[[list[Messages], int], list[list[Any]]],
    reward: Callable[[str, Mapping], float],
    group_size: int,
    threshold: float = 0.5,
) -> list[RecoveredGroup]:
    """Re-samples every all-negative group conditioned on its mistake report. `generate(prompts, n)` returns n
    responses per prompt (strings or records with `.text`); `reward` scores them (the same reward the groups were
    scored with). Returns the groups to substitute, in group order; `metrics["recovered"]` says whether any new
    response reached the threshold."""
    requests = resample_requests(groups, judge, threshold)
    if not requests:
        return []
    outputs = generate([r.prompt for r in requests], group_size)
    if len(outputs) != len(requests) or any(len(o) != group_size for o in outputs):
        raise ValueError(f"generate returned {[len(o) for o in outputs]}, expected {len(requests)} x {group_size}")
    recovered = []
    for request, responses in zip(requests, outputs):
        reference = groups[request.group_index].reference
        rewards = [float(reward(text_of(r), reference)) for r in responses]
        metrics = {"recovered": float(max(rewards) >= threshold)}
        recovered.append(
            RecoveredGroup(request.group_index, request.prompt, responses, rewards, request.report, metrics)
        )
    return recovered
