"""Rejected samples are replaced from a per-rank reserve (packs stay full), what one rank saw reaches every rank's
plan (plans stay equal), an unreadable sample is read once per epoch, and all of it resumes exactly."""

import functools
import json
import re

import pytest
import torch

from data_pipeline.loader import ShardLoader, check_data_config
from data_pipeline.tokenizer import KeyeTokenizer
from keye_train.config import DataConfig
from tests.data_pipeline.mixes import FlakyDecoder, ThreadedRanks, realistic_mix, write_index
from tests.helpers import TEST_DATA

TOKENIZER = TEST_DATA / "tokenizer.json"
REJECTED = re.compile(r"\(decode_error\): injected failure of '([^']+)' \[.*epoch (\d+)\]")


def corpus(root, entries, per_shard):
    write_index(
        root,
        [entries[i : i + per_shard] for i in range(0, len(entries), per_shard)],
        tokenizer=KeyeTokenizer(TOKENIZER).fingerprint,
        tars=True,
    )
    return root


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """A realistic mix of captions, videos and texts (no media: planned lengths only) in 6 shards."""
    return corpus(tmp_path_factory.mktemp("mix"), realistic_mix(3000, 0), 500)


def loaders(root, seq_length, global_batch, dp_size, reject_rate=0.1, fail_ids=(), log=None, **data):
    """One loader per DP rank, joined by a threaded exchange, each with the stand-in decoder."""
    ranks = ThreadedRanks(dp_size)
    cfg = DataConfig(shards=str(root), tokenizer=str(TOKENIZER), **data)
    factory = functools.partial(FlakyDecoder, reject_rate=reject_rate, fail_ids=fail_ids)
    return ranks, [
        ShardLoader(
            cfg,
            seq_length,
            global_batch,
            seed=0,
            dp_rank=r,
            dp_size=dp_size,
            log=log or (lambda _: None),
            exchange=ranks.exchange(r),
            decoder_factory=factory,
        )
        for r in range(dp_size)
    ]


def ids_and_tokens(loader, batches):
    return [(b.sample_ids, b.input_ids, b.num_supervised()) for b in batches]


def total(ranks_loaders, key):
    return sum(loader.counters().get(key, 0) for loader in ranks_loaders)


def efficiency(ranks_loaders):
    return total(ranks_loaders, "pack_tokens") / total(ranks_loaders, "pack_capacity")


def test_a_reserve_keeps_32k_packs_full_under_ten_percent_decode_rejects(mix):
    measured = {}
    for fraction in (0.0, 0.15):
        ranks, rank_loaders = loaders(mix, 32768, 8, 2, reserve_fraction=fraction)
        steps = ranks.run(rank_loaders, 16, ids_and_tokens)
        measured[fraction] = efficiency(rank_loaders)
        trained = [sid for rank in steps for step in rank for ids, _, _ in step for sid in ids]
        assert len(trained) == len(set(trained))  # nothing trained twice, across ranks and steps
        for loader in rank_loaders:
            c = loader.counters()
            assert c["planned"] == c["samples"] + c["rejected/decode_error"] + c.get("carried_over", 0)
            assert c["rejected/decode_error"] > 0.08 * c["planned"] and c["empty_packs"] == 0
        assert rank_loaders[0].planner.state_dict() == rank_loaders[1].planner.state_dict()  # the plans agree
        assert rank_loaders[0].state_dict()["planner"] == rank_loaders[1].state_dict()["planner"]
        for loader in rank_loaders:
            loader.close()
    assert measured[0.0] < 0.92 and measured[0.15] >= 0.97, measured


