"""The rollout engine's settings (keye_train/posttrain/rollout): cache slots and rows, prefill budget, sampling.

Not yet a section of the root config: the RL stages that use it add `rollout: RolloutConfig` there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy; log-probs are those of logits / temperature, unfiltered
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    max_new_tokens: int = 1024
    stop_ids: List[int] = field(default_factory=list)  # e.g. <|im_end|>, <|endoftext|>
    seed: int = 0  # member g of a group draws with seed * 1_000_003 + g

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"rollout.sampling.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.sampling.top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0 or self.max_new_tokens < 0:
            raise ValueError(
                f"rollout.sampling.top_k={self.top_k}, rollout.sampling.max_new_tokens={self.max_new_tokens}: "
                "must be >= 0"
            )


@dataclass
class RolloutConfig:
    slots: int = 64  # sequences decoding at once (the KV cache's batch)
    capacity: int = 4096  # cache rows per slot: prompt + max_new_tokens - 1 must fit
    prefill_tokens: int = 8192  # prompt tokens per engine step (chunked prefill)
    group_size: int = 1  # G samples per prompt, sharing its prefill
    record_routes: bool = False  # routing replay (R3): record the experts of every fed token
    # auto: pure decode steps replay a CUDA graph where the layout allows (one rank's experts, no TP, dense or
    # warm-up attention; else eager, reason in RolloutEngine.graph_off_reason); off: always eager
    decode_graph: str = "auto"
    # queue each static decode step before the host books the last (rollout/ahead.py); off until it has been timed
    # and checked on a GPU (it is tested on the CPU only)
    decode_ahead: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        for key in ("slots", "capacity", "prefill_tokens", "group_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"rollout.{key}={getattr(self, key)} must be >= 1")
        if self.decode_graph not in ("auto", "static", "off"):
            raise ValueError(f"rollout.decode_graph={self.decode_graph!r}: must be auto, static or off")
        if self.group_size > self.slots:
            raise ValueError(f"rollout.group_size={self.group_size} must be <= rollout.slots={self.slots}")
