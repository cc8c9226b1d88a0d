"""keye-data build: valid samples land in shards with an index; every bad input is skipped and counted."""

import io
import json
import pickle
import random
import tarfile

import av
import numpy as np
import pytest

from data_pipeline.build import build_shards
from data_pipeline.cli import main as keye_data
from data_pipeline.demo import Scene, train_tokenizer, write_image, write_video
from data_pipeline.shards import ShardSet, index_shards
from data_pipeline.tokenizer import KeyeTokenizer
from tests.helpers import SHARED


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(["a red disk moves left", "0123456789 . seconds", "user\nassistant\n"], path, vocab_size=300)
    return KeyeTokenizer(path)


def _audio_only(path):
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    scene = Scene(random.Random(0))
    write_image(root / "good.png", scene.render(56, 84, 0.0))
    write_video(root / "good.mp4", scene, seconds=2.0)
    data = (root / "good.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "garbage.mp4").write_bytes(bytes(random.Random(1).randrange(256) for _ in range(5000)))
    (root / "empty.mp4").write_bytes(b"")
    _audio_only(root / "tone.mp4")
    write_image(root / "sliver.png", np.full((2, 420, 3), 128, dtype=np.uint8))  # 1:210
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    return root


def _caption(rid, image):
    return {"id": rid, "kind": "caption", "image": "p.png", "text": "a red disk", "media": {"p.png": image}}


def _video(rid, video):
    return {
        "id": rid,
        "kind": "video_caption",
        "video": "v.mp4",
        "media": {"v.mp4": video},
        "segments": [{"start": 0, "end": 2, "text": "a red disk moves left"}],
    }


def test_build_counts_every_reject_and_indexes_the_rest(tmp_path, media, tokenizer):
    lines = [
        json.dumps(_caption("ok-image", "good.png")).encode(),
        json.dumps(_video("ok-video", "good.mp4")).encode(),
        json.dumps({"id": "ok-text", "kind": "text", "text": "plain words"}).encode(),
        json.dumps(_video("truncated", "truncated.mp4")).encode(),
        json.dumps(_video("garbage", "garbage.mp4")).encode(),
        json.dumps(_video("zero-length", "empty.mp4")).encode(),
        json.dumps(_video("audio-only", "tone.mp4")).encode(),
        json.dumps(_caption("bad-image", "broken.png")).encode(),
        json.dumps(_caption("sliver", "sliver.png")).encode(),
        json.dumps(_caption("no-file", "missing.png")).encode(),
        json.dumps(_caption("escape", "../../etc/hosts")).encode(),
        json.dumps({"id": "no-text", "kind": "caption", "image": "p.png", "media": {"p.png": "good.png"}}).encode(),
        b'{"id": "latin1", "kind": "text", "text": "caf\xe9"}',
        b"{oops",
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    report = build_shards(manifest, media, tmp_path / "shards", tokenizer, samples_per_shard=2, log=lambda _: None)
    assert report.samples == 3 and report.shards == 2
    assert report.rejects == {
        "corrupt_video": report.rejects["corrupt_video"],
        "no_video_stream": 1,
        "unreadable_image": 1,
        "aspect_ratio": 1,
        "missing_media": 1,
        "unsafe_path": 1,
        "missing_field": 1,
        "non_utf8": 1,
        "bad_json": 1,
    }
    assert report.rejects["corrupt_video"] == 3  # truncated, garbage and zero-length bytes
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["samples"] == 3 and index["rejects"] == dict(report.rejects)
    assert [s["samples"] for s in index["shards"]] == [2, 1]

    shards = ShardSet(tmp_path / "shards", tokenizer.fingerprint)
    ids = [shards.read(s, i)[0]["id"] for s in range(2) for i in range(shards.sizes[s])]
    assert ids == ["ok-image", "ok-video", "ok-text"]
    record, members = shards.read(0, 1)
    assert members["v.mp4"] == (media / "good.mp4").read_bytes() and "media" not in record
    entry = shards.entry(0, 1)
    assert entry["media"]["v.mp4"] == {"type": "video", "duration": 2.0, "fps": 8.0, "height": 84, "width": 112}

    import webdataset as wds  # the shards are plain webdataset tars

    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "shards" / "shard-000000.tar"), shardshuffle=False)]
    assert keys == [entry["key"] for entry in shards.entries(0)]


