"""PyAV decoding picks the frames nearest each planned time, keeps true timestamps and rejects bad files."""

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from data_pipeline.sizing import RejectedMedia, VideoBudget
from data_pipeline.video import decode_video

VIDEOS = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "videos"
needs_shared = pytest.mark.skipif(
    not VIDEOS.is_dir(), reason="real test videos live in ../shared/testdata, which a fresh clone does not have"
)
BUDGET = VideoBudget(fps=2.0, adaptive=False, video_total_tokens=8192, frame_max_tokens=256)


def _all_frames(path):
    with av.open(str(path)) as container:
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(container.streams.video[0])]
    return sorted(frames, key=lambda item: item[0])


SPARSE = VideoBudget(fps=0.25, adaptive=False, video_total_tokens=8192, frame_max_tokens=256)  # 4 s gaps: seeks


@needs_shared
@pytest.mark.parametrize("budget", [BUDGET, SPARSE], ids=["2fps", "seeking"])
@pytest.mark.parametrize(
    "name", ["var_fps_video.mp4", "nasa_13013.mp4", "mmaction2_test.avi", "big_buck_bunny_0_30.webm"]
)
def test_frames_are_the_nearest_true_frames(name, budget):
    video, plan = decode_video(VIDEOS / name, budget)
    reference = _all_frames(VIDEOS / name)
    ref_times = np.array([t for t, _ in reference])
    assert len(video.timestamps) == len(plan.times) >= 2
    assert video.timestamps == sorted(set(video.timestamps))
    for target, got_time, frame in zip(plan.times, video.timestamps, video.frames):
        nearest = np.abs(ref_times - target).min()
        assert abs(got_time - target) <= nearest + 1e-9, (target, got_time)
        j = int(np.argmin(np.abs(ref_times - got_time)))
        assert ref_times[j] == pytest.approx(got_time)
        assert np.array_equal(frame.permute(1, 2, 0).numpy(), reference[j][1])


@needs_shared
def test_variable_frame_rate_keeps_source_times():
    video, plan = decode_video(VIDEOS / "var_fps_video.mp4", BUDGET)
    assert len(plan.times) == int(video.info.duration_s * 2)
    assert max(abs(a - b) for a, b in zip(video.timestamps, plan.times)) < 0.1


@needs_shared
def test_rotated_phone_video_is_portrait():
    video, _ = decode_video(VIDEOS / "iphone_rotated.mov", BUDGET)
    assert (video.info.height, video.info.width) == (568, 320)
    assert tuple(video.frames.shape[2:]) == (568, 320)


@needs_shared
def test_truncated_file_is_rejected():
    with pytest.raises(RejectedMedia) as err:
        decode_video(VIDEOS / "nasa_13013_first40pct_TRUNCATED.mp4", BUDGET)
    assert err.value.reason == "corrupt_video"


def test_garbage_and_empty_bytes_are_rejected():
    for payload in (b"", b"\x00" * 4096, b"not a video at all" * 100):
        with pytest.raises(RejectedMedia) as err:
            decode_video(payload, BUDGET)
        assert err.value.reason in {"corrupt_video", "empty_video", "no_video_stream"}


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(RejectedMedia) as err:
        decode_video(path, BUDGET)
    assert err.value.reason == "no_video_stream"


@needs_shared
@pytest.mark.parametrize("name", ["nasa_13013.mp4", "big_buck_bunny_0_30.webm", "mmaction2_test.avi"])
def test_damaged_files_decode_or_are_rejected_never_crash(name, tmp_path):
    data = bytearray((VIDEOS / name).read_bytes())
    rng = np.random.default_rng(0)
    damaged = {
        "head_cut": bytes(data[: len(data) // 3]),
        "tail_cut": bytes(data[len(data) // 3 :]),
        "noise": bytes(data[:4096]) + rng.integers(0, 256, len(data) - 4096, dtype=np.uint8).tobytes(),
    }
    outcomes = {}
    for kind, payload in damaged.items():
        try:
            video, _ = decode_video(payload, BUDGET)
            assert video.frames.dtype == torch.uint8 and len(video.timestamps) >= 2
            outcomes[kind] = "decoded"
        except RejectedMedia as err:
            outcomes[kind] = err.reason
    assert set(outcomes.values()) <= {"decoded", "corrupt_video", "empty_video", "no_video_stream"}
