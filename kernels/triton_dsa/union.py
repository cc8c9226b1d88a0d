"""Query-block unions of the shared top-k sets: the gather schedule of the Triton sparse-attention kernels.

A block of `block` consecutive queries shares one sorted list of the distinct keys any of them selected (the
union U); `bits[u]` says which queries of the block selected key U[u] (bit i for query i of the block). The
kernels walk U once per block and KV group, gather each key's K/V row once for all the block's queries and
heads, and mask each row to its own set (the query-block union tiling of token-sparse attention kernels).

The block size trades MMA rows against wasted work: a tile computes |U| x block x G scores of which only
block x k are selected. Neighbouring queries of a trained model share most of their keys (|U| near k, so big
blocks win); unrelated sets (random inputs) make |U| near block x k (so the smallest block that still fills 16
MMA rows wins). `choose_block` measures the overlap on a sample of blocks.
"""

from __future__ import annotations

import weakref

import torch

_SENTINEL = torch.iinfo(torch.int32).max


UNION_ALIGN = 64  # the kernels' padding of each block's union: whole chunks, aligned starts, no bounds masks


def block_union(indices: torch.Tensor, block: int, align: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """indices [T, k] int32 (ascending, -1 padded) -> (keys [N] int32, bits [N] int32, offsets [B + 1] int32).

    Block b owns keys[offsets[b]:offsets[b + 1]], ascending; B = ceil(T / block). align > 1 pads each block's
    list to a multiple of `align` with key 0 and bits 0 (selected by none of its queries)."""
    if not 1 <= block <= 30:
        raise ValueError(f"query block {block} must be in 1..30 (membership is an int32 bit mask)")
    total, k = indices.shape
    if total * 32 >= _SENTINEL:
        raise ValueError(f"block_union: {total} tokens do not fit the int32 key x 32 + row code")
    blocks = -(-total // block)
    padded = torch.full((blocks * block, k), -1, dtype=torch.int32, device=indices.device)
    padded[:total] = indices
    row = (torch.arange(blocks * block, device=indices.device, dtype=torch.int32) % block)[:, None]
    code = torch.where(padded >= 0, padded * 32 + row, _SENTINEL)  # key and query-in-block in one int32
    code = torch.sort(code.view(blocks, block * k), dim=1).values  # one segmented sort: keys ascending per block
    valid = code != _SENTINEL
    key = torch.where(valid, code >> 5, -1)
    first = valid.clone()
    first[:, 1:] &= key[:, 1:] != key[:, :-1]
    segment = torch.cumsum(first.view(-1), 0)[valid.view(-1)] - 1
    bit = torch.bitwise_left_shift(torch.ones_like(code), code & 31)[valid]
    bits = torch.zeros(int(first.sum()), dtype=torch.int32, device=indices.device).scatter_add_(0, segment, bit)
    counts = first.sum(1)
    offsets = torch.zeros(blocks + 1, dtype=torch.int64, device=indices.device)
    offsets[1:] = torch.cumsum(counts, 0)
    keys = key[first].to(torch.int32)
    if align > 1:
        padded_offsets = torch.zeros_like(offsets)
        padded_offsets[1:] = torch.cumsum((counts + align - 1) // align * align, 0)
        owner = torch.repeat_interleave(torch.arange(blocks, device=indices.device), counts)
        at = torch.arange(keys.shape[0], device=indices.device) - offsets[owner] + padded_offsets[owner]
        size = int(padded_offsets[-1])
        keys = torch.zeros(size, dtype=torch.int32, device=indices.device).index_copy_(0, at, keys)
        bits = torch.zeros(size, dtype=torch.int32, device=indices.device).index_copy_(0, at, bits)
        offsets = padded_offsets
    return keys, bits, offsets.to(torch.int32)


def choose_block(indices: torch.Tensor, smallest: int, largest: int, sample_blocks: int = 256) -> int:
    """`largest` when neighbouring queries share most keys (mean |U| <= 4 x the mean selected count), else
    `smallest`; measured on up to `sample_blocks` evenly spaced blocks of `largest` queries."""
    total = indices.shape[0]
    if smallest >= largest or total < 2 * largest:
        return largest
    starts = torch.linspace(0, total - largest, min(sample_blocks, total // largest), device=indices.device).long()
    rows = indices[starts[:, None] + torch.arange(largest, device=indices.device)[None, :]]  # [S, block, k]
    flat = torch.sort(rows.flatten(1), dim=1).values
    distinct = ((flat[:, 1:] != flat[:, :-1]) & (flat[:, 1:] >= 0)).sum(1) + (flat[:, 0] >= 0).long()
    selected = (rows >= 0).sum((1, 2)).float() / largest
    return largest if float(distinct.float().mean()) <= 4 * float(selected.mean()) else smallest


def block_queries_for(indices: torch.Tensor, per_group: int) -> int:
    """The union tile's query count for these sets: 128 MMA rows (16 queries of 8 heads) when neighbours overlap,
    else the fewest queries that still fill 16 rows."""
    smallest = -(-16 // per_group)
    return choose_block(indices, smallest=smallest, largest=max(smallest, min(16, max(1, 128 // per_group))))


_last: dict = {}  # one entry: the sets of the latest call, held weakly


def shared_union(indices: torch.Tensor, per_group: int) -> tuple[int, tuple[torch.Tensor, ...]]:
    """(block, block_union(indices, block, UNION_ALIGN)) with block chosen by `choose_block`, built once per sets
    tensor: the attention and the sparse-stage KL of one layer share it. The entry is reused only while the very
    same tensor object is alive and unmodified (its version counter), so a new tensor never sees a stale union."""
    key = (per_group, indices._version)
    held = _last.get("sets")
    if held is not None and held() is indices and _last.get("key") == key:
        return _last["value"]
    block = block_queries_for(indices, per_group)
    value = (block, block_union(indices, block, UNION_ALIGN))
    _last.update(sets=weakref.ref(indices), key=key, value=value)
    return value
