"""Query-block unions of the shared top-k sets: the gather schedule of the Triton sparse-attention kernels.

A block of `block` consecutive queries shares one sorted list of the distinct keys any of them selected (the
union U); `bits[u]` says which queries of the block selected key U[u] (bit i for query i of the block). The
kernels walk U once per block and KV group, gather each key's K/V row once for all the block's queries and
heads, and mask each row to its own set (dsa.md §4.2).
"""

from __future__ import annotations

import torch


def block_union(indices: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """indices [T, k] int32 (ascending, -1 padded) -> (keys [N] int32, bits [N] int32, offsets [B + 1] int32).

    Block b owns keys[offsets[b]:offsets[b + 1]], ascending; B = ceil(T / block)."""
    if not 1 <= block <= 30:
        raise ValueError(f"query block {block} must be in 1..30 (membership is an int32 bit mask)")
    total, k = indices.shape
    blocks = -(-total // block)
    device = indices.device
    rows = torch.arange(total, device=device)
    valid = indices >= 0
    block_of = (rows // block)[:, None].expand(total, k)[valid]
    bit = (1 << (rows % block)).to(torch.int64)[:, None].expand(total, k)[valid]
    composite = block_of * (total + 1) + indices[valid].long()
    order = torch.argsort(composite)
    composite, bit = composite[order], bit[order]
    unique, inverse = torch.unique_consecutive(composite, return_inverse=True)
    bits = torch.zeros(unique.shape[0], dtype=torch.int64, device=device).scatter_add_(0, inverse, bit)
    counts = torch.bincount(unique // (total + 1), minlength=blocks)
    offsets = torch.zeros(blocks + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    return (unique % (total + 1)).to(torch.int32), bits.to(torch.int32), offsets.to(torch.int32)
