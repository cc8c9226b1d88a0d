import pytest
import torch

from kernels.dsa_sets import random_indices, selection_stats, structured_indices


def _check_layout(indices: torch.Tensor, k: int) -> None:
    rows = torch.arange(indices.shape[0])
    valid = indices >= 0
    assert torch.equal(valid.sum(1), torch.clamp(rows + 1, max=k))  # every row as full as its past allows
    assert torch.all(valid[:, :-1] | ~valid[:, 1:])  # -1 only after the last key
    assert not torch.any((indices.diff(dim=1) <= 0) & valid[:, 1:])  # strictly ascending: distinct keys
    assert torch.all(indices <= rows[:, None])  # causal


@pytest.mark.parametrize("make", [structured_indices, random_indices])
def test_sets_follow_the_indices_convention(make):
    _check_layout(
        make(
            1536,
            256,
            **({"sinks": 8, "window": 64, "span_length": 16, "tail": 16} if make is structured_indices else {}),
        ),
        256,
    )


def test_structured_sets_are_local_and_random_sets_are_not():
    k = 256
    parts = {"sinks": 8, "window": 64, "span_length": 16, "tail": 8}
    local = selection_stats(structured_indices(4096, k, **parts))
    spread = selection_stats(random_indices(4096, k))
    assert 0.85 <= local["jaccard"] <= 0.95 and 1.5 <= local["union16_over_k"] <= 2.5
    # Random sets of k = 256 over 257..4096 keys: adjacent Jaccard near k / (2t - k), unions far above 2k.
    assert spread["jaccard"] < 0.15 and spread["union16_over_k"] > 5


def test_selection_stats_by_hand():
    k = 4
    rows = torch.full((8, k), -1, dtype=torch.int32)
    for t in range(8):
        rows[t, : min(k, t + 1)] = torch.arange(max(0, t - k + 1), t + 1)  # the most recent keys: a sliding window
    stats = selection_stats(rows, group=2)
    # Rows 4..7 see more than k keys. Adjacent windows share 3 of 5 keys; two of them cover 5 keys.
    assert stats["jaccard"] == pytest.approx(3 / 5)
    assert stats["union2_over_k"] == pytest.approx(5 / 4)
