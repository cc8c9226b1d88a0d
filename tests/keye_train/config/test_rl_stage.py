"""RL stages in the config: rl.enabled needs prompts and the unfiltered T=1 sampler (GSPO's log pi is the
trainer's CE of the raw logits), the three RL recipes compose, and objective_for picks GSPO for them."""

import pytest

from keye_train.config.compose import load_config

RL = ["rl.enabled=true", "rl.prompts=prompts.jsonl"]


@pytest.mark.parametrize(
    "override", ["rollout.sampling.temperature=0.7", "rollout.sampling.top_p=0.9", "rollout.sampling.top_k=5"]
)
def test_an_rl_stage_refuses_a_tempered_or_filtered_sampler(override):
    with pytest.raises(ValueError, match="rollout.sampling.temperature"):
        load_config([*RL, override])
    load_config([override])  # outside RL the sampler is free


@pytest.mark.parametrize("override, key", [("parallel.pp=2", "parallel.pp=2"), ("parallel.cp=2", "parallel.cp=2")])
def test_an_rl_stage_refuses_pipeline_and_context_parallelism_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        load_config([*RL, override])


def test_an_rl_stage_needs_prompts():
    with pytest.raises(ValueError, match="rl.prompts"):
        load_config(["rl.enabled=true"])


def test_the_rl_recipes_compose_and_video_rl_freezes_the_vit_and_projector():
    general, video = load_config(["recipe=rl_general"]), load_config(["recipe=rl_video"])
    assert general.rl.enabled and video.rl.enabled
    assert general.stage.trainable == ["vit", "projector", "lm"] and video.stage.trainable == ["lm"]
    assert [g.name for g in video.rl.reward_gates] == ["format"]
    assert general.parallel.pp == 1  # the rollout engine runs the whole LM on each rank
    context = load_config(["recipe=rl_context", "rl.judge=keye_train.posttrain.toy_judge:counting_judge"])
    assert [t.name for t in context.rl.rewards] == ["context_judge", "format"]
    with pytest.raises(ValueError, match="judge"):
        load_config(["recipe=rl_context"])


def test_objective_for_picks_gspo_for_an_rl_stage():
    from keye_train.training.objectives import objective_for
    from keye_train.training.objectives.gspo import GSPOObjective
    from keye_train.training.objectives.next_token import NextTokenObjective

    assert isinstance(objective_for(load_config(RL), None, "cpu"), GSPOObjective)
    assert isinstance(objective_for(load_config([]), None, "cpu"), NextTokenObjective)