def test_every_sample_of_an_epoch_is_trained_once_or_rejected_once(tmp_path):
    root = corpus(tmp_path, realistic_mix(600, 1), 100)
    lines = []
    ranks, rank_loaders = loaders(root, 32768, 4, 2, log=lines.append, reserve_fraction=0.2, max_pack_age=64)
    trained = []
    while min(loader.consumed_planner_state()["epoch"] for loader in rank_loaders) < 2:
        steps = ranks.run(rank_loaders, 1, ids_and_tokens)
        trained += [sid for rank in steps for step in rank for ids, _, _ in step for sid in ids]
    rejected = [(rid, int(epoch)) for line in lines for rid, epoch in REJECTED.findall(line)]
    epoch0 = [sid.rsplit("@", 1)[0] for sid in trained if sid.endswith("@0")]
    rejected0 = [rid for rid, epoch in rejected if epoch == 0]
    assert len(epoch0) == len(set(epoch0)) and len(rejected0) == len(set(rejected0))  # once each
    assert sorted(epoch0 + rejected0) == sorted(str(i) for i in range(600))  # all of them, carried ones too
    assert 40 < len(rejected0) < 80  # about the injected 10%
    c = [loader.counters() for loader in rank_loaders]
    assert sum(x["carried_over"] for x in c) > 0 and sum(x["reserve_used"] for x in c) > 0


def split_text_corpus(root, seq_length):
    """120 short texts and one text of 10 full sequences (split into 10 parts), in 3 shards."""
    entries = [
        {
            "key": f"{i:09d}",
            "id": f"t{i}",
            "offset": 0,
            "media": {},
            "kind": "text",
            "text_tokens": 10 * seq_length if i == 13 else 20 + 7 * (i % 9),
        }
        for i in range(121)
    ]
    return corpus(root, entries, 41)


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_an_unreadable_split_sample_is_read_once_per_epoch_and_its_other_parts_never(tmp_path, fraction):
    root = split_text_corpus(tmp_path, 512)
    lines = []
    _, (loader,) = loaders(
        root,
        512,
        2,
        1,
        reject_rate=0.0,
        fail_ids=("t13",),
        log=lines.append,
        reserve_fraction=fraction,
        prefetch_steps=3,
        open_packs=2,
        max_pack_age=8,
    )
    decoder = loader.pool.inline
    reads, empty_steps = [], 0
    while loader.consumed_planner_state()["epoch"] < 1:
        before = decoder.calls["t13", 0]
        batches = loader.next_step()
        reads.append(decoder.calls["t13", 0] - before)
        empty_steps += all(b.num_supervised() == 0 for b in batches)
    c = loader.counters()
    assert sum(reads) == max(reads) == c["rejected/decode_error"]  # read in one step only: the first failure
    dropped = c["rejected/known_unreadable"]  # parts planned into prefetched steps: dropped unread
    assert sum(reads) + dropped + c["plan/unreadable_skipped"] == 10  # the rest left the plan
    assert sum("(known_unreadable)" in line for line in lines) == dropped
    if fraction:
        assert empty_steps == 0 and c["reserve_used"] > 0
    else:  # the prefetched parts leave a step with nothing to train
        assert empty_steps >= 1
    while loader.consumed_planner_state()["epoch"] < 2:
        loader.next_step()
    assert decoder.calls["t13", 1] >= 1  # tried again in the next epoch
    loader.close()


def test_a_resumed_run_skips_what_failed_before_the_checkpoint(tmp_path):
    root = split_text_corpus(tmp_path, 512)
    make = lambda: loaders(
        root,
        512,
        2,
        1,
        reject_rate=0.0,
        fail_ids=("t13",),
        reserve_fraction=0.25,
        prefetch_steps=3,
        open_packs=2,
        max_pack_age=8,
    )[1][0]
    reference, first = make(), make()
    expected = [[b.sample_ids for b in reference.next_step()] for _ in range(30)]
    got = []
    while not first.rejects:  # stop right after the first failure: its other parts are still planned ahead
        got.append([b.sample_ids for b in first.next_step()])
    state = json.loads(json.dumps(first.state_dict()))
    assert any(events and events[0]["rejected"] for events in state["events"])
    resumed = make()
    resumed.load_state_dict(state)
    got += [[b.sample_ids for b in resumed.next_step()] for _ in range(30 - len(got))]
    assert got == expected
    assert resumed.pool.inline.calls["t13", 0] == 0  # the resumed run did not read it again
    assert resumed.rejects["known_unreadable"] > state["rejects"].get("known_unreadable", 0)  # but planned it
    assert resumed.counters() == reference.counters()
    for loader in (reference, first, resumed):
        loader.close()


