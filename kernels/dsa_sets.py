"""Top-k selection sets for DSA kernels: how local they are, and a structured generator shaped like real ones.

A trained indexer's selections are clustered: every query keeps a few sink tokens and a local window, neighbouring
queries share topical spans, and only a small tail is query-specific. Two numbers describe that locality, and they
decide how fast the union-tiled kernels can run:
- `jaccard`: the mean Jaccard index of adjacent queries' sets;
- `union16_over_k`: the mean size of the union of 16 consecutive queries' sets, over k.
Both are measured on query rows that see more than k keys (earlier rows select every key they can see).

`structured_indices` builds sets from those parts (sinks, a window, spans that drift across runs of queries, a
random tail); with the defaults it lands inside the published range (Jaccard 0.85-0.95, |U16| / k 1.5-2.5).
Random sets (`random_indices`: each query's k keys uniform over its past) are the worst case.
"""

from __future__ import annotations

import torch


def _finish(candidates: torch.Tensor, rank: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """candidates [n, c] key positions (-1 unused), rank [n, c] their priority (lower wins) -> [n, k] int32: the k
    best distinct keys per row, ascending, -1 padded. rows: the query positions (a row sees keys 0..row)."""
    c = candidates.shape[1]
    ok = (candidates >= 0) & (candidates <= rows[:, None])
    # Sort by key, then by priority, so each key's best copy comes first among its duplicates.
    code = torch.where(ok, candidates.long() * c + rank, torch.iinfo(torch.int64).max)
    code = torch.sort(code, dim=1).values
    key = torch.div(code, c, rounding_mode="floor")
    valid = code != torch.iinfo(torch.int64).max
    first = valid.clone()
    first[:, 1:] &= key[:, 1:] != key[:, :-1]
    best = torch.where(first, code % c, c + 1)  # distinct keys keep their priority; duplicates drop out
    take = torch.topk(-best.float(), min(k, c), dim=1).indices
    chosen = torch.gather(torch.where(first, key, -1), 1, take)
    chosen = torch.sort(torch.where(chosen >= 0, chosen, torch.iinfo(torch.int64).max), dim=1).values
    out = torch.where(chosen == torch.iinfo(torch.int64).max, -1, chosen)
    if out.shape[1] < k:
        out = torch.cat([out, out.new_full((out.shape[0], k - out.shape[1]), -1)], 1)
    return out.to(torch.int32)


def structured_indices(
    length: int,
    k: int,
    *,
    sinks: int = 64,
    window: int = 512,
    spans: int | None = None,
    span_length: int = 64,
    run: int = 16,
    drift: float = 0.5,
    tail: int = 128,
    seed: int = 0,
    device="cpu",
    chunk_rows: int = 8192,
) -> torch.Tensor:
    """[length, k] int32 sets for one causal document, ascending, -1 padded (the `indices` convention of
    kernels/dsa.py). Row t takes, in priority order: keys 0..sinks-1, its last `window` keys, the `spans` spans of
    `span_length` keys its run of `run` queries shares (each run replaces a `drift` share of the previous run's
    spans with new ones), `tail` keys uniform over its past, then its most recent keys until it holds
    min(k, t + 1). spans=None: as many as fill k with the other parts."""
    if spans is None:
        spans = max(0, (k - sinks - window - tail) // span_length)
    g = torch.Generator(device="cpu").manual_seed(seed)
    runs = -(-length // run)
    # Span starts as a fraction of each query's past, drifting run to run: a span keeps its relative place.
    where = torch.rand(spans, generator=g)
    per_run = torch.empty(runs, spans)
    for r in range(runs):
        moved = torch.rand(spans, generator=g) < drift
        where = torch.where(moved, torch.rand(spans, generator=g), where)
        per_run[r] = where
    per_run = per_run.to(device)
    out = torch.empty(length, k, dtype=torch.int32, device=device)
    for r0 in range(0, length, chunk_rows):
        r1 = min(length, r0 + chunk_rows)
        rows = torch.arange(r0, r1, device=device)
        n = rows.shape[0]
        parts = [
            torch.arange(sinks, device=device).expand(n, sinks),
            rows[:, None] - torch.arange(window, device=device),
        ]
        far = (rows - window).clamp_min(0).float()  # spans and tail come from before the window
        span_start = (per_run[rows // run] * (far[:, None] - span_length).clamp_min(0)).long()
        parts.append((span_start[:, :, None] + torch.arange(span_length, device=device)).flatten(1))
        noise = torch.rand(n, tail, generator=g).to(device)
        parts.append((noise * (rows[:, None] + 1).float()).long())
        parts.append(rows[:, None] - torch.arange(k, device=device))  # fill: the most recent keys
        candidates = torch.cat(parts, 1)
        rank = torch.arange(candidates.shape[1], device=device).expand(n, -1)
        out[r0:r1] = _finish(candidates, rank, rows, k)
    return out


def random_indices(length: int, k: int, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """[length, k] int32: each row's min(k, t + 1) keys uniform over its past, ascending, -1 padded."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    chunk_rows = max(1, (1 << 26) // length)
    out = torch.empty(length, k, dtype=torch.int32, device=device)
    for r0 in range(0, length, chunk_rows):
        rows = torch.arange(r0, min(length, r0 + chunk_rows), device=device)
        scores = torch.rand(rows.shape[0], length, generator=g).to(device)
        scores = torch.where(torch.arange(length, device=device)[None, :] <= rows[:, None], scores, -1.0)
        top = torch.topk(scores, min(k, length), dim=1)
        keys = torch.where(top.values >= 0, top.indices, torch.iinfo(torch.int64).max)
        keys = torch.sort(keys, dim=1).values
        block = torch.where(keys == torch.iinfo(torch.int64).max, -1, keys).to(torch.int32)
        out[r0 : r0 + rows.shape[0], : block.shape[1]] = block
        out[r0 : r0 + rows.shape[0], block.shape[1] :] = -1
    return out


def _distinct(rows: torch.Tensor) -> torch.Tensor:
    """rows [n, m] int (-1 unused) -> [n] the count of distinct non-negative values per row."""
    flat = torch.sort(rows, dim=1).values
    new = torch.ones_like(flat, dtype=torch.bool)
    new[:, 1:] = flat[:, 1:] != flat[:, :-1]
    return (new & (flat >= 0)).sum(1)


def selection_stats(indices: torch.Tensor, group: int = 16, samples: int = 512) -> dict:
    """{jaccard, union16_over_k, rows}: locality of `indices` [T, k] (one document, the kernels/dsa.py layout), on
    up to `samples` randomly placed groups of `group` consecutive queries whose rows all see more than k keys.
    Packed multi-document batches: call it per document."""
    total, k = indices.shape
    first = k  # row t sees t + 1 keys
    if total - first < group:
        return {"jaccard": float("nan"), "union16_over_k": float("nan"), "rows": 0}
    # Random starts (seeded): evenly spaced ones could all align with a period in the sets.
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(first, total - group + 1, (min(samples, (total - first) // group),), generator=g)
    rows = indices[starts.to(indices.device)[:, None] + torch.arange(group, device=indices.device)]  # [S, group, k]
    sizes = (rows >= 0).sum(2)  # [S, group]
    pair_union = _distinct(torch.cat([rows[:, :-1], rows[:, 1:]], 2).flatten(0, 1))
    pair_inter = sizes[:, :-1].flatten() + sizes[:, 1:].flatten() - pair_union
    jaccard = (pair_inter.float() / pair_union.float()).mean()
    union = _distinct(rows.flatten(1)).float() / k
    return {"jaccard": float(jaccard), f"union{group}_over_k": float(union.mean()), "rows": int(rows.shape[0] * group)}
