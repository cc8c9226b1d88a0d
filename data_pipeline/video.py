"""Video decoding with PyAV: seek to the frames a plan needs, keep each frame's true source timestamp.

Frames are chosen by time, not index, so variable-frame-rate files stay correct: for every target time the
decoded frame whose presentation time is nearest is kept (a frame is used at most once). Long gaps between
targets are crossed by seeking to the preceding keyframe instead of decoding everything. Display rotation
(e.g. phone video) is applied, so frames come out as they are shown.
"""

from __future__ import annotations

import heapq
import io
from dataclasses import dataclass

import av
import numpy as np
import torch

from data_pipeline.sizing import FramePlan, RejectedMedia, VideoBudget, plan_video

SEEK_GAP_S = 2.0  # seek instead of decoding forward when the next target is this far ahead
REORDER_WINDOW = 16  # some files (e.g. MPEG-4 Part 2 in AVI) emit frames out of presentation order


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    height: int  # as displayed (rotation applied)
    width: int


@dataclass
class DecodedVideo:
    frames: torch.Tensor  # [F, 3, H, W] uint8, displayed orientation, not yet resized
    timestamps: list  # true presentation time of each frame, seconds
    info: VideoInfo


def _open(source) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise RejectedMedia("corrupt_video", str(exc)) from exc


def _rgb(frame, size: tuple | None = None) -> np.ndarray:
    """HxWx3 uint8 as displayed: FFmpeg's bicubic scaling to `size` (displayed H, W) when given, then the
    display rotation (degrees counter-clockwise, as FFmpeg reports it)."""
    turns = (int(getattr(frame, "rotation", 0) or 0) // 90) % 4
    if size is None:
        array = frame.to_ndarray(format="rgb24")
    else:
        height, width = size if turns % 2 == 0 else size[::-1]
        array = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")
    return np.ascontiguousarray(np.rot90(array, k=turns)) if turns else array


def _probe(container) -> tuple[av.video.stream.VideoStream, VideoInfo]:
    if not container.streams.video:
        raise RejectedMedia("no_video_stream", "the file has no video stream")
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    if duration <= 0 or fps <= 0:
        raise RejectedMedia("empty_video", f"duration {duration}s, fps {fps}")
    height, width = stream.codec_context.height, stream.codec_context.width
    return stream, VideoInfo(duration_s=duration, fps=fps, height=height, width=width)


def _in_time_order(frames, window: int = REORDER_WINDOW):
    """Re-sort a decoded frame stream by presentation time within a bounded window."""
    heap, seq = [], 0
    for frame in frames:
        if frame.time is None:
            continue
        heapq.heappush(heap, (frame.time, seq, frame))
        seq += 1
        if len(heap) > window:
            yield heapq.heappop(heap)[2]
    while heap:
        yield heapq.heappop(heap)[2]


def decode_frames(container, stream, times, size: tuple | None = None) -> tuple[list, list]:
    """Decode the frames nearest to each target time (sorted); returns (arrays, true times).

    size: displayed (H, W) to scale each kept frame to while converting it (None: native size)."""
    picked, picked_times = [], []
    targets = sorted(times)
    k, previous, needs_seek, seeked_for = 0, None, True, -1
    while k < len(targets):
        if needs_seek:
            container.seek(int(targets[k] / stream.time_base), stream=stream, backward=True, any_frame=False)
            previous, needs_seek, seeked_for = None, False, k
        for frame in _in_time_order(container.decode(stream)):
            while k < len(targets) and frame.time >= targets[k]:
                # the target lies between `previous` and this frame: keep the closer one
                best = frame
                if previous is not None and targets[k] - previous.time < frame.time - targets[k]:
                    best = previous
                if not picked_times or best.time > picked_times[-1]:
                    picked.append(_rgb(best, size))
                    picked_times.append(best.time)
                k += 1
            previous = frame
            if k < len(targets) and k != seeked_for and targets[k] - frame.time > SEEK_GAP_S:
                needs_seek = True
                break
        else:  # end of stream: the remaining targets map to the last frame, if not already used
            if previous is not None and k < len(targets) and (not picked_times or previous.time > picked_times[-1]):
                picked.append(_rgb(previous, size))
                picked_times.append(previous.time)
            break
    return picked, picked_times


def open_displayed(source):
    """(container, stream, info) with rotation applied to info; the first frame is decoded to read rotation."""
    container = _open(source)
    try:
        stream, info = _probe(container)
        stream.thread_type = "AUTO"
        try:
            first = next(container.decode(stream))
        except (StopIteration, av.FFmpegError) as exc:
            raise RejectedMedia("corrupt_video", f"no decodable frame: {exc}") from exc
        rotation = getattr(first, "rotation", 0) or 0
        if (int(rotation) // 90) % 2:
            info = VideoInfo(info.duration_s, info.fps, height=info.width, width=info.height)
    except BaseException:
        container.close()
        raise
    return container, stream, info


def probe_video(source) -> VideoInfo:
    """Duration, frame rate and displayed size; what `plan_video` needs, without decoding the frames."""
    container, _, info = open_displayed(source)
    container.close()
    return info


def decode_video(
    source, budget: VideoBudget, videos_in_sample: int = 1, resize: bool = False
) -> tuple[DecodedVideo, FramePlan]:
    """Plan and decode one video (path or bytes); with `resize` the frames come at the plan's size.

    Raises RejectedMedia with a counted reason."""
    container, stream, info = open_displayed(source)
    try:
        plan = plan_video(info.duration_s, info.fps, info.height, info.width, budget, videos_in_sample)
        try:
            arrays, times = decode_frames(container, stream, plan.times, (plan.height, plan.width) if resize else None)
        except av.FFmpegError as exc:
            raise RejectedMedia("corrupt_video", str(exc)) from exc
    finally:
        container.close()
    if len(arrays) < min(2, len(plan.times)):
        raise RejectedMedia("corrupt_video", f"decoded {len(arrays)} of {len(plan.times)} planned frames")
    frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return DecodedVideo(frames=frames, timestamps=times, info=info), plan


def decode_image(source, target_size=None) -> torch.Tensor:
    """uint8 [3, H, W] of an image file (path or bytes); RejectedMedia('unreadable_image') otherwise.

    target_size: optional (height, width) -> (H, W); the picture is scaled to it (bicubic) while converted."""
    try:
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
            if not container.streams.video:
                raise RejectedMedia("unreadable_image", "no picture stream")
            frame = next(container.decode(video=0))
            if frame.width == 0 or frame.height == 0:
                raise RejectedMedia("unreadable_image", "empty picture")
            size = None if target_size is None else target_size(frame.height, frame.width)
            array = _rgb(frame, size)
    except RejectedMedia:
        raise
    except (av.FFmpegError, OSError, ValueError, StopIteration) as exc:
        raise RejectedMedia("unreadable_image", str(exc) or type(exc).__name__) from exc
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
