"""Where the ViT runs: `parallel.placement` values, per-placement memory and `keye-train plan`'s choice."""

import pytest

from keye_train.config.compose import load_checked_config
from keye_train.planning.memory import GIB, memory_by_placement, memory_per_rank
from keye_train.planning.placement import profile_from_shards, sample_frames
from parallel.layout import LayoutError, LayoutSizes, require_trainable
from tests.helpers import QUIET


def test_spread_and_auto_compose_and_spread_refuses_vit_ranks():
    cfg, _ = load_checked_config([*QUIET, "parallel.placement=spread"], world=1, check_data=False)
    require_trainable(cfg.parallel)  # spread trains
    cfg, _ = load_checked_config([*QUIET, "parallel.placement=auto"], world=1, check_data=False)
    with pytest.raises(LayoutError, match="parallel.placement=auto is for `keye-train plan`"):
        require_trainable(cfg.parallel)
    split = [*QUIET, "parallel.placement=split", "parallel.vision.ranks=2"]
    cfg, _ = load_checked_config(split, world=4, check_data=False)
    require_trainable(cfg.parallel)  # split trains
    with pytest.raises(LayoutError, match="parallel.placement=split with rl.enabled=true"):
        require_trainable(cfg.parallel, rl=True)
    cfg, _ = load_checked_config([*split, "parallel.vision.tp=2"], world=4, check_data=False)
    require_trainable(cfg.parallel)  # and with the ViT tensor-parallel over its ranks
    with pytest.raises(ValueError, match="parallel.placement=spread with parallel.vision.ranks=2"):
        load_checked_config([*QUIET, "parallel.placement=spread", "parallel.vision.ranks=2"], world=4, check_data=False)


def _stage3():
    return load_checked_config(
        ["recipe=stage3_longcontext", "launch=local", "parallel=tp4_pp4_ep8", "parallel.recompute=full"],
        world=128,
        check_data=False,
    )


def test_memory_by_placement_moves_the_vit_off_stage0():
    cfg, sizes = _stage3()
    colocated = memory_by_placement(cfg.model, cfg.parallel, cfg.train, sizes, "colocated")
    assert colocated == memory_per_rank(cfg.model, cfg.parallel, cfg.train, sizes)
    assert colocated["first_stage"]["total"] / GIB > 300  # the 326 GiB on stage 0
    spread = memory_by_placement(cfg.model, cfg.parallel, cfg.train, sizes, "spread")
    assert spread["first_stage"]["total"] < colocated["first_stage"]["total"] / 3
    assert spread["last_stage"]["total"] > colocated["last_stage"]["total"]  # every rank holds a ViT share
    lm = 128
    split_sizes = LayoutSizes(lm + 32, sizes.tp, sizes.pp, sizes.ep, sizes.etp, sizes.dp, sizes.expert_dp, 32)
    split = memory_by_placement(cfg.model, cfg.parallel, cfg.train, split_sizes, "split", 32)
    assert split["first_stage"]["total"] < spread["first_stage"]["total"]
    assert split["first_stage"]["dense_params"] == pytest.approx(
        colocated["first_stage"]["dense_params"] - split["vision"]["vit_params"]
    )
    assert split["vision"]["total"] > 0
    with pytest.raises(ValueError, match="vision tp"):
        memory_by_placement(cfg.model, cfg.parallel, cfg.train, split_sizes, "split", 3, 2)


def test_profiles_from_shards_carry_each_frame():
    cfg, _ = load_checked_config([*QUIET], world=1, check_data=False)
    work = profile_from_shards(cfg.data, 256, 6, 4)
    assert len(work.packs) == 6
    assert all(sum(p.docs) <= 256 for p in work.packs)
    assert any(p.frames for p in work.packs)
    # the frames of a pack add up to the patches the planner planned for it
    from data_pipeline.loader import media_budget
    from data_pipeline.planner import PackingConfig, PackPlanner
    from data_pipeline.shards import ShardMixture
    from data_pipeline.tokenizer import KeyeTokenizer

    tokenizer = KeyeTokenizer(cfg.data.tokenizer)
    shards = ShardMixture([cfg.data.shards], tokenizer.fingerprint)
    budget = media_budget(cfg.data)
    planner = PackPlanner(shards, tokenizer, budget, PackingConfig(seq_length=256), 0)
    for pack in work.packs:
        planned = planner.next_pack()
        assert sum(pack.frames) == planned.patches
        for s in planned.samples:
            if s.part < 0:
                assert sum(sample_frames(shards.entry(s.shard, s.sample), budget, tokenizer)) == s.patches


def _plan(capsys, *args):
    from keye_train.cli import plan

    assert plan.run(list(args)) == 0
    return capsys.readouterr().out


def test_plan_says_colocated_on_one_node_where_no_split_is_legal(capsys):
    out = _plan(
        capsys,
        "recipe=stage1_pretrain",
        "launch=local",
        "parallel=ep8_node",
        "parallel.placement=auto",
        "--gpus",
        "8",
        "--profile",
        "video_heavy",
        "--profile-packs",
        "4",
    )
    assert "split" in out and "not legal" in out and "multiple of 8" in out
    assert "choice: colocated" in out


def test_plan_picks_a_placement_that_beats_colocated_on_video_at_256_gpus(capsys):
    out = _plan(
        capsys,
        "recipe=stage1_pretrain",
        "launch=local",
        "parallel.placement=auto",
        "parallel.etp=1",
        "--gpus",
        "256",
        "--profile=video_heavy",
        "--profile-packs",
        "4",
    )
    choice = next(line for line in out.splitlines() if line.startswith("choice:"))
    assert "split" in choice or "spread" in choice, out
    assert "stage-0 GiB" in out


def test_plan_refuses_unknown_options():
    from keye_train.cli import plan

    with pytest.raises(ValueError, match="unknown option --nope"):
        plan.split_flags(["--nope", "1"])
    assert plan.split_flags(["a=1", "--gpus=8", "--profile", "x"]) == (["a=1"], {"--gpus": "8", "--profile": "x"})
