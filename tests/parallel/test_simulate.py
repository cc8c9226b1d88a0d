"""The discrete-event timeline and the placement simulator against closed forms and legality rules."""

import math

import pytest

from parallel import costs, simulate, timeline
from parallel.simulate import LMLayout, ModelDims, Pack, Plan, Settings, Workload

FREE = costs.LinkRates(bandwidth_bytes_per_s=math.inf, latency_s=0.0)


def toy_rates(vit_per_patch=0.0, lm_per_token=1e-4, optimizer=0.0, link=FREE) -> costs.Rates:
    """Per layer: forward 1 unit, forward + backward 3 units; no ends, no attention term."""
    return costs.Rates(
        vit=costs.ModuleRates(2, costs.Term(per_item_s=vit_per_patch), costs.Term(per_item_s=3 * vit_per_patch)),
        lm=costs.ModuleRates(8, costs.Term(per_item_s=lm_per_token), costs.Term(per_item_s=3 * lm_per_token)),
        intra_node=link,
        inter_node=link,
        tp_efficiency=1.0,
        optimizer_s_per_param=optimizer,
    )


DIMS = ModelDims(lm_layers=8, num_experts=8, vit_params=0.0, lm_dense_params=0.0, lm_expert_params=0.0)
NO_RECOMPUTE = Settings(lm_recompute=0.0, vit_recompute=0.0)


def uniform(batch: int, frames=()) -> Workload:
    return Workload("uniform", 1000, batch, (Pack((1000,), tuple(frames)),))


@pytest.mark.parametrize("pp,micro", [(1, 1), (2, 1), (2, 4), (4, 4), (4, 8), (8, 3), (2, 16)])
def test_uniform_1f1b_matches_the_closed_form(pp, micro):
    rates = toy_rates()
    result = simulate.simulate(rates, pp, LMLayout(1, pp, 1), uniform(micro), Plan("pp0"), DIMS, NO_RECOMPUTE)
    per_stage = 8 / pp * 1000 * 1e-4  # forward of one stage; backward twice that
    assert result.micro_batches == micro
    assert result.step_time_s == pytest.approx((micro + pp - 1) * 3 * per_stage)
    assert result.bubble == pytest.approx((pp - 1) / (micro + pp - 1))


