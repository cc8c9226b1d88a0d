"""Pixels to ViT patches: bicubic resize to the planned size, scale to [-1, 1], cut 14x14 patches.

Normalisation is rescale 1/255 then mean = std = 0.5 (model.md §3). Patches are emitted per frame in raster
order, each flattened channel-major (c, y, x), which is the conv patch-embedding layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH_SIZE = 14


def patchify(image: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """[3, H, W] -> [(H/p)*(W/p), 3*p*p], raster order, channel-major (c, y, x) per patch."""
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size
    grid = image.reshape(channels, rows, patch_size, cols, patch_size)
    return grid.permute(1, 3, 0, 2, 4).reshape(rows * cols, channels * patch_size * patch_size)


def to_patches(frames: torch.Tensor, height: int, width: int,
               patch_size: int = PATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [F, 3, h, w] -> (patches [F*(H/p)*(W/p), 3*p*p] float32 in [-1, 1], grids [F, 2] in patches)."""
    if height % (2 * patch_size) or width % (2 * patch_size):
        raise ValueError(f"{height}x{width} is not a multiple of {2 * patch_size} (2x2 merge of {patch_size}px patches)")
    pixels = frames.to(torch.float32)
    if tuple(pixels.shape[-2:]) != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    pixels = (pixels.clamp(0, 255) / 255.0 - 0.5) / 0.5
    patches = torch.cat([patchify(frame, patch_size) for frame in pixels])
    grids = torch.tensor([[height // patch_size, width // patch_size]] * frames.shape[0], dtype=torch.int64)
    return patches, grids
