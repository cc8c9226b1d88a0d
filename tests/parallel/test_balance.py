"""Level 1 (frames over ViT ranks) and level 2 (packs over DP replicas) keep their stated bounds."""

import random

import pytest

from data_pipeline.planner import PlannedPack, PlannedSample, deal
from parallel import balance

EPS = 1e-9


def _check_level1(costs, ranks):
    assignment, load = balance.assign_frames(costs, ranks)
    assert sorted(i for ix in assignment for i in ix) == list(range(len(costs)))  # each frame exactly once
    assert max(load, default=0.0) <= balance.level1_bound(costs, ranks) + EPS
    if costs:
        assert max(load) >= max(costs) - EPS and max(load) >= sum(costs) / ranks - EPS  # nothing beats these
    return max(load, default=0.0)


def frame_cost(p):  # a per-layer ViT term: linear + the frame's own attention
    return 4e-7 * p + 9e-11 * p * p


ADVERSARIAL = {
    "one_huge_frame": [frame_cost(81920)] + [frame_cost(256)] * 300,
    "many_tiny": [frame_cost(16)] * 5000,
    "all_equal": [frame_cost(1024)] * 97,
    "more_ranks_than_items": [frame_cost(p) for p in (4096, 1024, 256)],
    "two_sizes": [frame_cost(4096)] * 7 + [frame_cost(256)] * 200,
    "geometric": [frame_cost(2**k) for k in range(4, 17)] * 3,
    "empty": [],
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("ranks", [1, 3, 8, 64])
def test_level1_stays_within_the_graham_bound_on_adversarial_mixes(name, ranks):
    costs = ADVERSARIAL[name]
    worst = _check_level1(costs, ranks)
    if name == "all_equal":  # equal items: counts differ by at most one
        assert worst == pytest.approx(frame_cost(1024) * -(-len(costs) // ranks))
    if name == "more_ranks_than_items" and ranks >= len(costs):
        assert worst == pytest.approx(max(costs))  # one item per rank: optimal


def test_level1_is_within_lpt_ratio_of_brute_force_on_small_cases():
    rng = random.Random(1)
    for _ in range(300):
        ranks = rng.randint(2, 4)
        costs = [rng.choice([1, 2, 3, 5, 8, 13, 100, rng.randint(1, 50)]) for _ in range(rng.randint(1, 9))]
        best = balance.optimal_makespan(costs, ranks)
        got = _check_level1(costs, ranks)
        assert got >= best - EPS
        assert got <= (4 / 3 - 1 / (3 * ranks)) * best + EPS  # Graham's LPT ratio


def test_level2_equals_the_data_pipelines_deal():
    rng = random.Random(2)
    for _ in range(50):
        dp = rng.choice([1, 2, 4, 8])
        packs = []
        for i in range(dp * rng.randint(1, 6)):
            pack = PlannedPack()
            pack.add(PlannedSample(0, 0, i, -1, rng.randint(100, 32768), rng.choice([0, 0, rng.randint(0, 131072)])))
            packs.append(pack)
        patch_cost = rng.choice([0.0, 0.25, 1.0, 3.0])
        ours = balance.deal_packs(packs, dp, lambda p, c=patch_cost: balance.linear_pack_cost(p.tokens, p.patches, c))
        assert ours == deal(packs, dp, patch_cost)


def test_level2_keeps_equal_counts_and_its_bounds_and_is_close_to_brute_force():
    rng = random.Random(3)
    for _ in range(300):
        bins, per = rng.randint(2, 3), rng.randint(1, 3)
        costs = [rng.choice([1, 2, 3, 5, 8, 13, 100, rng.randint(1, 50)]) for _ in range(bins * per)]
        assignment = balance.deal_equal_counts(costs, bins)
        assert [len(ix) for ix in assignment] == [per] * bins
        load = max(balance.loads(costs, assignment))
        assert load <= balance.level2_bound(costs, bins) + EPS
        assert load <= balance.level1_bound(costs, bins) + EPS  # the Graham form holds on every case checked
        best = balance.optimal_equal_counts(costs, bins)
        assert best - EPS <= load <= 2 * best + EPS


def test_level2_refuses_packs_that_do_not_split():
    with pytest.raises(ValueError, match="do not split"):
        balance.deal_equal_counts([1.0, 2.0, 3.0], 2)