def test_1f1b_order_has_warmup_steady_and_cooldown():
    assert simulate.one_f_one_b(0, 4, 6) == [
        ("F", 0),
        ("F", 1),
        ("F", 2),
        ("F", 3),
        ("B", 0),
        ("F", 4),
        ("B", 1),
        ("F", 5),
        ("B", 2),
        ("B", 3),
        ("B", 4),
        ("B", 5),
    ]
    assert simulate.one_f_one_b(3, 4, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert simulate.one_f_one_b(0, 4, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]  # fewer micro-batches than pp


def test_pp0_without_a_pipeline_is_the_sum_of_its_work():
    rates = toy_rates(vit_per_patch=1e-4)
    result = simulate.simulate(rates, 1, LMLayout(1, 1, 1), uniform(5, [500, 500]), Plan("pp0"), DIMS, NO_RECOMPUTE)
    lm = 8 * 3 * 1000 * 1e-4
    vit = 2 * 3 * 1000 * 1e-4
    assert result.step_time_s == pytest.approx(5 * (lm + vit))
    assert result.bubble == pytest.approx(0.0, abs=1e-12)


def test_pp0_with_a_heavy_first_stage_is_bound_by_it():
    rates = toy_rates(vit_per_patch=4e-4)
    pp, micro = 4, 16
    result = simulate.simulate(rates, pp, LMLayout(1, pp, 1), uniform(micro, [1000]), Plan("pp0"), DIMS, NO_RECOMPUTE)
    stage = 3 * 2 * 1000 * 1e-4
    first = stage + 2 * 3 * 1000 * 4e-4
    assert micro * first <= result.step_time_s <= micro * first + (pp - 1) * stage + 1e-9
    assert result.utilization["lm_stage0"] == pytest.approx(micro * first / result.step_time_s)


def test_spread_takes_the_vit_off_stage0_and_wins_when_it_dominates():
    rates = toy_rates(vit_per_patch=4e-4)
    work = uniform(16, [250] * 4)
    layout = LMLayout(1, 4, 1)
    pp0 = simulate.simulate(rates, 4, layout, work, Plan("pp0"), DIMS, NO_RECOMPUTE)
    spread = simulate.simulate(rates, 4, layout, work, Plan("spread"), DIMS, NO_RECOMPUTE)
    assert spread.legal and spread.tokens_per_s > 1.5 * pp0.tokens_per_s
    # every GPU-second of ViT work is still done, once
    assert spread.vit_busy_share == pytest.approx(pp0.vit_busy_share, rel=1e-9)


def test_split_runs_the_vit_on_its_own_ranks_and_lets_them_run_ahead():
    rates = toy_rates(vit_per_patch=1e-4)
    work = uniform(8, [1000])
    result = simulate.simulate(rates, 5, LMLayout(1, 4, 1), work, Plan("split", 1), DIMS, NO_RECOMPUTE)
    assert result.legal and result.dp == 1 and "vit" in result.utilization
    stage = 3 * 2 * 1000 * 1e-4
    # the ViT (0.6 per micro-batch) is quicker than a stage (0.6 + its backward... ) so the LM's closed form holds,
    # plus the first micro-batch's ViT forward and the last one's ViT backward
    lm_only = (8 + 3) * stage
    vit_f, vit_b = 2 * 1000 * 1e-4, 2 * 2 * 1000 * 1e-4
    assert result.step_time_s == pytest.approx(lm_only + vit_f + vit_b)


def test_a_frozen_vit_needs_no_backward():
    rates = toy_rates(vit_per_patch=1e-4)
    work = uniform(8, [1000])
    frozen = Settings(lm_recompute=0.0, vit_recompute=0.0, vit_trains=False)
    result = simulate.simulate(rates, 5, LMLayout(1, 4, 1), work, Plan("split", 1), DIMS, frozen)
    assert result.step_time_s == pytest.approx((8 + 3) * 3 * 2 * 1000 * 1e-4 + 2 * 1000 * 1e-4)


def test_one_node_with_ep8_over_128_experts_has_no_legal_split():
    dims = ModelDims()
    layout = LMLayout(1, 1, 8)
    assert simulate.split_ranks(8, layout, dims) == []
    results = simulate.compare(toy_rates(1e-5), 8, layout, uniform(8, [1024] * 4), dims, NO_RECOMPUTE)
    assert results["pp0"].legal and results["spread"].legal
    assert not results["split"].legal and "multiple of 8" in results["split"].reason


def test_legality_of_layouts():
    dims = ModelDims()
    assert not simulate.layout_check(64, LMLayout(4, 4, 8), dims, 1024)[0]  # etp 4 x ep 8 x pp 4 = 128 ranks
    assert simulate.layout_check(64, LMLayout(4, 4, 8, 1), dims, 1024)[:3] == (True, "", 4)
    assert not simulate.layout_check(128, LMLayout(4, 4, 6), dims, 1024)[0]  # 6 does not divide 128 experts
    assert simulate.split_ranks(256, LMLayout(4, 4, 8), dims) == [128]
    assert simulate.split_ranks(256, LMLayout(4, 4, 8, 1), dims, max_share=0.25) == [32, 64]
    ok, why, dp, used = simulate.layout_check(224, LMLayout(4, 4, 8, 1), dims, 1024)
    assert ok and dp == 14 and used == 1022  # the largest multiple of DP under the asked batch


def test_transfers_and_all_to_alls_cost_time():
    slow = costs.LinkRates(bandwidth_bytes_per_s=1e9, latency_s=1e-3)
    work = uniform(8, [1000] * 4)
    dims = ModelDims(lm_layers=8, num_experts=8)
    fast = simulate.simulate(toy_rates(1e-5), 16, LMLayout(1, 2, 8), work, Plan("spread"), dims, NO_RECOMPUTE)
    slowed = simulate.simulate(
        toy_rates(1e-5, link=slow), 16, LMLayout(1, 2, 8), work, Plan("spread"), dims, NO_RECOMPUTE
    )
    assert slowed.step_time_s > fast.step_time_s


def test_timeline_fills_waits_with_fillers_in_priority_order_and_keeps_static_order():
    tasks = [
        timeline.Task("a", "r0", 2.0, []),
        timeline.Task("b", "r1", 1.0, [("a", 0.5)]),
        timeline.Task("late", "r1", 1.0, [], filler=True, priority=(2,)),
        timeline.Task("early", "r1", 1.0, [], filler=True, priority=(1,)),
        timeline.Task("x", None, 0.25, [("b", 0.0)]),
    ]
    tl = timeline.run(tasks, {"r0": ["a"], "r1": ["b"]})
    t = tl.tasks
    assert (t["early"].start, t["late"].start) == (0.0, 1.0)
    assert t["b"].start == 2.5 and t["x"].end == 3.75 and tl.makespan == 3.75
    assert tl.busy["r1"] == 3.0


def test_timeline_reports_a_static_order_against_its_dependencies():
    tasks = [timeline.Task("a", "r", 1.0, [("b", 0.0)]), timeline.Task("b", "r", 1.0, [])]
    with pytest.raises(ValueError, match="never ran"):
        timeline.run(tasks, {"r": ["a", "b"]})


def test_pipeline_patch_cost_is_zero_off_stage0_and_positive_on_it():
    rates = costs.load_rates("h200")
    layout = LMLayout(4, 4, 8)
    assert simulate.pipeline_patch_cost(rates, ModelDims(), layout, Settings(), "spread") == 0.0
    assert simulate.pipeline_patch_cost(rates, ModelDims(), layout, Settings(), "pp0") > 0.0


def test_the_committed_hetero_sim_rows_are_what_the_simulator_gives():
    """benchmarks/results/hetero_sim.json holds every cluster size and mix the issue names (pp0, split, spread
    each), and its 256-GPU video-heavy rows (LM tp4 pp4 ep8 etp1; split at the saved ViT rank count) are what the
    simulator and the committed rates give now (a change to either must regenerate the file:
    `python3 benchmarks/hetero_sim.py`)."""
    import json

    from benchmarks.hetero_sim import REPO, config_for, layouts_for, stage0_memory
    from keye_train.planning.placement import STANDARD_MIXES, model_dims, settings_of, standard_profile

    saved = json.loads((REPO / "benchmarks" / "results" / "hetero_sim.json").read_text())
    rows = {(r["gpus"], r["mix"], r["layout"], r["placement"]): r for r in saved["rows"]}
    cells = {(g, m, p) for g, m, _, p in rows}
    for gpus in (8, 64, 256, 1024):
        for mix in STANDARD_MIXES:
            assert {(gpus, mix, p) for p in ("pp0", "split", "spread")} <= cells, (gpus, mix)
    assert saved["rates"]["provenance"] == costs.load_rates(saved["rates"]["file"]).provenance

    work = standard_profile("video_heavy", packs=64)
    label, layout, overrides = next(x for x in layouts_for(256) if x[0] == "tp4_pp4_ep8_etp1")
    cfg, sizes = config_for(work.seq_length, 256, overrides, work.global_batch)
    rates = costs.load_rates(saved["rates"]["file"])
    split_ranks = [rows[(256, "video_heavy", label, "split")]["vit_ranks"]]
    found = simulate.compare(rates, 256, layout, work, model_dims(cfg.model), settings_of(cfg.parallel), split_ranks)
    for key in ("pp0", "pp0_vit_dp", "split", "spread"):
        got, row = found[key], rows[(256, "video_heavy", label, found[key].placement)]
        assert got.legal and row["legal"] and got.vit_ranks == row["vit_ranks"], (key, got.reason, row["reason"])
        assert got.step_time_s == pytest.approx(row["step_time_s"], rel=1e-9), key
        assert got.bubble == pytest.approx(row["bubble"], rel=1e-9, abs=1e-12), key
        assert got.tokens_per_s / found["pp0"].tokens_per_s == pytest.approx(row["speedup_vs_pp0"], rel=1e-9), key
        assert stage0_memory(cfg, sizes, got)[0] == pytest.approx(row["stage0_memory_gib"], rel=1e-9), key
