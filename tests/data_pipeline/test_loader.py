"""The loader resumes exactly, splits work across DP ranks, survives slow, crashing and corrupt samples."""

import json
import os
import time

import pytest
import torch

from data_pipeline.loader import ShardLoader
from data_pipeline.planner import PlannedSample
from data_pipeline.shards import ShardSet
from data_pipeline.workers import DecodePool, Rejected, SampleDecoder
from keye_train.config import DataConfig
from tests.helpers import TEST_DATA, corrupt_copy, ensure_test_data


def data_config(**overrides) -> DataConfig:
    base = dict(
        shards=str(TEST_DATA / "shards"),
        tokenizer=str(TEST_DATA / "tokenizer.json"),
        image_max_tokens=16,
        video_fps=1.0,
        frame_min_tokens=4,
        frame_max_tokens=8,
        video_total_tokens=64,
        open_packs=4,
    )
    return DataConfig(**(base | overrides))


def run(loader, steps):
    out = []
    for _ in range(steps):
        out.append([(b.sample_ids, b.input_ids.clone()) for b in loader.next_step()])
    return out


def _ids(steps):
    return [[ids for ids, _ in step] for step in steps]


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_stream_equals_the_uninterrupted_one(workers):
    make = lambda: ShardLoader(data_config(workers=workers), 128, 4, seed=3, dp_rank=1, dp_size=2, log=lambda _: None)
    reference = make()
    expected = run(reference, 9)
    reference.close()

    first = make()
    head = run(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint stores
    first.close()
    resumed = make()
    resumed.load_state_dict(state)
    tail = run(resumed, 5)
    resumed.close()
    assert _ids(head + tail) == _ids(expected)
    for got, want in zip(head + tail, expected):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))


def test_dp_ranks_read_disjoint_samples_and_together_the_global_batch():
    steps = 12
    single = ShardLoader(data_config(), 128, 4, seed=4, log=lambda _: None)
    ranks = [ShardLoader(data_config(), 128, 4, seed=4, dp_rank=r, dp_size=2, log=lambda _: None) for r in (0, 1)]
    for _ in range(steps):
        whole = sorted(tuple(b.sample_ids) for b in single.next_step())
        parts = [[tuple(b.sample_ids) for b in loader.next_step()] for loader in ranks]
        assert sorted(parts[0] + parts[1]) == whole
        assert not set(sum(parts[0], ())) & set(sum(parts[1], ()))
    # every sample of epoch 0 came once (samples split into parts count once per part)
    seen = []
    loader = ShardLoader(data_config(), 128, 2, seed=4, log=lambda _: None)
    while loader.consumed_planner_state()["epoch"] < 2:
        seen += [sid for b in loader.next_step() for sid in b.sample_ids]
    epoch0 = [sid for sid in seen if sid.endswith("@0")]
    assert len(epoch0) == len(set(epoch0))
    whole_ids = {sid.split("#")[0].rsplit("@", 1)[0] for sid in epoch0}
    assert len(whole_ids) == sum(ShardSet(TEST_DATA / "shards").sizes) - loader.counters().get("plan/too_long", 0)


class SlowOrCrashingDecoder(SampleDecoder):
    """Decodes normally, except sample 3 of shard 0 hangs and sample 5 kills its worker."""

    def __call__(self, planned):
        if (planned.shard, planned.sample) == (0, 3):
            time.sleep(60)
        if (planned.shard, planned.sample) == (0, 5):
            os._exit(3)
        return super().__call__(planned)


def test_a_hanging_or_crashing_sample_is_counted_and_the_rest_continue():
    cfg = data_config()
    from data_pipeline.loader import media_budget

    pool = DecodePool(
        cfg.shards, cfg.tokenizer, media_budget(cfg), 128, workers=2, timeout_s=3, decoder_factory=SlowOrCrashingDecoder
    )
    try:
        jobs = [pool.submit(PlannedSample(0, 0, k, -1, 0, 0)) for k in range(8)]
        started = time.monotonic()
        results = [pool.result(j) for j in jobs]
        elapsed = time.monotonic() - started
    finally:
        pool.close()
    reasons = {k: r.reason for k, r in enumerate(results) if isinstance(r, Rejected)}
    assert reasons == {3: "decode_timeout", 5: "decode_crash"}
    assert pool.restarts == 2 and elapsed < 30
    ordered = [r.key for r in results if not isinstance(r, Rejected)]
    shards = ShardSet(cfg.shards)
    assert ordered == [f"{shards.read(0, k)[0]['id']}@0" for k in (0, 1, 2, 4, 6, 7)]


def test_damaged_samples_at_read_time_are_skipped_counted_and_logged_once_per_epoch(tmp_path):
    damaged = corrupt_copy(TEST_DATA / "shards", tmp_path / "shards")
    lines = []
    cfg = data_config(shards=str(tmp_path / "shards"), max_pack_age=16)
    loader = ShardLoader(cfg, 128, 2, seed=0, log=lines.append)

    def epoch0_pending():
        planner = loader.planner
        packs = planner.packer.open + planner.packer.closed + [p for _, mine, _ in loader.ahead for p in mine]
        queued = [s for queue in planner.waiting for s in queue] + [s for p in packs for s in p.samples]
        return any(s.epoch == 0 for s in queued)

    while loader.planner.epoch < 1 or epoch0_pending():  # max_pack_age bounds how long this takes
        loader.next_step()
    for reason, count in damaged.items():
        assert count >= 7 and sum(f"({reason})" in line and "epoch 0]" in line for line in lines) == count
    assert loader.counters()["rejected/corrupt_video"] >= damaged["corrupt_video"]


def test_jobs_go_to_the_worker_with_the_least_planned_work():
    cfg = data_config()
    from data_pipeline.loader import media_budget

    pool = DecodePool(cfg.shards, cfg.tokenizer, media_budget(cfg), 128, workers=2)
    try:
        costs = [(1000, 4000), (10, 0), (10, 0), (10, 0), (3000, 0), (3000, 0), (10, 0)]
        jobs = [pool.submit(PlannedSample(0, 0, k, -1, tokens, patches)) for k, (tokens, patches) in enumerate(costs)]
        assert [pool.slot_of[j] for j in jobs] == [0, 1, 1, 1, 1, 1, 0]  # queued: 5001 vs 33, 3034, 6035
        results = [pool.result(j) for j in jobs]  # still in submission order
    finally:
        pool.close()
    shards = ShardSet(cfg.shards)
    assert [r.key for r in results] == [f"{shards.read(0, k)[0]['id']}@0" for k in range(7)]
    assert pool.slot_of == {}


def test_the_loader_reads_a_weighted_mixture_of_shard_directories():
    from keye_train.config import DataSource

    ensure_test_data()
    shards = str(TEST_DATA / "shards")
    cfg = data_config(mixture=[DataSource(shards=shards, weight=1.0), DataSource(shards=shards, weight=3.0)])
    loader = ShardLoader(cfg, 128, 4, seed=4, log=lambda _: None)
    for _ in range(6):
        assert all(len(b.sample_ids) for b in loader.next_step())
    drawn = loader.planner.source_tokens
    assert abs(drawn[1] / drawn[0] - 3.0) < 0.5, drawn
    from data_pipeline.loader import check_data_config

    bad = data_config(mixture=[DataSource(shards=shards), DataSource(shards=shards + "-missing")])
    with pytest.raises(ValueError, match=r"data.mixture\[1\].shards"):
        check_data_config(bad)
