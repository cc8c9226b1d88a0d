"""Attention under context parallelism (parallel.cp): this rank's queries against every CP rank's keys and values.

K/V are all-gathered over the CP group per layer into the global order of the padded packed sequence
(`parallel.context.gather_rows`, whose backward reduce-scatters dK/dV to their owners); each of the rank's query
segments (two chunks per document, `data_pipeline.context_parallel.ContextShard`) then attends causally to its
document up to the chunk's end (`kernels.context_attention`).
"""

from __future__ import annotations

import torch

from kernels import dsa as dsa_ops
from kernels.context_attention import segment_attention
from kernels.dsa_context import indexer_kl_segments, indexer_topk_segments
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


def kl_row_weights(shard) -> torch.Tensor:
    """[n]: cp / (rows before padding) on real rows, 0 on CP pad rows. Summed over CP ranks, the weighted KL sums
    are cp x the one-rank mean; DDP's average over DP x CP then gives the indexers the one-rank gradient."""
    return (~shard.pad).double() * (shard.cp / max(1, shard.real_length))  # the KL casts it to its own precision


def context_dsa(
    q,
    k,
    v,
    index_q,
    index_w,
    index_k,
    shard,
    mode: str,
    topk: int,
    scale: float,
    kl: bool,
    tp_group=None,
    backend: str = "auto",
    budget_bytes: int | None = None,
    attention_backend: str = "auto",
):
    """DSA with local queries: K/V and the indexer keys gathered over CP, the top-k over global positions under
    the causal and document masks (the sets one rank selects), sparse attention over the global K/V (warm-up:
    dense segment attention). Returns (out [n, Hq, D], indices [n, topk] global or None, the weighted KL sum or
    None); `kl`: compute the indexer loss; backend, budget_bytes: the DSA kernels' (model.lm.dsa; the top-k takes
    `backend`, the sparse attention and the KL run the torch reference under CP)."""
    keys, values = gather_keys_values(k, v, shard)
    index_keys = gather_rows(index_k, shard.gather_order)
    segments = (shard.q_lengths, shard.k_starts, shard.k_lengths)
    opts = {"backend": backend, **({"budget_bytes": budget_bytes} if budget_bytes is not None else {})}
    indices = None
    if mode == "sparse":
        detached = (index_q.detach(), index_w.detach(), index_keys.detach())
        indices = indexer_topk_segments(*detached, *segments, topk, **opts)
        # the Triton sparse kernel takes as many key rows as queries (not yet checked with local queries against
        # global keys): under CP the exact, chunked torch reference serves the sparse attention
        out, _ = dsa_ops.sparse_gqa_attention(q, keys, values, indices, scale, **dict(opts, backend="torch"))
    else:
        out = segment_attention(q, keys, values, *segments, scale=scale, backend=attention_backend)
    loss = None
    if kl:
        weights = kl_row_weights(shard).to(q.device)
        loss = indexer_kl_segments(
            index_q, index_w, index_keys, q, keys, *segments, weights, scale, indices, tp_group, budget_bytes
        )
    return out, indices, loss
