"""Image and video sizing: smart_resize, frame counts and the adaptive per-video token budget.

Keye-VL-2.0's sizing: one LM visual token covers 28x28 source pixels; the per-stage video budget is
split evenly over a sample's videos and, in adaptive mode, scaled by duration (paper schedule by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FACTOR = 28  # pixels per merged token side (14-pixel patches, 2x2 merge)
PIXELS_PER_TOKEN = FACTOR * FACTOR
MAX_ASPECT_RATIO = 200

# (upper duration bound in seconds, budget factor); beyond the last bound the factor is 1.0.
PAPER_ADAPTIVE_SCHEDULE = ((256.0, 0.125), (512.0, 0.25), (1024.0, 0.5), (2048.0, 1.0))
RELEASED_INFERENCE_SCHEDULE = ((259.0, 0.09), (518.0, 0.18), (1036.0, 0.36), (2016.0, 0.7))


class RejectedMedia(ValueError):
    """A picture or video that cannot be used; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """(H, W), multiples of `factor`, near the input aspect ratio, with min_pixels <= H*W <= max_pixels."""
    if height <= 0 or width <= 0:
        raise RejectedMedia("empty_image", f"{height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise RejectedMedia("aspect_ratio", f"{height}x{width} exceeds {MAX_ASPECT_RATIO}:1")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return max(h, factor), max(w, factor)


@dataclass
class ImageBudget:
    min_tokens: int = 4
    max_tokens: int = 20480

    def resize(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.min_tokens * PIXELS_PER_TOKEN, self.max_tokens * PIXELS_PER_TOKEN)


@dataclass
class VideoBudget:
    """Per-stage video sampling and token budget (Stage 1: 24K, Stage 2: 64K, Stage 3: 180K video tokens)."""

    fps: float = 2.0
    max_frames: int = 2880
    frame_min_tokens: int = 64
    frame_max_tokens: int = 256
    video_total_tokens: int = 184320
    adaptive: bool = True
    schedule: tuple = field(default_factory=lambda: PAPER_ADAPTIVE_SCHEDULE)

    def __post_init__(self):
        if not 0 < self.fps <= 4:
            raise ValueError(f"fps={self.fps} must be in (0, 4]")
        if not 0 < self.frame_min_tokens <= self.frame_max_tokens:
            raise ValueError("need 0 < frame_min_tokens <= frame_max_tokens")


def duration_factor(duration_s: float, schedule) -> float:
    for bound, factor in schedule:
        if duration_s <= bound:
            return factor
    return 1.0


@dataclass(frozen=True)
class FramePlan:
    """How to sample one video: `times` are target timestamps (s); every frame is resized to (height, width)."""

    times: tuple
    height: int
    width: int
    tokens_per_frame: int


def plan_video(
    duration_s: float, native_fps: float, height: int, width: int, budget: VideoBudget, videos_in_sample: int = 1
) -> FramePlan:
    """Frame count, target timestamps and frame size for a video under the stage budget."""
    if duration_s <= 0 or native_fps <= 0:
        raise RejectedMedia("empty_video", f"duration {duration_s}s at {native_fps} fps")
    total_tokens = budget.video_total_tokens / max(1, videos_in_sample)
    if budget.adaptive:
        total_tokens *= duration_factor(duration_s, budget.schedule)
    total_tokens = max(total_tokens, 2 * budget.frame_min_tokens)
    native_frames = max(1, round(duration_s * native_fps))
    fps = min(budget.fps, native_fps)
    cap = min(native_frames, budget.max_frames, int(total_tokens // budget.frame_min_tokens))
    nframes = max(min(2, native_frames), min(math.floor(duration_s * fps), cap))
    # Largest per-frame token count that keeps the video within its budget (the released code's
    # off-by-one, one step above, is not reproduced).
    tokens = int(min(budget.frame_max_tokens, max(budget.frame_min_tokens, total_tokens // nframes)))
    h, w = smart_resize(height, width, budget.frame_min_tokens * PIXELS_PER_TOKEN, tokens * PIXELS_PER_TOKEN)
    last = duration_s - 1.0 / native_fps
    times = tuple(last * k / (nframes - 1) if nframes > 1 else 0.0 for k in range(nframes))
    return FramePlan(times=times, height=h, width=w, tokens_per_frame=(h // FACTOR) * (w // FACTOR))
