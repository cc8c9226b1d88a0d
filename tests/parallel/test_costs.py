"""The cost model: terms, fitting, the calibration file."""

import json
import random

import pytest

from parallel import costs


def test_term_counts_linear_quadratic_segment_and_fixed_parts():
    term = costs.Term(per_item_s=2.0, per_item_sq_s=0.5, per_segment_s=3.0, fixed_s=7.0)
    assert term([4, 2]) == 2 * 6 + 0.5 * (16 + 4) + 3 * 2 + 7
    assert term([]) == 0.0
    assert term.of_totals(6, 20, 2) == term([4, 2])


def test_module_time_adds_recompute_forward_per_layer_and_the_ends_once():
    fwd, fb = costs.Term(per_item_s=1.0), costs.Term(per_item_s=3.0)
    module = costs.ModuleRates(layers=10, layer_fwd=fwd, layer_fwd_bwd=fb, ends_fwd_bwd=costs.Term(fixed_s=5.0))
    assert module.time([2], recompute=0.0) == 10 * 6 + 5
    assert module.time([2], recompute=1.0) == 10 * 8 + 5
    assert module.time([2], recompute=1.0, ends=False) == 80
    assert module.time_of_totals(2, 4, 1, recompute=1.0) == module.time([2], recompute=1.0)


def test_link_is_latency_plus_bytes_over_bandwidth():
    link = costs.LinkRates(bandwidth_bytes_per_s=1e9, latency_s=1e-5)
    assert link.time(0) == 0.0
    assert link.time(2e9) == pytest.approx(2.0 + 1e-5)


def test_fit_recovers_the_coefficients_of_exact_points():
    truth = costs.Term(per_item_s=4e-7, per_item_sq_s=9e-11, per_segment_s=2e-5, fixed_s=1e-3)
    rng = random.Random(0)
    points = []
    for _ in range(20):
        p = rng.choice([256, 576, 1024, 2304, 4096])
        sizes = [p] * rng.randint(1, 64)
        points.append((sizes, truth(sizes)))
    fitted, worst = costs.fit_term(points)
    assert worst < 1e-6
    for key in costs.TERM_KEYS:
        assert getattr(fitted, key) == pytest.approx(getattr(truth, key), rel=1e-4)


def test_fit_is_non_negative_and_honours_the_allowed_terms():
    points = [([n], 1e-3 * n) for n in (1, 2, 4, 8)]  # purely linear, noise pushing nothing negative
    points.append(([3], 0.0029))
    fitted, _ = costs.fit_term(points, use=("per_item_s", "fixed_s"))
    assert fitted.per_item_sq_s == 0.0 and fitted.per_segment_s == 0.0
    assert all(getattr(fitted, k) >= 0.0 for k in costs.TERM_KEYS)
    assert fitted.per_item_s == pytest.approx(1e-3, rel=0.05)


def test_the_committed_calibration_loads_and_says_where_it_came_from():
    rates = costs.load_rates("h200")
    raw = json.loads((costs.CALIBRATION_DIR / "h200.json").read_text())
    for key in ("source", "device", "commit", "date", "script", "raw_points"):
        assert key in raw["provenance"], key
    assert "H200" in rates.device
    # the derivation reproduces what it was derived from: the ViT on the demo pack, the LM layer at 32K
    points = raw["provenance"]["raw_points"]
    if isinstance(points, dict):  # the seed derived from throughput_h200.json (a sweep names its points file)
        vit = rates.vit.time_of_totals(points["vit_patches"], points["vit_sum_p2"], points["vit_frames"], recompute=1)
        assert vit == pytest.approx(points["vit_s"], rel=1e-6)
        layer = rates.lm.time_of_totals(points["lm_tokens"], points["lm_sum_s2"], 0, recompute=1, layers=1, ends=False)
        assert layer == pytest.approx(points["lm_layer_s_full_recompute"], rel=1e-6)


def test_rates_round_trip_through_their_dict():
    rates = costs.load_rates("h200")
    again = costs.rates_from_dict(json.loads(json.dumps(costs.rates_to_dict(rates))))
    assert again.vit == rates.vit and again.lm == rates.lm and again.inter_node == rates.inter_node


def test_the_sweeps_document_mixes_cut_each_pack_exactly():
    from benchmarks.hetero_rates import MIXES, square_grid

    for tokens in (64, 128, 256, 4096, 32768):
        for name, cut in MIXES.items():
            docs = cut(tokens)
            assert sum(docs) == tokens and min(docs) > 0, (name, tokens, docs)
    for patches in (16, 64, 256, 576, 1024, 2304, 4096):
        rows, cols = square_grid(patches)
        assert rows * cols == patches and rows % 2 == 0 and cols % 2 == 0


def test_the_sweeps_fit_recovers_per_layer_terms_from_points():
    from benchmarks.hetero_rates import fit

    layer = costs.Term(per_item_s=4e-7, per_item_sq_s=9e-11, fixed_s=1e-4)
    ends = costs.Term(per_item_s=1e-7, per_segment_s=5e-5)
    vit = []
    for p in (256, 1024, 4096):
        for n in (4, 16, 32):
            sizes = [p] * n
            t = layer(sizes) * 1e3
            e = ends(sizes) * 1e3
            vit.append(
                {
                    "frame_patches": p,
                    "frames": n,
                    "layer_fwd_ms": t / 3,
                    "layer_fwd_bwd_ms": t,
                    "ends_fwd_ms": e / 3,
                    "ends_fwd_bwd_ms": e,
                }
            )
    lm = [
        {
            "documents": [t],
            "layer_fwd_ms": 1.0 + t / 1e3,
            "layer_fwd_bwd_ms": 3.0 + 3 * t / 1e3,
            "ends_fwd_ms": t / 1e4,
            "ends_fwd_bwd_ms": 3 * t / 1e4,
        }
        for t in (1024, 4096, 16384, 32768)
    ]
    vit.append({"error": "oom"})
    out = fit(vit, lm)
    got = costs.Term.from_dict(out["terms"]["vit"]["layer_fwd_bwd"])
    assert got.per_item_s == pytest.approx(4e-7, rel=1e-3) and got.per_item_sq_s == pytest.approx(9e-11, rel=1e-3)
    assert out["max_relative_error"]["vit.ends_fwd_bwd"] < 1e-6
