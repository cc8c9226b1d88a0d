"""Timestamp parsers, temporal IoU, the Time-R1 shaping and the multi-segment Hungarian reward; the exact
assignment against a brute force over permutations."""

import itertools
import random

import pytest

from keye_train.posttrain.rewards import build_reward
from keye_train.posttrain.rewards.assignment import MAX_SIDE, max_weight_assignment
from keye_train.posttrain.rewards.temporal import (
    clock_seconds,
    multi_segment_iou,
    parse_segments,
    parse_timelens,
    temporal_iou,
    time_r1_iou,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The event happens in 12.5 - 30 seconds", [(12.5, 30.0)]),  # the official answer format
        ("The event happens in 00:12.5 - 01:30 seconds", [(12.5, 90.0)]),  # clock times win
        ("from 1:02:03 to 1:02:09.5", [(3723.0, 3729.5)]),
        ("It starts at 4 to 9", [(4.0, 9.0)]),
        ("3-5 and then 7 to 9", [(3.0, 5.0)]),  # `a - b` pairs are tried before `a to b`
        ("around 14.2 and 20", [(14.2, 20.0)]),  # the numbers, paired
        ("at 12:00 only", [(12.0, 0.0)]),  # one clock does not pair; rule 3 pairs 12 and 00 (start >= end: IoU 0)
        ("no time here", []),
    ],
)
def test_the_timelens_parser_follows_the_official_rules(text, expected):
    assert parse_timelens(text) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The event happens in 12.5 - 30 seconds", [(12.5, 30.0)]),
        ("<think>the dog enters at 3 s</think><answer>from 4.5 to 9</answer>", [(4.5, 9.0)]),
        ("<answer>between 5 and 10 sec</answer>", [(5.0, 10.0)]),  # Time-R1: number (to|and) number
        ("<answer>01:05 - 02:10.5</answer>", [(65.0, 130.5)]),  # mm:ss
        ("<answer>0:01:05 to 0:02:00</answer>", [(65.0, 120.0)]),  # hh:mm:ss
        ("<answer>[[1, 2.5], [30, 41]]</answer>", [(1.0, 2.5), (30.0, 41.0)]),  # the SFT interval list
        ("<answer>12.5s-30s and 40 ~ 50</answer>", [(12.5, 30.0), (40.0, 50.0)]),
        ("<answer>it is at 7, the dog 9</answer>", [(7.0, 9.0)]),  # the first two numbers
        ("<answer>from 1:05 to 90 s</answer>", [(65.0, 90.0)]),  # mixed clock and seconds
        ("<answer>starts 00:05, ends 00:09.5</answer>", [(5.0, 9.5)]),
        ("<answer>3:25:45.75 - 3:25:50.25</answer>", [(12345.75, 12350.25)]),  # no rounding of long clocks
        ("<answer>[[00:01, 00:05], [1:00:10, 1:00:12]]</answer>", [(1.0, 5.0), (3610.0, 3612.0)]),
        ("<answer>at 7</answer>", []),
        ("<answer>never</answer>", []),
    ],
)
def test_the_reward_parser_reads_seconds_clocks_ranges_and_lists(response, expected):
    assert parse_segments(response) == expected


def test_clock_seconds():
    assert clock_seconds("1:02:03.5") == 3723.5 and clock_seconds("02:03") == 123.0
    with pytest.raises(ValueError):
        clock_seconds("12")


def test_temporal_iou_by_hand():
    assert temporal_iou((2, 6), (4, 10)) == pytest.approx(2 / 8)
    assert temporal_iou((4, 10), (4, 10)) == 1.0
    assert temporal_iou((0, 1), (2, 3)) == 0.0
    assert temporal_iou((6, 2), (0, 10)) == 0.0  # start >= end
    assert temporal_iou((5, 5), (0, 10)) == 0.0
    assert temporal_iou((0, 10), (2, 4)) == pytest.approx(0.2)


def test_time_r1_shaping_by_hand():
    # tIoU 2/8, |2 - 4| / 20 = 0.1, |6 - 10| / 20 = 0.2
    assert time_r1_iou((2, 6), (4, 10), 20) == pytest.approx(0.25 * 0.9 * 0.8)
    reward = build_reward("temporal_iou", shaping="time_r1")
    assert reward("<answer>2 to 6</answer>", {"start": 4, "end": 10, "duration": 20}) == pytest.approx(0.18)
    with pytest.raises(KeyError, match="duration"):
        reward("<answer>2 to 6</answer>", {"start": 4, "end": 10})


