"""A rule judge for the demo's Context-RL stage on the counting task (data_pipeline/rl_demo.py): it reads the
count from the verified solution and scores 1 when the response's final number equals it, else 0. It never
writes a report. A stand-in for a judge model, so the demo chain runs the context_judge reward in-process."""

from __future__ import annotations

from keye_train.posttrain.rewards.base import answer_text
from keye_train.posttrain.rewards.context_rl import JudgeRequest, JudgeVerdict
from keye_train.posttrain.rewards.match import parse_numbers


class CountingJudge:
    def __call__(self, request: JudgeRequest) -> JudgeVerdict:
        truth = parse_numbers(request.reference_solution)
        got = parse_numbers(answer_text(request.response))
        return JudgeVerdict(float(bool(truth and got and got[-1][0] == truth[-1][0])))


def counting_judge() -> CountingJudge:
    return CountingJudge()
