"""Attention under context parallelism (parallel.cp): this rank's queries against every CP rank's keys and values.

K/V are all-gathered over the CP group per layer into the global order of the padded packed sequence
(`parallel.context.gather_rows`, whose backward reduce-scatters dK/dV to their owners); each of the rank's query
segments (two chunks per document, `data_pipeline.context_parallel.ContextShard`) then attends causally to its
document up to the chunk's end (`kernels.context_attention`).
"""

from __future__ import annotations

import torch

from kernels.context_attention import segment_attention
from parallel.context import gather_rows


def gather_keys_values(key: torch.Tensor, value: torch.Tensor, shard) -> tuple[torch.Tensor, torch.Tensor]:
    """key, value [n, Hkv, D] local rows -> [S', Hkv, D] each, every CP rank's rows in global order (one gather)."""
    both = gather_rows(torch.cat([key, value], dim=1), shard.gather_order)
    return both.split([key.shape[1], value.shape[1]], dim=1)


def context_attention(query, key, value, shard, scale: float, backend: str = "auto") -> torch.Tensor:
    """query [n, Hq, D], key, value [n, Hkv, D] (this rank's rows) -> [n, Hq, D], exact per-document causal."""
    keys, values = gather_keys_values(key, value, shard)
    return segment_attention(
        query, keys, values, shard.q_lengths, shard.k_starts, shard.k_lengths, scale=scale, backend=backend
    )