def test_the_single_segment_reward_scores_the_first_segment_against_the_first_window():
    reward = build_reward("temporal_iou")
    assert reward("<answer>82 to 150</answer>", {"relevant_windows": [[82, 150], [0, 10]]}) == 1.0
    assert reward("<answer>2 - 6, 40 - 50</answer>", {"windows": [[4, 10]]}) == pytest.approx(0.25)
    assert reward("<answer>no idea</answer>", {"windows": [[4, 10]]}) == 0.0
    assert reward("<answer>9 - 3</answer>", {"span": [4, 10]}) == 0.0


def brute_force_assignment(weights):
    rows, cols = len(weights), len(weights[0])
    best = 0.0
    if rows >= cols:
        for perm in itertools.permutations(range(rows), cols):
            best = max(best, sum(weights[perm[j]][j] for j in range(cols)))
    else:
        for perm in itertools.permutations(range(cols), rows):
            best = max(best, sum(weights[i][perm[i]] for i in range(rows)))
    return best


@pytest.mark.parametrize("rows, cols", [(1, 1), (2, 3), (3, 2), (4, 4), (5, 3), (3, 6), (6, 6)])
def test_the_assignment_equals_a_brute_force_over_permutations(rows, cols):
    rng = random.Random(rows * 10 + cols)
    for _ in range(20):
        weights = [[rng.choice([0.0, rng.random()]) for _ in range(cols)] for _ in range(rows)]
        total, pairs = max_weight_assignment(weights)
        assert total == pytest.approx(brute_force_assignment(weights), abs=1e-12)
        assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs})  # one-to-one
        assert sum(weights[i][j] for i, j in pairs) == pytest.approx(total, abs=1e-12)


def test_the_assignment_refuses_what_it_cannot_search_exactly():
    with pytest.raises(ValueError, match="cap"):
        max_weight_assignment([[0.5] * (MAX_SIDE + 1)] * (MAX_SIDE + 1))
    with pytest.raises(ValueError, match=">= 0"):
        max_weight_assignment([[-1.0]])
    assert max_weight_assignment([]) == (0.0, [])


def test_the_greedy_match_is_not_the_optimum_but_ours_is():
    # greedy would take (0, 0) = 0.9, leaving 0.1; the optimum pairs (0, 1) + (1, 0) = 0.8 + 0.8
    total, pairs = max_weight_assignment([[0.9, 0.8], [0.8, 0.1]])
    assert total == pytest.approx(1.6) and pairs == [(0, 1), (1, 0)]


def test_multi_segment_iou_by_hand():
    refs = [(0, 10), (20, 30)]
    assert multi_segment_iou([(20, 30), (0, 10)], refs) == 1.0  # order does not matter
    assert multi_segment_iou([(0, 10)], refs) == pytest.approx(0.5)  # a missing segment counts 0
    assert multi_segment_iou([(0, 10), (20, 30), (50, 60)], refs) == pytest.approx(2 / 3)  # an extra one too
    assert multi_segment_iou([(0, 10), (20, 30), (40, 35)], refs) == pytest.approx(2 / 3)  # so does start >= end
    # (1, 10) duplicates (0, 10) (tIoU 0.9): dropped and penalised 0.1
    assert multi_segment_iou([(0, 10), (1, 10), (20, 30)], refs) == pytest.approx(1.0 - 0.1)
    assert multi_segment_iou([(0, 5), (25, 30)], refs, dup_penalty=0.0) == pytest.approx((0.5 + 0.5) / 2)


def test_the_multi_segment_reward_reads_qvhighlights_windows():
    reward = build_reward("temporal_iou_multi")
    reference = {"relevant_windows": [[0, 2], [52, 74], [84, 92]]}
    assert reward("<answer>[[0, 2], [52, 74], [84, 92]]</answer>", reference) == 1.0
    assert reward("<answer>52 - 74</answer>", reference) == pytest.approx(1 / 3)
    assert reward("<answer>nothing</answer>", reference) == 0.0
