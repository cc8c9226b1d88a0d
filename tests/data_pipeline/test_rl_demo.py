"""The demo's RL toy tasks: the answered chat samples (keye-data demo --toy-sft-samples) are valid chat records
whose user turn is an RL prompt of the same tasks and whose supervised answer the outcome reward scores 1; the
General-RL counting prompts (rl_counting.jsonl) count 1 or 2 marks and the outcome pays only the right count."""

import json

from data_pipeline.rl_demo import toy_prompts, toy_sft_records
from data_pipeline.schema import render, validate
from keye_train.posttrain.rewards import build_reward


def test_toy_sft_records_answer_the_toy_tasks_in_their_reward_formats():
    records, prompts = toy_sft_records(8, seed=1), toy_prompts(8, seed=1)
    outcome = build_reward("outcome")
    assert {p["task"] for p in prompts} == {"counting", "grounding"}
    for record, prompt in zip(records, prompts):
        validate(record)
        user, answer = record["messages"]
        assert user["content"] == [{"text": prompt["prompt"]}]
        assert outcome(answer["content"], prompt) == 1.0
        supervised = "".join(s.value for s in render(record) if s.supervised and s.kind == "text")
        assert supervised == answer["content"]


def test_general_rl_counting_prompts_have_counts_of_one_or_two_and_the_outcome_checks_the_count(tmp_path):
    from data_pipeline.rl_demo import counting_prompts, write_counting_prompts

    path = write_counting_prompts(tmp_path / "rl_counting.jsonl", count=64, seed=0, max_count=2)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == counting_prompts(64, seed=0, max_count=2)
    outcome = build_reward("outcome")
    assert {p["answer"] for p in written} == {"1", "2"}
    for prompt in written:
        marks = prompt["prompt"].split(" : ", 1)[1].split(" ? ", 1)[0].split()
        assert str(len(marks)) == prompt["answer"]
        other = "1" if prompt["answer"] == "2" else "2"
        assert outcome(prompt["answer"], prompt) == 1.0
        assert outcome(f" {prompt['answer']}\n", prompt) == 1.0
        assert outcome(other, prompt) == 0.0
        assert outcome(" x x", prompt) == 0.0
