"""Pixels to ViT patches: bicubic resize to the planned size, scale to [-1, 1], cut 14x14 patches.

Normalisation is rescale 1/255 then mean = std = 0.5 (SigLIP's preprocessing). Patches are emitted per frame in raster
order, each flattened channel-major (c, y, x), which is the conv patch-embedding layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH_SIZE = 14


def to_patches(
    frames: torch.Tensor, height: int, width: int, patch_size: int = PATCH_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [F, 3, h, w] -> (patches [F*(H/p)*(W/p), 3*p*p] float32 in [-1, 1], grids [F, 2] in patches).

    Frames already at (height, width) (the decoders scale while converting) are cut as uint8 and scaled once."""
    if height % (2 * patch_size) or width % (2 * patch_size):
        raise ValueError(
            f"{height}x{width} is not a multiple of {2 * patch_size} (2x2 merge of {patch_size}px patches)"
        )
    count = frames.shape[0]
    if tuple(frames.shape[-2:]) != (height, width):
        resized = F.interpolate(
            frames.to(torch.float32), size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
        frames = resized.clamp_(0, 255)
    rows, cols = height // patch_size, width // patch_size
    grid = frames.reshape(count, 3, rows, patch_size, cols, patch_size).permute(0, 2, 4, 1, 3, 5)
    patches = grid.reshape(count * rows * cols, 3 * patch_size * patch_size).to(torch.float32)
    patches.mul_(2.0 / 255.0).sub_(1.0)  # rescale 1/255, then mean = std = 0.5
    grids = torch.tensor([[rows, cols]] * count, dtype=torch.int64).reshape(count, 2)
    return patches, grids