def test_resume_under_rejects_and_a_reserve_is_exact_on_every_rank(mix):
    make = lambda: loaders(mix, 8192, 4, 2, reserve_fraction=0.2, prefetch_steps=2)
    ranks, reference = make()
    expected = ranks.run(reference, 9, ids_and_tokens)
    ranks, first = make()
    head = ranks.run(first, 4, ids_and_tokens)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in first]  # what a checkpoint stores
    assert any(rank["unused"] for events in states[0]["events"] if events for rank in events)  # pending returns
    ranks, resumed = make()
    for loader, state in zip(resumed, states):
        loader.load_state_dict(state)
    tail = ranks.run(resumed, 5, ids_and_tokens)
    for rank in range(2):
        got, want = head[rank] + tail[rank], expected[rank]
        assert [[ids for ids, _, _ in step] for step in got] == [[ids for ids, _, _ in step] for step in want]
        assert all(torch.equal(a, b) for g, w in zip(got, want) for (_, a, _), (_, b, _) in zip(g, w))
        assert resumed[rank].counters() == reference[rank].counters()
    assert total(reference, "rejected/decode_error") > 0 and total(reference, "carried_over") > 0
    for loader in reference + first + resumed:
        loader.close()


def test_a_reserve_with_several_ranks_needs_an_exchange(mix):
    cfg = DataConfig(shards=str(mix), tokenizer=str(TOKENIZER), reserve_fraction=0.1)
    with pytest.raises(ValueError, match="needs an exchange"):
        ShardLoader(cfg, 8192, 4, seed=0, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match=r"data.reserve_fraction=1.5 must be in \[0, 1\)"):
        check_data_config(DataConfig(shards=str(mix), tokenizer=str(TOKENIZER), reserve_fraction=1.5))


def global_ids(loader, batches):
    return [tuple(b.sample_ids) for b in batches]


def step_sets(per_rank):
    """[step] -> the sorted sample ids of the whole global batch (every rank's packs)."""
    return [sorted(i for rank in per_rank for i in sum(rank[step], ())) for step in range(len(per_rank[0]))]


@pytest.mark.parametrize("old_dp, new_dp", [(2, 1), (1, 2)])
def test_a_resume_under_another_dp_size_continues_the_same_global_stream(mix, old_dp, new_dp):
    """Checkpoint after 4 steps under old_dp ranks (with rejects: pending events), regroup the states for new_dp
    ranks: the next 5 global batches hold the samples of the uninterrupted run's, none lost or repeated, and the
    counters add up to the uninterrupted run's."""
    make = lambda dp: loaders(mix, 8192, 4, dp, prefetch_steps=2)
    ranks, reference = make(old_dp)
    expected = step_sets(ranks.run(reference, 9, global_ids))
    ranks, first = make(old_dp)
    head = step_sets(ranks.run(first, 4, global_ids))
    states = [json.loads(json.dumps(loader.state_dict())) for loader in first]
    assert any(events and any(rank["rejected"] for rank in events) for events in states[0]["events"])
    ranks, resumed = make(new_dp)
    for loader in resumed:
        loader.load_regrouped_state(states)
    tail = step_sets(ranks.run(resumed, 5, global_ids))
    assert head + tail == expected
    every = [i for step in head + tail for i in step]
    assert len(every) == len(set(every))
    for key in ("samples", "planned", "rejected/decode_error", "pack_tokens"):
        assert total(resumed, key) == total(reference, key), key
    assert total(reference, "rejected/decode_error") > 0
    for loader in reference + first + resumed:
        loader.close()


def test_a_dp_change_with_a_reserve_or_another_global_batch_is_refused(mix):
    ranks, first = loaders(mix, 8192, 4, 2, reserve_fraction=0.2)
    ranks.run(first, 2, global_ids)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in first]
    _, (single,) = loaders(mix, 8192, 4, 1, reserve_fraction=0.2)
    with pytest.raises(ValueError, match=r"data.reserve_fraction=0.2: .*checkpoint.init_from"):
        single.load_regrouped_state(states)
    _, (other_batch,) = loaders(mix, 8192, 2, 1)
    with pytest.raises(ValueError, match=r"global_batch=4, this run train.global_batch=2"):
        other_batch.load_regrouped_state(states)
    for loader in first + [single, other_batch]:
        loader.close()
