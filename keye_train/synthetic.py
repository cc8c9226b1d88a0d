"""Synthetic multimodal pack source: real pixels, real token layouts, exact resume.

Stands in for the data pipeline in the demo and tests. Sample i is a pure function of (seed, i), and so is
pack g: it greedily takes samples g * seq_length, g * seq_length + 1, ... while they fit (whole samples
only, the first that does not fit is dropped, the tail is one padding document). DP rank r reads packs
r, r + dp_size, ..., so every global batch holds the same packs whatever the DP size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from data_pipeline.pixels import patchify
from keye_train.config import TokenIds
from keye_train.batch import PackedBatch, VisualInput
from keye_train.model.positions import mrope_position_ids


@dataclass
class SyntheticDataConfig:
    seq_length: int = 512
    patch_size: int = 14
    image_sizes: tuple = ((56, 56), (56, 84))  # (H, W) pixels, multiples of 2 * patch_size
    video_frames: int = 2
    video_size: tuple = (56, 56)
    fps: float = 2.0
    text_len_range: tuple = (8, 48)  # inclusive
    vocab_text_max: int = 151000  # text ids are drawn from [0, vocab_text_max)
    text_words: int = 256  # distinct text tokens in the synthetic language
    text_jump_prob: float = 0.1  # chance that the next word is random instead of the fixed successor
    mix: dict = field(default_factory=lambda: {"caption": 0.5, "video": 0.3, "text": 0.2})


@dataclass
class SyntheticSample:
    """One sample. supervised[k]: token k is a loss target (caption/text or <|im_end|>)."""

    index: int
    input_ids: torch.Tensor  # [L] int64
    supervised: torch.Tensor  # [L] bool
    patches: torch.Tensor  # [N, 3 * p * p] float32
    patch_grids: torch.Tensor  # [F, 2] int64
    merged_grids: torch.Tensor  # [F, 2] int64

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def sample_generator(seed: int, index: int) -> torch.Generator:
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


class _Scene:
    """Smooth coloured gradient + low-frequency wave + a soft disk that moves over time."""

    def __init__(self, gen: torch.Generator):
        self.offset = _uniform(gen, 3, 0.2, 0.8)
        self.slope_y = _uniform(gen, 3, -0.3, 0.3)
        self.slope_x = _uniform(gen, 3, -0.3, 0.3)
        self.wave_amp = _uniform(gen, 3, 0.0, 0.15)
        self.wave_freq = _uniform(gen, 2, 0.5, 2.0)
        self.wave_phase = _uniform(gen, 3, 0.0, 2 * math.pi)
        self.disk_color = _uniform(gen, 3, 0.0, 1.0)
        self.disk_center = _uniform(gen, 2, 0.25, 0.75)
        self.disk_velocity = _uniform(gen, 2, -0.4, 0.4)
        self.disk_radius = float(_uniform(gen, 1, 0.1, 0.25))

    def render(self, height: int, width: int, time: float) -> torch.Tensor:
        """[3, H, W] float32 in [0, 1]."""
        ys = torch.linspace(0, 1, height, dtype=torch.float64)[:, None]
        xs = torch.linspace(0, 1, width, dtype=torch.float64)[None, :]
        wave = torch.sin(2 * math.pi * (self.wave_freq[0] * ys + self.wave_freq[1] * xs + time)
                         + self.wave_phase[:, None, None])
        base = (self.offset[:, None, None] + self.slope_y[:, None, None] * ys
                + self.slope_x[:, None, None] * xs + self.wave_amp[:, None, None] * wave)
        cy, cx = (self.disk_center + self.disk_velocity * time).tolist()
        dist = torch.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)
        disk = torch.sigmoid((self.disk_radius - dist) / 0.02)
        image = base * (1 - disk) + self.disk_color[:, None, None] * disk
        return image.clamp(0, 1).to(torch.float32)


def _random_text(gen: torch.Generator, config: SyntheticDataConfig) -> torch.Tensor:
    """A learnable token stream: a fixed random walk over a small word list, with occasional jumps.

    Real captions are predictable; uniform random ids would make the loss flat at ln(vocab)."""
    low, high = config.text_len_range
    length = int(torch.randint(low, high + 1, (1,), generator=gen))
    words = config.text_words
    successor = torch.randperm(words, generator=torch.Generator().manual_seed(0))  # same for every sample
    token_of = (torch.arange(words) * 7919 + 1000) % config.vocab_text_max
    state = int(torch.randint(0, words, (1,), generator=gen))
    out = []
    for _ in range(length):
        out.append(state)
        jump = float(torch.rand((), generator=gen)) < config.text_jump_prob
        state = int(torch.randint(0, words, (1,), generator=gen)) if jump else int(successor[state])
    return token_of[torch.tensor(out)]


def make_sample(config: SyntheticDataConfig, ids: TokenIds, seed: int, index: int,
                spatial_merge: int = 2) -> SyntheticSample:
    """Sample `index`: a pure function of (config, seed, index)."""
    gen = sample_generator(seed, index)
    kinds = list(config.mix)
    weights = torch.tensor([float(config.mix[k]) for k in kinds], dtype=torch.float64)
    kind = kinds[int(torch.multinomial(weights, 1, generator=gen))]

    tokens: list[int] = [ids.im_start]
    supervised: list[bool] = [False]
    frames: list[torch.Tensor] = []

    def add(token_ids, is_target: bool) -> None:
        token_ids = [int(t) for t in token_ids]
        tokens.extend(token_ids)
        supervised.extend([is_target] * len(token_ids))

    def merged_tokens(height: int, width: int) -> int:
        unit = config.patch_size * spatial_merge
        if height % unit or width % unit:
            raise ValueError(f"image size {height}x{width} is not a multiple of {unit}")
        return (height // unit) * (width // unit)

    if kind == "caption":
        height, width = config.image_sizes[int(torch.randint(len(config.image_sizes), (1,), generator=gen))]
        frames.append(_Scene(gen).render(height, width, 0.0))
        add([ids.vision_start] + [ids.image_pad] * merged_tokens(height, width) + [ids.vision_end], False)
    elif kind == "video":
        height, width = config.video_size
        scene = _Scene(gen)
        add([ids.vision_start], False)
        for j in range(config.video_frames):
            time = j / config.fps
            frames.append(scene.render(height, width, time))
            add([ids.frame] + ids.number_ids(f"{time:.1f}"), False)
            add([ids.video_pad] * merged_tokens(height, width), False)
        add([ids.vision_end], False)
    elif kind != "text":
        raise ValueError(f"unknown synthetic sample kind {kind!r}")
    add(_random_text(gen, config).tolist(), True)
    add([ids.im_end], True)

    p = config.patch_size
    patch_grids = torch.tensor([[f.shape[1] // p, f.shape[2] // p] for f in frames], dtype=torch.int64)
    patches = [patchify((f - 0.5) / 0.5, p) for f in frames]
    return SyntheticSample(
        index=index,
        input_ids=torch.tensor(tokens, dtype=torch.int64),
        supervised=torch.tensor(supervised, dtype=torch.bool),
        patches=torch.cat(patches) if patches else torch.zeros(0, 3 * p * p),
        patch_grids=patch_grids.reshape(-1, 2),
        merged_grids=patch_grids.reshape(-1, 2) // spatial_merge,
    )


class SyntheticPackSource:
    """Endless iterator of `PackedBatch` for one DP rank, with JSON-safe exact-resume state."""

    def __init__(self, config: SyntheticDataConfig, ids: TokenIds | None = None, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, spatial_merge: int = 2):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.config = config
        self.ids = ids or TokenIds()
        if config.vocab_text_max > self.ids.pad:
            raise ValueError("vocab_text_max must stay below the special token ids")
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.spatial_merge = spatial_merge
        self.next_pack = dp_rank  # global index of this rank's next pack

    def state_dict(self) -> dict:
        return {"next_pack": self.next_pack, "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "dp_rank", "dp_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"resume state has {key}={state[key]}, source has {getattr(self, key)}")
        self.next_pack = int(state["next_pack"])

    def __iter__(self) -> "SyntheticPackSource":
        return self

    def __next__(self) -> PackedBatch:
        batch = self.pack(self.next_pack)
        self.next_pack += self.dp_size
        return batch

    def pack(self, index: int) -> PackedBatch:
        """Global pack `index`: a pure function of (config, seed, index)."""
        seq_length = self.config.seq_length
        samples: list[SyntheticSample] = []
        used = 0
        for sample_index in range(index * seq_length, (index + 1) * seq_length):  # every sample has >= 1 token
            sample = make_sample(self.config, self.ids, self.seed, sample_index, self.spatial_merge)
            if sample.length > seq_length:
                raise ValueError(f"sample {sample.index} has {sample.length} tokens > seq_length {seq_length}")
            if used + sample.length > seq_length:
                break
            samples.append(sample)
            used += sample.length
        return self._pack(samples)

    def _pack(self, samples: list[SyntheticSample]) -> PackedBatch:
        ids, seq_length = self.ids, self.config.seq_length
        input_ids, labels, loss_mask, positions, doc_lengths = [], [], [], [], []
        visual_tokens = (ids.image_pad, ids.video_pad)
        for sample in samples:
            input_ids.append(sample.input_ids)
            labels.append(torch.cat([sample.input_ids[1:], torch.tensor([ids.pad])]))
            loss_mask.append(torch.cat([sample.supervised[1:], torch.tensor([False])]).float())
            positions.append(mrope_position_ids(sample.input_ids, visual_tokens, sample.merged_grids))
            doc_lengths.append(sample.length)
        tail = seq_length - sum(doc_lengths)
        if tail > 0:
            input_ids.append(torch.full((tail,), ids.pad, dtype=torch.int64))
            labels.append(torch.full((tail,), ids.pad, dtype=torch.int64))
            loss_mask.append(torch.zeros(tail))
            positions.append(torch.arange(tail).expand(3, tail))
            doc_lengths.append(tail)

        grids = [s.patch_grids for s in samples if s.patch_grids.shape[0]]
        visual = None
        if grids:
            visual = VisualInput(patches=torch.cat([s.patches for s in samples]), grids=torch.cat(grids))
        cu_seqlens = torch.tensor([0] + doc_lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
        return PackedBatch(
            input_ids=torch.cat(input_ids),
            labels=torch.cat(labels),
            loss_mask=torch.cat(loss_mask),
            position_ids=torch.cat(positions, dim=1).contiguous(),
            cu_seqlens=cu_seqlens,
            visual=visual,
            sample_ids=[s.index for s in samples],
        )
