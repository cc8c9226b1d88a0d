"""Patches are raster-ordered, channel-major 14x14 blocks of pixels scaled to [-1, 1]."""

import pytest
import torch

from data_pipeline.pixels import to_patches


def test_patch_layout_and_scaling_against_a_direct_float64_slice():
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 28, 56), generator=gen, dtype=torch.uint8)
    patches, grids = to_patches(frames, 28, 56)
    assert grids.tolist() == [[2, 4], [2, 4]]
    assert patches.shape == (2 * 8, 3 * 14 * 14) and patches.dtype == torch.float32
    scaled = frames.double() / 255.0 * 2 - 1
    k = 0
    for f in range(2):
        for row in range(2):
            for col in range(4):
                block = scaled[f, :, row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14].reshape(-1)
                torch.testing.assert_close(patches[k].double(), block, rtol=0, atol=1e-6)
                k += 1
    assert patches.min() >= -1 and patches.max() <= 1


def test_resize_to_the_plan_and_reject_sizes_the_merge_cannot_split():
    frames = torch.full((1, 3, 100, 200), 255, dtype=torch.uint8)
    patches, grids = to_patches(frames, 56, 112)
    assert grids.tolist() == [[4, 8]] and patches.shape[0] == 32
    torch.testing.assert_close(patches, torch.ones_like(patches))  # flat white stays exactly white
    with pytest.raises(ValueError, match="multiple of 28"):
        to_patches(frames, 42, 56)  # 42 px cannot be split by the 2x2 merge
