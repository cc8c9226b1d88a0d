"""Where a stage's samples come from: shard directories, the tokenizer, media budgets, packing, decode workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class DataSource:
    shards: str = "???"  # a shard directory (keye-data build)
    weight: float = 1.0  # its share of the stage's tokens, relative to the other sources


@dataclass
class DataConfig:
    """Shards, tokenizer, the stage's media budget, packing and decode workers (see data_pipeline/)."""

    shards: str = "runs/demo/data/shards"  # a directory built by `keye-data build` / `keye-data demo`
    mixture: List[DataSource] = field(default_factory=list)  # several directories with token weights (replaces shards)
    tokenizer: str = "runs/demo/data/tokenizer.json"  # the HF tokenizer.json the shards were indexed with
    workers: int = 0  # decode processes per rank; 0 decodes inline (no per-sample timeout)
    prefetch_steps: int = 2
    decode_timeout_s: float = 120.0
    image_min_tokens: int = 4
    image_max_tokens: int = 20480
    video_fps: float = 2.0
    video_max_frames: int = 2880
    frame_min_tokens: int = 64
    frame_max_tokens: int = 256
    video_total_tokens: int = 24576  # Stage 1: 24K, Stage 2: 64K, Stage 3: 180K (184320)
    adaptive_video_budget: bool = True
    open_packs: int = 16
    max_pack_age: int = 1024  # samples admitted after a pack opened before it is closed anyway
    long_sample_tokens: int = 0  # > 0: long and short packs alternate in long_short_ratio
    long_short_ratio: List[int] = field(default_factory=lambda: [1, 1])
    patch_cost: float = 1.0  # a ViT patch's compute relative to an LM token, for DP balancing
    # spare short samples planned per step and rank (this token share of its packs) to fill the holes rejected
    # samples leave; 0 plans as before. 0.15 keeps 32K packs 98.6% full under 10% decode rejects, for about 17%
    # more decoding (benchmarks/bad_data_cpu.py)
    reserve_fraction: float = 0.0
