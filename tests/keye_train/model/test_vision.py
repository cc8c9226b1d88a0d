"""ViT attention stays inside each frame; the 2x2 merge follows the documented raster order."""

import torch

from data_pipeline.batch import VisualInput
from keye_train.config import ParallelConfig
from keye_train.model.vision import merge_2x2


def build_tower(model):
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    parts = build_model(model, ParallelConfig(), torch.float32, False, ColocatedPlacement())
    initialize_weights(parts, model, seed=3)
    return parts.vision


def test_frames_do_not_attend_to_each_other(single_rank):
    tower = build_tower(single_rank)
    grids = torch.tensor([[4, 4], [4, 6], [4, 4]])
    sizes = grids.prod(1).tolist()
    patches = torch.randn(sum(sizes), 3 * 14 * 14, generator=torch.Generator().manual_seed(0))
    changed = patches.clone()
    changed[sizes[0] : sizes[0] + sizes[1]] += torch.randn(sizes[1], 3 * 14 * 14)
    with torch.no_grad():
        before = tower.encoder(VisualInput(patches, grids))
        after = tower.encoder(VisualInput(changed, grids))
    first, second = slice(0, sizes[0]), slice(sizes[0], sizes[0] + sizes[1])
    third = slice(sizes[0] + sizes[1], None)
    assert torch.equal(before[first], after[first])
    assert torch.equal(before[third], after[third])
    assert not torch.allclose(before[second], after[second])
    # the same frame alone gives the same features: no leakage from its neighbours
    with torch.no_grad():
        alone = tower.encoder(VisualInput(patches[third], grids[2:]))
    torch.testing.assert_close(alone, before[third], rtol=1e-5, atol=1e-5)


def test_tower_output_has_one_row_per_merged_token(single_rank):
    tower = build_tower(single_rank)
    grids = torch.tensor([[4, 6], [2, 2]])
    visual = VisualInput(torch.randn(int(grids.prod(1).sum()), 3 * 14 * 14), grids)
    with torch.no_grad():
        out = tower(visual)
    assert out.shape == (visual.num_merged_tokens(), single_rank.lm.hidden_size)


def test_merge_2x2_raster_order():
    rows, cols = 4, 6
    features = torch.arange(rows * cols, dtype=torch.float32).view(-1, 1)  # feature = patch index
    merged = merge_2x2(features, torch.tensor([[rows, cols]]))
    expected = []
    for i in range(rows // 2):
        for j in range(cols // 2):
            expected.append(
                [
                    (2 * i) * cols + 2 * j,
                    (2 * i) * cols + 2 * j + 1,
                    (2 * i + 1) * cols + 2 * j,
                    (2 * i + 1) * cols + 2 * j + 1,
                ]
            )
    assert merged.tolist() == [[float(x) for x in row] for row in expected]
