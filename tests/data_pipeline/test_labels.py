"""Time labels are checked against the probed video duration at build time and when read (shards built before the
check); duplicate ids in a manifest are reported, and dropped under --dedup."""

import json
import random

import pytest

from data_pipeline.build import build_shards
from data_pipeline.cli import main as keye_data
from data_pipeline.demo import Scene, train_tokenizer, write_video
from data_pipeline.encode import MediaBudget
from data_pipeline.schema import SPAN_TOLERANCE_S
from data_pipeline.shards import ShardSet
from data_pipeline.sizing import VideoBudget
from data_pipeline.tokenizer import KeyeTokenizer
from data_pipeline.workers import Rejected, SampleDecoder

TINY = MediaBudget(video=VideoBudget(fps=1.0, frame_min_tokens=4, frame_max_tokens=8, video_total_tokens=64))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("label-media")
    write_video(root / "clip.mp4", Scene(random.Random(0)), seconds=2.0)  # probed duration 2.0 s
    train_tokenizer(
        ["a red disk moves left", "0123456789 . seconds", "user\nassistant\n"], root / "tok.json", vocab_size=300
    )
    return root


def grounding(rid, start, end):
    return {
        "id": rid,
        "kind": "grounding",
        "video": "v.mp4",
        "query": "the disk",
        "start": start,
        "end": end,
        "media": {"v.mp4": "clip.mp4"},
    }


def captions(rid, *spans):
    return {
        "id": rid,
        "kind": "video_caption",
        "video": "v.mp4",
        "media": {"v.mp4": "clip.mp4"},
        "segments": [{"start": s, "end": e, "text": "a red disk"} for s, e in spans],
    }


def build(media, tmp_path, records, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = []
    report = build_shards(
        manifest, media, tmp_path / "shards", KeyeTokenizer(media / "tok.json"), log=lines.append, **kwargs
    )
    return report, ShardSet(tmp_path / "shards"), lines


def stored(shards):
    return {shards.read(0, k)[0]["id"]: shards.read(0, k)[0] for k in range(shards.sizes[0])}


def test_spans_beyond_the_video_are_rejected_and_spans_over_its_end_clipped(media, tmp_path):
    records = [
        grounding("inside", 0.5, 1.5),
        grounding("rounding", 0.0, 2.0 + SPAN_TOLERANCE_S),
        grounding("over-the-end", 1.5, 5.0),
        grounding("beyond", 50.0, 70.0),
        captions("captions-ok", (0, 1), (1, 2)),
        captions("captions-over", (0, 1), (1.5, 3.0)),
        captions("captions-beyond", (0, 1), (2.5, 3.0)),
    ]
    report, shards, lines = build(media, tmp_path, records)
    assert report.samples == 5 and report.rejects == {"span_out_of_range": 2}
    assert report.counts == {"clipped_span": 2}
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["rejects"] == {"span_out_of_range": 2} and index["counts"] == {"clipped_span": 2}
    assert sum("span_out_of_range" in line and "'beyond'" in line for line in lines) == 1
    kept = stored(shards)
    assert sorted(kept) == ["captions-ok", "captions-over", "inside", "over-the-end", "rounding"]
    assert (kept["over-the-end"]["start"], kept["over-the-end"]["end"]) == (1.5, 2.0)
    assert kept["rounding"]["end"] == 2.0 + SPAN_TOLERANCE_S  # within the tolerance: left as labelled
    assert kept["captions-over"]["segments"][1] == {"start": 1.5, "end": 2.0, "text": "a red disk"}
    assert kept["inside"] == {k: v for k, v in grounding("inside", 0.5, 1.5).items() if k != "media"}
    from data_pipeline.shards import ShardMixture

    corpus = ShardMixture([tmp_path / "shards"])  # what training reports as data/build/<reason>
    assert corpus.build_report == {"span_out_of_range": 2, "clipped_span": 2}


def _patch_record(tar, old: bytes, new: bytes) -> None:
    """Edit a stored record in place, as a shard built before the label check could hold it."""
    data = tar.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    tar.write_bytes(data.replace(old, new))


def test_shards_built_before_the_check_get_it_when_read(media, tmp_path):
    build(media, tmp_path, [grounding("a", 0.5, 1.0), grounding("b", 0.4, 1.0)])
    tar = tmp_path / "shards" / "shard-000000.tar"
    _patch_record(tar, b'"start": 0.5, "end": 1.0', b'"start": 5.5, "end": 9.0')  # beyond the 2 s clip
    _patch_record(tar, b'"start": 0.4, "end": 1.0', b'"start": 0.4, "end": 9.0')  # over its end
    decode = SampleDecoder(str(tmp_path / "shards"), str(media / "tok.json"), TINY, 4096)
    from data_pipeline.planner import PlannedSample

    beyond, over = decode(PlannedSample(0, 0, 0, -1, 0, 0)), decode(PlannedSample(0, 0, 1, -1, 0, 0))
    assert isinstance(beyond, Rejected) and beyond.reason == "span_out_of_range"
    assert over.clipped_spans == 1
    text = decode.tokenizer.decode(over.input_ids[over.supervised].tolist())
    assert "0.4 - 2.0 seconds" in text


def test_duplicate_ids_are_reported_and_dropped_under_dedup(media, tmp_path):
    records = [grounding("same", 0.0, 1.0), grounding("other", 0.0, 1.0), grounding("same", 0.5, 1.5)]
    report, _, lines = build(media, tmp_path / "kept", records)
    assert report.samples == 3 and report.rejects == {} and report.counts == {"duplicate_id": 1}
    assert lines[0] == "keye-data: id 'same' of line 3 is already used by line 1 (kept; --dedup drops it)"

    manifest = tmp_path / "kept" / "manifest.jsonl"
    out = tmp_path / "dedup"
    assert (
        keye_data(
            [
                "build",
                "--manifest",
                str(manifest),
                "--media-root",
                str(media),
                "--out",
                str(out),
                "--tokenizer",
                str(media / "tok.json"),
                "--dedup",
            ]
        )
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 2 and index["rejects"] == {"duplicate_id": 1} and index["counts"] == {}
    deduped = ShardSet(out)
    assert [deduped.read(0, k)[0]["start"] for k in range(2)] == [0.0, 0.0]  # the first "same" was kept
