"""A training run on shards with corrupt videos and broken records skips and counts them, and keeps going."""

import json

from tests.helpers import QUIET, TEST_DATA, corrupt_copy, keye_train


def test_training_skips_counts_and_logs_bad_samples(tmp_path):
    damaged = corrupt_copy(TEST_DATA / "shards", tmp_path / "shards")
    done = keye_train(
        *QUIET,
        f"data.shards={tmp_path / 'shards'}",
        "parallel.nproc=1",
        "train.steps=4",
        "train.global_batch=4",
        "train.seq_length=128",
        f"run_dir={tmp_path / 'run'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["loss"] == r["loss"] for r in rows)
    last = rows[-1]
    assert 1 <= last["data/rejected/corrupt_video"] <= damaged["corrupt_video"]
    assert 1 <= last["data/rejected/non_utf8"] <= damaged["non_utf8"]
    logged = done.stdout.count("skipped a sample (corrupt_video)") + done.stdout.count("skipped a sample (non_utf8)")
    assert logged == last["data/rejected/corrupt_video"] + last["data/rejected/non_utf8"]
    assert 0.5 < last["data/packing_efficiency"] <= 1.0
