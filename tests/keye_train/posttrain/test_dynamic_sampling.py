"""Dynamic sampling: equal-reward groups are dropped, the batch is refilled by over-sampling, the filtered
fraction is reported, and ContextRL recoveries can replace dropped groups."""

from dataclasses import dataclass

import pytest

from keye_train.posttrain.dynamic_sampling import dynamic_sample, is_informative, split_groups


@dataclass
class G:
    name: str
    rewards: list


class Sampler:
    """Hands out groups from a fixed script, recording how many each round asked for."""

    def __init__(self, script):
        self.script, self.asked = list(script), []

    def __call__(self, n):
        self.asked.append(n)
        out, self.script = self.script[:n], self.script[n:]
        return out


def groups(pattern: str):
    """'x' = informative (rewards 0, 1), '0' = all wrong, '1' = all right."""
    table = {"x": [0.0, 1.0, 0.0], "0": [0.0, 0.0, 0.0], "1": [1.0, 1.0, 1.0]}
    return [G(f"{k}{c}", table[c]) for k, c in enumerate(pattern)]


def test_equal_rewards_are_uninformative():
    assert is_informative([0, 1]) and not is_informative([0.5, 0.5]) and not is_informative([1.0])
    assert not is_informative([0.5, 0.5000001], atol=1e-3)
    kept, dropped = split_groups(groups("x0x1"))
    assert [g.name for g in kept] == ["0x", "2x"] and [g.name for g in dropped] == ["10", "31"]


def test_the_batch_is_refilled_by_over_sampling_and_the_filtered_fraction_reported():
    sampler = Sampler(groups("x0x10xxxxx"))
    kept, report = dynamic_sample(sampler, batch_groups=4, oversample_factor=1.0, max_rounds=5)
    # round 1: 4 asked, 2 kept; round 2: 2 asked, 1 kept; round 3: 1 asked, 1 kept
    assert sampler.asked == [4, 2, 1]
    assert [g.name for g in kept] == ["0x", "2x", "5x", "6x"]  # names are positions in the script
    assert (report.rounds, report.generated, report.dropped, report.short) == (3, 7, 3, 0)
    assert report.filtered_fraction == pytest.approx(3 / 7)
    assert report.metrics()["rl/filtered_fraction"] == pytest.approx(3 / 7)


def test_over_sampling_asks_for_more_and_drops_the_surplus():
    sampler = Sampler(groups("x0xxx0"))
    kept, report = dynamic_sample(sampler, batch_groups=4, oversample_factor=1.5)
    assert sampler.asked == [6] and len(kept) == 4 and report.surplus == 0 and report.short == 0
    sampler = Sampler(groups("xxxxxx"))
    kept, report = dynamic_sample(sampler, batch_groups=4, oversample_factor=1.5)
    assert [g.name for g in kept] == ["0x", "1x", "2x", "3x"] and report.surplus == 2


def test_a_step_that_cannot_fill_says_how_short_it_is():
    sampler = Sampler(groups("0000x0000000"))
    kept, report = dynamic_sample(sampler, batch_groups=4, oversample_factor=1.0, max_rounds=3)
    assert [g.name for g in kept] == ["4x"] and report.short == 3 and report.rounds == 3
    assert sampler.asked == [4, 4, 3] and report.filtered_fraction == pytest.approx(10 / 11)


def test_recovered_groups_replace_dropped_ones():
    def recover(dropped):
        # a re-sample that turns every all-wrong group into a mixed one, and leaves all-right groups alone
        return [G(g.name + "r", [0.0, 1.0, 1.0]) for g in dropped if max(g.rewards) == 0.0]

    kept, report = dynamic_sample(Sampler(groups("x01x")), batch_groups=3, oversample_factor=1.0, recover=recover)
    # round 1 takes "x01": 0x kept, 1 recovered, 2 (all right) dropped; round 2 takes 3x
    assert [g.name for g in kept] == ["0x", "10r", "3x"]
    assert (report.generated, report.dropped, report.recovered, report.rounds) == (4, 2, 1, 2)


def test_bad_arguments_and_a_short_sampler_are_refused():
    with pytest.raises(ValueError, match="oversample_factor"):
        dynamic_sample(Sampler([]), batch_groups=1, oversample_factor=0.5)
    with pytest.raises(ValueError, match="returned 1 groups"):
        dynamic_sample(Sampler(groups("x")), batch_groups=2, oversample_factor=1.0)