def test_cli_reports_a_wrong_tokenizer(tmp_path, media, tokenizer, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(_caption("a", "good.png")) + "\n")
    assert (
        keye_data(
            [
                "build",
                "--manifest",
                str(manifest),
                "--media-root",
                str(media),
                "--out",
                str(tmp_path / "s"),
                "--tokenizer",
                str(tokenizer.path),
            ]
        )
        == 0
    )
    other = tmp_path / "other.json"
    train_tokenizer(["something else entirely"], other, vocab_size=280)
    with pytest.raises(ValueError, match="another tokenizer"):
        ShardSet(tmp_path / "s", KeyeTokenizer(other).fingerprint)
    assert (
        keye_data(
            [
                "build",
                "--manifest",
                str(manifest),
                "--media-root",
                str(media),
                "--out",
                str(tmp_path / "s"),
                "--tokenizer",
                str(tokenizer.path),
            ]
        )
        == 2
    )  # never overwrites shards
    assert "already holds shards" in capsys.readouterr().err


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(__file__).with_name("PWNED"),))


def _member(tar, name, data, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    tar.addfile(info, io.BytesIO(data))


def test_foreign_shards_refuse_pickles_and_path_traversal(tmp_path, tokenizer):
    sentinel = tmp_path / "PWNED"
    ok = json.dumps({"id": "fine", "kind": "text", "text": "a red disk"}).encode()
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        _member(tar, "k1.json", ok)
        _member(tar, "k2.json", ok.replace(b"fine", b"also-fine"))
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        _member(tar, "k1.json", ok)
        _member(tar, "k2.pyd", pickle.dumps(_Exploit()))
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        _member(tar, "../../evil.json", ok)
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        _member(tar, "k1.json", b"", kind=tarfile.SYMTYPE)
    with tarfile.open(tmp_path / "e.tar", "w") as tar:
        _member(tar, "k1.txt", b"no record here")
    report = index_shards(tmp_path, tokenizer)
    assert report.samples == 3  # a.tar's two, and b.tar's sample before the pickle member
    assert report.rejects == {"pickle_member": 1, "unsafe_member": 2, "missing_field": 1}
    assert not sentinel.exists() and not (tmp_path.parent / "evil.json").exists()
    shards = ShardSet(tmp_path, tokenizer.fingerprint)
    assert [shards.read(0, i)[0]["id"] for i in range(2)] == ["fine", "also-fine"]


@pytest.mark.skipif(not (SHARED / "videos").is_dir(), reason="real test videos live in ../shared/testdata")
def test_real_videos_are_indexed_with_their_probed_metadata(tmp_path, tokenizer):
    videos = SHARED / "videos"
    records = [
        {
            "id": p.stem,
            "kind": "grounding",
            "video": "v" + p.suffix,
            "query": "a red disk",
            "start": 0,
            "end": 1,
            "media": {"v" + p.suffix: p.name},
        }
        for p in sorted(videos.iterdir())
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = build_shards(manifest, videos, tmp_path / "s", tokenizer, log=lambda _: None)
    assert report.samples == len(records) - 1 and report.rejects == {"corrupt_video": 1}  # the truncated file
    shards = ShardSet(tmp_path / "s")
    metas = {e["id"]: e["media"] for e in shards.entries(0)}
    rotated = next(iter(metas["iphone_rotated"].values()))
    assert (rotated["height"], rotated["width"]) == (568, 320)
