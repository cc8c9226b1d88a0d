"""`keye-data demo`: a small learnable multimodal corpus, written as real media files and a manifest, then
built into shards with the same code path as `keye-data build`.

Pictures and clips show a soft coloured disk over a gradient; the captions name the disk's colour, the
background and the direction the disk moves, so a model can learn them from the pixels. Real videos (a
directory given with --real-videos) are added as QA samples. The tokenizer is a byte-level BPE trained on the
corpus text with Qwen's special tokens, digits split one per token as in Qwen.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import av
import numpy as np
import torch

from data_pipeline.build import build_shards
from data_pipeline.rl_demo import (
    toy_sft_records,
    write_clip_grounding_prompts,
    write_counting_prompts,
    write_toy_prompts,
)
from data_pipeline.shards import BuildReport
from data_pipeline.tokenizer import SPECIAL_NAMES, KeyeTokenizer

COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.9, 0.1),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
BACKGROUNDS = {"dark": (0.15, 0.15, 0.2), "light": (0.8, 0.8, 0.75), "warm": (0.7, 0.4, 0.2), "cool": (0.2, 0.45, 0.6)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv")
WORDS = (
    "the scene shows a simple shape on a plain background and nothing else moves . a model learns to "
    "describe colours , motion and time from pictures and short clips"
).split()


class Scene:
    """A disk of one colour over a background gradient, moving in one direction."""

    def __init__(self, rng: random.Random):
        self.colour = rng.choice(sorted(COLOURS))
        self.background = rng.choice(sorted(BACKGROUNDS))
        self.direction = rng.choice(sorted(DIRECTIONS))
        self.start = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
        self.speed = rng.uniform(0.04, 0.08)
        self.radius = rng.uniform(0.12, 0.2)
        self.tilt = rng.uniform(-0.2, 0.2)

    def caption(self) -> str:
        return f"a {self.colour} disk moves {self.direction} over a {self.background} background"

    def render(self, height: int, width: int, t: float) -> np.ndarray:
        """uint8 [H, W, 3] at time t seconds."""
        ys = torch.linspace(0, 1, height, dtype=torch.float64)[:, None, None]
        xs = torch.linspace(0, 1, width, dtype=torch.float64)[None, :, None]
        base = torch.tensor(BACKGROUNDS[self.background], dtype=torch.float64) * (1 + self.tilt * (ys - xs))
        dx, dy = DIRECTIONS[self.direction]
        cx = (self.start[0] + dx * self.speed * t) % 1.0
        cy = (self.start[1] + dy * self.speed * t) % 1.0
        disk = torch.sigmoid((self.radius - torch.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)) / 0.02)
        image = base * (1 - disk) + torch.tensor(COLOURS[self.colour], dtype=torch.float64) * disk
        return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_image(path: Path, pixels: np.ndarray) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("png")
        stream.height, stream.width = pixels.shape[:2]
        stream.pix_fmt = "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_video(path: Path, scene: Scene, seconds: float, fps: int = 8, size: tuple = (84, 112)) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for k in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(scene.render(*size, k / fps), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _filler(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _records(rng: random.Random, media: Path, count: int, long_text_words: int):
    """Yield manifest records, writing their media into `media`."""
    kinds = ["caption", "caption", "interleaved", "video_caption", "grounding", "chat", "text"]
    for n in range(count):
        kind = kinds[n % len(kinds)]
        scene = Scene(rng)
        rid = f"demo-{n:05d}"
        if kind == "caption":
            write_image(media / f"{rid}.png", scene.render(rng.choice((56, 84)), rng.choice((56, 84, 112)), 0.0))
            yield {
                "id": rid,
                "kind": kind,
                "image": "img.png",
                "text": scene.caption(),
                "media": {"img.png": f"{rid}.png"},
            }
        elif kind == "interleaved":
            other = Scene(rng)
            write_image(media / f"{rid}-a.png", scene.render(56, 56, 0.0))
            write_image(media / f"{rid}-b.png", other.render(56, 84, 0.0))
            yield {
                "id": rid,
                "kind": kind,
                "content": [
                    {"text": "first picture: "},
                    {"image": "a.png"},
                    {"text": f" {scene.caption()} . second picture: "},
                    {"image": "b.png"},
                    {"text": f" {other.caption()} ."},
                ],
                "media": {"a.png": f"{rid}-a.png", "b.png": f"{rid}-b.png"},
            }
        elif kind in ("video_caption", "grounding", "chat"):
            seconds = rng.choice((2.0, 3.0, 4.0, 6.0))
            write_video(media / f"{rid}.mp4", scene, seconds)
            record = {"id": rid, "kind": kind, "video": "clip.mp4", "media": {"clip.mp4": f"{rid}.mp4"}}
            if kind == "video_caption":
                half = seconds / 2
                record["segments"] = [
                    {"start": 0.0, "end": half, "text": scene.caption()},
                    {"start": half, "end": seconds, "text": f"the {scene.colour} disk keeps moving"},
                ]
            elif kind == "grounding":
                start = round(rng.uniform(0, seconds / 2), 1)
                record.update(query=f"the {scene.colour} disk", start=start, end=seconds)
            else:
                record = {
                    "id": rid,
                    "kind": "chat",
                    "media": record["media"],
                    "messages": [
                        {"role": "user", "content": [{"video": "clip.mp4"}, {"text": "\nwhat moves in this clip ?"}]},
                        {"role": "assistant", "content": scene.caption() + " ."},
                    ],
                }
            yield record
        else:
            words = long_text_words if n % (3 * len(kinds)) == len(kinds) - 1 else rng.randint(10, 40)
            yield {"id": rid, "kind": "text", "text": _filler(rng, words)}


def train_tokenizer(texts: list[str], path: Path, vocab_size: int = 600) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_NAMES.values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))


def _texts(record: dict) -> list[str]:
    found = []

    def walk(value):
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key not in ("media", "id", "kind", "image", "video"):
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(record)
    return found


def make_demo(
    out: str | Path,
    samples: int = 240,
    seed: int = 0,
    real_videos: str | Path | None = None,
    samples_per_shard: int = 40,
    long_text_words: int = 400,
    toy_sft_samples: int = 0,
    log=print,
) -> BuildReport:
    """Media, manifest.jsonl and tokenizer.json under `out`, shards under `out/shards`."""
    out = Path(out)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = list(_records(rng, media, samples, long_text_words))
    if toy_sft_samples:  # the RL stages' toy tasks answered (other draws than rl_prompts.jsonl), spread evenly
        toy = toy_sft_records(toy_sft_samples, seed=seed + 1)
        step = len(records) / len(toy)
        for k, record in reversed(list(enumerate(toy))):
            records.insert(int(k * step), record)
    if real_videos is not None:
        for path in sorted(Path(real_videos).iterdir()):
            if path.suffix.lower() in VIDEO_EXTENSIONS:
                name = "clip" + path.suffix.lower()
                shutil.copyfile(path, media / f"real-{path.name}")
                records.append(
                    {
                        "id": f"real-{path.stem}",
                        "kind": "chat",
                        "media": {name: f"real-{path.name}"},
                        "messages": [
                            {"role": "user", "content": [{"video": name}, {"text": "\ndescribe the clip ."}]},
                            {"role": "assistant", "content": f"a real clip named {path.stem} ."},
                        ],
                    }
                )
        rng.shuffle(records)
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_toy_prompts(out / "rl_prompts.jsonl", seed=seed)  # the RL stages' toy tasks (rl_demo.py)
    write_counting_prompts(out / "rl_counting.jsonl", seed=seed, max_count=2)  # General RL's: counts of 1-2
    write_clip_grounding_prompts(out / "rl_clip_grounding.jsonl", manifest)  # and grounding on the demo clips
    texts = [t for r in records for t in _texts(r)] + ["0123456789 . - seconds", "system\nuser\nassistant\n"]
    train_tokenizer(texts, out / "tokenizer.json")
    log(f"keye-data demo: {len(records)} records, media in {media}")
    return build_shards(
        manifest,
        media,
        out / "shards",
        KeyeTokenizer(out / "tokenizer.json"),
        samples_per_shard=samples_per_shard,
        log=log,
    )
