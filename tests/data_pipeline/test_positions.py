import pytest
import torch

from data_pipeline.positions import mrope_position_ids

VS, VE, IMG, VID, FRAME = 151652, 151653, 151655, 151656, 151669
DOT, D0, D5 = 13, 15, 20
PADS = (IMG, VID)


def test_worked_example_image_in_a_prompt():
    # '<|im_start|>user\n' (3 tokens), vision_start, 2x3 image, vision_end, 'Hi'
    ids = torch.tensor([1, 2, 3, VS] + [IMG] * 6 + [VE, 4])
    expected = torch.tensor(
        [
            [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8],
            [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8],
            [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8],
        ]
    )
    got = mrope_position_ids(ids, PADS, torch.tensor([[2, 3]]))
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


def test_text_image_and_two_frame_video_with_timestamps():
    ids = torch.tensor(
        [7, VS]
        + [IMG] * 4
        + [VE, 8, VS]
        + [FRAME, D0, DOT, D0]
        + [VID] * 2
        + [FRAME, D0, DOT, D5]
        + [VID] * 2
        + [VE, 9]
    )
    grids = torch.tensor([[2, 2], [1, 2], [1, 2]])
    expected = torch.tensor(
        [
            [0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 8, 9, 10, 11, 11, 13, 14, 15, 16, 17, 17, 19, 20],
            [0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 13, 14, 15, 16, 17, 17, 19, 20],
            [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
        ]
    )
    assert torch.equal(mrope_position_ids(ids, PADS, grids), expected)


def test_adjacent_blocks_without_text_are_split_by_grid():
    ids = torch.tensor([5] + [IMG] * 2 + [IMG] * 2 + [6])
    expected = torch.tensor(
        [
            [0, 1, 1, 3, 3, 5],
            [0, 1, 1, 3, 4, 5],
            [0, 1, 2, 3, 3, 5],
        ]
    )
    assert torch.equal(mrope_position_ids(ids, PADS, torch.tensor([[1, 2], [2, 1]])), expected)


def test_pad_count_mismatch_raises():
    ids = torch.tensor([1, VS] + [IMG] * 5 + [VE])
    with pytest.raises(ValueError, match="visual pad tokens"):
        mrope_position_ids(ids, PADS, torch.tensor([[2, 3]]))


def test_block_straddling_two_runs_raises():
    ids = torch.tensor([1] + [IMG] * 3 + [2] + [IMG] * 3)
    with pytest.raises(ValueError, match="does not fit"):
        mrope_position_ids(ids, PADS, torch.tensor([[2, 2], [1, 2]]))
