"""The demo chain: `keye-data demo` with real videos next to the generated ones, then training from its shards."""

import json

import pytest

from tests.helpers import QUIET, SHARED, keye_train, needs_shared_reason


@pytest.mark.skipif(not (SHARED / "videos").is_dir(), reason=needs_shared_reason)
def test_demo_shards_with_real_videos_train(tmp_path):
    from data_pipeline.cli import main as keye_data

    data = tmp_path / "data"
    assert keye_data(["demo", "--out", str(data), "--samples", "21", "--real-videos", str(SHARED / "videos")]) == 0
    index = json.loads((data / "shards" / "index.json").read_text())
    assert index["rejects"] == {"corrupt_video": 1}  # the truncated NASA clip
    ids = [
        e["id"]
        for shard in index["shards"]
        for e in json.loads((data / "shards" / shard["name"].replace(".tar", ".idx.json")).read_text())["samples"]
    ]
    real = sorted(i for i in ids if i.startswith("real-"))
    assert real == [
        "real-big_buck_bunny_0_30",
        "real-iphone_rotated",
        "real-mmaction2_test",
        "real-nasa_13013",
        "real-var_fps_video",
    ]
    assert len(ids) == 21 + 5
    done = keye_train(
        *QUIET,
        f"data.shards={data / 'shards'}",
        f"data.tokenizer={data / 'tokenizer.json'}",
        "parallel.nproc=1",
        "train.steps=3",
        "train.global_batch=4",
        "train.seq_length=256",
        "data.workers=1",
        f"run_dir={tmp_path / 'run'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["data/samples"] >= 8 and "skipped a sample" not in done.stdout
