"""One shard record plus its media bytes -> token ids, loss targets and ViT patches.

Lengths are known before decoding: `text_token_count` (stored in the shard index) plus the media expansion
that `media_tokens` derives from probed metadata and the stage budget. The planner packs by these lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data_pipeline.pixels import PATCH_SIZE, to_patches
from data_pipeline.schema import Segment, render
from data_pipeline.sizing import FACTOR, ImageBudget, RejectedMedia, VideoBudget, plan_video
from data_pipeline.tokenizer import KeyeTokenizer
from data_pipeline.video import decode_image, decode_video

MERGE = FACTOR // PATCH_SIZE


@dataclass
class MediaBudget:
    image: ImageBudget = field(default_factory=ImageBudget)
    video: VideoBudget = field(default_factory=VideoBudget)


@dataclass
class EncodedSample:
    """supervised[k]: token k is a loss target. patch_grids / merged_grids: [F, 2] per image or frame."""

    key: str
    input_ids: torch.Tensor  # [L] int64
    supervised: torch.Tensor  # [L] bool
    patches: torch.Tensor  # [N, 3 * 14 * 14] float32
    patch_grids: torch.Tensor  # [F, 2] int64
    clipped_spans: int = 0  # time labels clipped to the video's duration when read (schema.check_spans)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def merged_grids(self) -> torch.Tensor:
        return self.patch_grids // MERGE

    @property
    def num_patches(self) -> int:
        return int(self.patches.shape[0])


def _special_id(tokenizer: KeyeTokenizer, name: str) -> int:
    return getattr(tokenizer.ids, name)


def text_token_count(record: dict, tokenizer: KeyeTokenizer) -> int:
    """Tokens of everything but the media expansions (what the shard index stores)."""
    total = 0
    for seg in render(record):
        if seg.kind == "text":
            total += len(tokenizer.encode(seg.value))
        elif seg.kind == "special":
            total += 1
    return total


def videos_in(record: dict) -> int:
    return sum(seg.kind == "video" for seg in render(record))


def media_tokens(meta: dict, budget: MediaBudget, tokenizer: KeyeTokenizer, videos_in_sample: int) -> tuple[int, int]:
    """(LM tokens, ViT patches) of one image or video under the budget, from its probed metadata.

    Video timestamps are counted at the planned times; the decoded frame's true time has the same digit count
    except at a decade boundary, which the packer tolerates (see `planner`)."""
    if meta["type"] == "image":
        height, width = budget.image.resize(meta["height"], meta["width"])
        tokens = (height // FACTOR) * (width // FACTOR)
        return 2 + tokens, tokens * MERGE * MERGE
    plan = plan_video(meta["duration"], meta["fps"], meta["height"], meta["width"], budget.video, videos_in_sample)
    stamps = sum(len(tokenizer.timestamp_ids(t)) for t in plan.times)
    frames = len(plan.times)
    return 2 + stamps + frames * plan.tokens_per_frame, frames * plan.tokens_per_frame * MERGE * MERGE


def encode_sample(
    key: str, record: dict, media: dict[str, bytes], tokenizer: KeyeTokenizer, budget: MediaBudget
) -> EncodedSample:
    """Decode the media and lay out tokens; raises RejectedMedia on unusable media."""
    ids = tokenizer.ids
    tokens: list[int] = []
    supervised: list[bool] = []
    patches, grids = [], []
    num_videos = videos_in(record)

    def add(token_ids, target: bool) -> None:
        tokens.extend(token_ids)
        supervised.extend([target] * len(token_ids))

    for seg in render(record):
        if seg.kind == "text":
            add(tokenizer.encode(seg.value), seg.supervised)
        elif seg.kind == "special":
            add([_special_id(tokenizer, seg.value)], seg.supervised)
        else:
            data = _media_bytes(media, seg)
            if seg.kind == "image":
                pixels = decode_image(data, budget.image.resize)
                height, width = pixels.shape[1], pixels.shape[2]
                frame_patches, frame_grids = to_patches(pixels[None], height, width)
                add(
                    [ids.vision_start] + [ids.image_pad] * (height // FACTOR) * (width // FACTOR) + [ids.vision_end],
                    False,
                )
            else:
                video, plan = decode_video(data, budget.video, num_videos, resize=True)
                frame_patches, frame_grids = to_patches(video.frames, plan.height, plan.width)
                add([ids.vision_start], False)
                for t in video.timestamps:
                    add(tokenizer.timestamp_ids(t), False)
                    add([ids.video_pad] * plan.tokens_per_frame, False)
                add([ids.vision_end], False)
            patches.append(frame_patches)
            grids.append(frame_grids)
    return EncodedSample(
        key=key,
        input_ids=torch.tensor(tokens, dtype=torch.int64),
        supervised=torch.tensor(supervised, dtype=torch.bool),
        patches=torch.cat(patches) if patches else torch.zeros(0, 3 * PATCH_SIZE * PATCH_SIZE),
        patch_grids=torch.cat(grids) if grids else torch.zeros(0, 2, dtype=torch.int64),
    )


def _media_bytes(media: dict[str, bytes], seg: Segment) -> bytes:
    if seg.value not in media:
        raise RejectedMedia("missing_media", f"the sample has no member {seg.value!r}")
    return media[seg.value]


def split_part(sample: EncodedSample, part: int, length: int) -> EncodedSample:
    """Tokens [part * length, (part + 1) * length) of a text-only sample that is longer than a sequence."""
    if sample.num_patches:
        raise ValueError("only text-only samples are split")
    window = slice(part * length, (part + 1) * length)
    return EncodedSample(
        key=f"{sample.key}#{part}",
        input_ids=sample.input_ids[window],
        supervised=sample.supervised[window],
        patches=sample.patches,
        patch_grids=sample.patch_grids,
    )
