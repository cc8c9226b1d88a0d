"""split.deal_visual: a step's micro-batches with visual input over the ViT ranks serving them (LPT by the ViT's
cost-model time)."""

from types import SimpleNamespace

import torch

from data_pipeline.batch import VisualInput
from keye_train.training.schedules.split import deal_visual, visual_cost
from parallel.balance import level1_bound
from parallel.costs import load_rates

RATES = load_rates()


def pack(*grids):
    """A micro-batch stand-in with frames of the given (rows, cols) patch grids (none: text only)."""
    if not grids:
        return SimpleNamespace(visual=None)
    patches = sum(r * c for r, c in grids)
    return SimpleNamespace(visual=VisualInput(torch.zeros(patches, 4), torch.tensor(grids, dtype=torch.int64)))


def test_deal_visual_places_the_largest_first_and_skips_text_only():
    # micro-batches 1 and 4 are text only; costs: 2 (one 64x64 frame) > 0 (32x32) > 3 (16x16) = 5 (16x16)
    batches = [pack((32, 32)), pack(), pack((64, 64)), pack((16, 16)), pack(), pack((16, 16))]
    costs = [visual_cost(b, RATES) for b in batches]
    assert costs[1] == costs[4] == 0.0 and costs[2] > costs[0] + costs[3] + costs[5] > 0, costs
    # LPT over ranks 7 and 9: 2 -> 7; 0 -> 9; 3 and 5 -> 9, still the lighter (64x64 outweighs the rest)
    assert deal_visual(batches, [7, 9], RATES) == {2: 7, 0: 9, 3: 9, 5: 9}


def test_deal_visual_keeps_each_rank_within_the_level1_bound():
    grids = [[(8 * (1 + (i * 7) % 5), 8 * (1 + (i * 3) % 4))] * (1 + i % 3) for i in range(11)]
    batches = [pack(*g) for g in grids]
    ranks = [0, 1, 2]
    dealt = deal_visual(batches, ranks, RATES)
    assert sorted(dealt) == list(range(11)) and set(dealt.values()) <= set(ranks)
    costs = [visual_cost(b, RATES) for b in batches]
    load = [sum(costs[m] for m, r in dealt.items() if r == rank) for rank in ranks]
    assert max(load) <= level1_bound(costs, len(ranks)) * (1 + 1e-12), (load, level1_bound(costs, len(ranks)))
    assert deal_visual([pack(), pack()], ranks, RATES) == {}
