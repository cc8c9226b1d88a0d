"""The demo's answered toy-task chat samples (keye-data demo --toy-sft-samples): valid chat records whose user
turn is an RL prompt of the same tasks and whose supervised answer the outcome reward scores 1."""

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
