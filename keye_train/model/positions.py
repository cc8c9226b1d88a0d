"""Rotation angles of the ViT's 2D RoPE: rows and columns of each image or frame's patch grid.

Pure torch, no Megatron.
"""

from __future__ import annotations

import torch


def vit_rope_angles(grids: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[N, head_dim] float32 2D RoPE angles for every patch of every frame (rotate-half layout).

    grids: [F, 2] (rows, cols) patch grid per image/frame; patches are raster order per frame and
    row/col restart at 0 for each frame. With n = head_dim // 4 frequencies
    f_i = theta^(-2i / (head_dim / 2)), e = [r*f_0..r*f_{n-1}, c*f_0..c*f_{n-1}] and the output is
    cat(e, e).
    """
    if head_dim % 4 != 0:
        raise ValueError(f"ViT 2D RoPE needs head_dim divisible by 4, got {head_dim}")
    grids = grids.reshape(-1, 2).to(torch.int64)
    num_freqs = head_dim // 4
    inv_freq = theta ** (-torch.arange(num_freqs, dtype=torch.float64) * 2 / (head_dim // 2))

    sizes = grids[:, 0] * grids[:, 1]
    frame_of_patch = torch.repeat_interleave(torch.arange(grids.shape[0], device=grids.device), sizes)
    frame_start = torch.cumsum(sizes, 0) - sizes
    local = torch.arange(int(sizes.sum()), device=grids.device) - frame_start[frame_of_patch]
    cols = grids[frame_of_patch, 1]
    row, col = local // cols, local % cols

    inv_freq = inv_freq.to(grids.device)
    angles = torch.cat([row[:, None] * inv_freq, col[:, None] * inv_freq], dim=1)
    return torch.cat([angles, angles], dim=1).to(torch.float32)
