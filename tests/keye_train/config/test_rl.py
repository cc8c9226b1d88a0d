"""The `rl` section and its config group: the options compose, every check names its key, and every reward the
defaults name is registered."""

import pytest

from keye_train.config import RLConfig
from keye_train.config.compose import load_checked_config, load_config
from keye_train.posttrain.rewards import build_weighted, reward_names
from tests.helpers import QUIET


@pytest.mark.parametrize("option", ["gspo", "context", "video"])
def test_every_rl_option_composes_and_builds_its_rewards(option):
    cfg = load_config([f"rl={option}"])
    assert (cfg.rl.clip_ratio_low, cfg.rl.clip_ratio_high, cfg.rl.group_size) == (3e-4, 4e-4, 8)
    names = [t.name for t in cfg.rl.rewards + cfg.rl.reward_gates]
    assert set(names) <= set(reward_names())
    reward = build_weighted(cfg.rl.rewards, cfg.rl.reward_gates, judge=lambda request: None)
    assert [name for name, _, _ in reward.terms] == [t.name for t in cfg.rl.rewards]


def test_the_video_option_gates_on_the_format_and_context_rl_resamples():
    video, context = load_config(["rl=video"]).rl, load_config(["rl=context"]).rl
    assert [g.name for g in video.reward_gates] == ["format"]
    assert context.recovered_samples == "conditioned" and context.rewards[0].name == "context_judge"
    assert load_config([]).rl.recovered_samples == "none"


@pytest.mark.parametrize(
    "override, message",
    [
        ("rl.group_size=1", "rl.group_size=1 must be >= 2"),
        ("rl.clip_ratio_low=0", "rl.clip_ratio_low=0"),
        ("rl.clip_ratio_high=1.5", "rl.clip_ratio_high=1.5"),
        ("rl.adv_eps=0", "rl.adv_eps=0"),
        ("rl.icepop_low=2", "rl.icepop_low=2"),
        ("rl.oversample_factor=0.5", "rl.oversample_factor=0.5"),
        ("rl.max_sampling_rounds=0", "rl.max_sampling_rounds=0"),
        ("rl.prompts_per_step=0", "rl.prompts_per_step=0"),
        ("rl.rewards=[{name: nope}]", r"rl.rewards\[0\].name='nope' is not a registered reward"),
        ("rl.reward_gates=[{name: nope}]", r"rl.reward_gates\[0\].name='nope'"),
        ("rl.rewards=[{name: format, weight: -1}]", r"rl.rewards\[0\].weight=-1"),
        ("rl.rewards=[]", "rl.rewards is empty"),
    ],
)
def test_a_bad_rl_value_is_refused_naming_its_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_checked_config([*QUIET, override], world=1, check_data=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rl.routing_replay=true"], "rl.routing_replay=true needs rl.enabled=true"),
        (["model.lm.num_experts=0"], r"rl.routing_replay=true needs an MoE LM \(model.lm.num_experts"),
        (["parallel.pp=2"], "rl.routing_replay=true with parallel.pp=2"),
        (["parallel.cp=2"], "rl.routing_replay=true with parallel.cp=2"),
    ],
)
def test_routing_replay_is_refused_where_it_cannot_hold_one_micro_batchs_routes(overrides, message):
    rl = (
        []
        if overrides == ["rl.routing_replay=true"]
        else ["rl.enabled=true", "rl.prompts=p.jsonl", "rl.routing_replay=true"]
    )
    with pytest.raises(ValueError, match=message):
        load_checked_config([*QUIET, *rl, *overrides], world=4, check_data=False)


def test_conditioned_resampling_needs_a_judge_and_the_gspo_data_source():
    rl = ["rl.enabled=true", "rl.prompts=p.jsonl", "rl.recovered_samples=conditioned"]
    with pytest.raises(ValueError, match="rl.judge is empty: rl.recovered_samples=conditioned"):
        load_checked_config([*QUIET, *rl], world=1, check_data=False)
    with pytest.raises(ValueError, match="rl.recovered_samples=conditioned with mopd.enabled=true"):
        load_checked_config([*QUIET, *rl, "rl.judge=a:b", "mopd=demo", "mopd.enabled=true"], world=1, check_data=False)


def test_an_unknown_rl_key_or_choice_is_refused_by_name():
    with pytest.raises(ValueError, match="rl.correction"):
        load_checked_config([*QUIET, "rl.correction=dual"], world=1, check_data=False)
    with pytest.raises(ValueError, match="rl.nope"):
        load_checked_config([*QUIET, "rl.nope=1"], world=1, check_data=False)


def test_the_dataclass_defaults_are_valid():
    assert RLConfig().rewards[0].name in reward_names()
