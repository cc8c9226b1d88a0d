"""M-RoPE position ids of one sample (t, h, w): the data pipeline computes them for every pack.

Text tokens count up by one; a visual block of Hm x Wm merged tokens shares its temporal id and spreads
rows and columns, and the next token starts after the block's larger side.
"""

from __future__ import annotations

from typing import Iterable

import torch


def mrope_position_ids(
    input_ids: torch.Tensor,
    visual_token_ids: Iterable[int],
    merged_grids: torch.Tensor,
) -> torch.Tensor:
    """[3, L] int64 (t, h, w) position ids of one sample.

    input_ids: [L] token ids of one sample (positions start at 0).
    visual_token_ids: ids of the visual pad tokens (image_pad, video_pad).
    merged_grids: [F, 2] (rows, cols) in LM tokens of every visual block (image or video frame),
        in the order the blocks appear in the sequence.

    Text tokens get (n, n, n) with n = max position so far + 1. A visual block of Hm x Wm tokens gets
    (s, s + r, s + c) in raster order with s = n, and the next token starts at s + max(Hm, Wm).
    """
    input_ids = input_ids.reshape(-1)
    length = int(input_ids.shape[0])
    grids = merged_grids.reshape(-1, 2).to(torch.int64).cpu()
    block_sizes = (grids[:, 0] * grids[:, 1]).tolist()

    pad_ids = torch.tensor(sorted(set(int(v) for v in visual_token_ids)), dtype=input_ids.dtype)
    is_visual = torch.isin(input_ids.cpu(), pad_ids)
    num_visual = int(is_visual.sum())
    if num_visual != sum(block_sizes):
        raise ValueError(
            f"M-RoPE: {num_visual} visual pad tokens in the sequence but the grids {grids.tolist()} "
            f"give {sum(block_sizes)} merged tokens"
        )

    # Maximal runs of visual pad tokens as [start, end) pairs.
    change = torch.diff(
        is_visual.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8), append=torch.zeros(1, dtype=torch.int8)
    )
    run_starts = (change == 1).nonzero().flatten().tolist()
    run_ends = (change == -1).nonzero().flatten().tolist()

    positions = torch.empty(3, length, dtype=torch.int64)
    next_pos = 0
    cursor = 0  # first token not yet assigned
    block = 0
    for run_start, run_end in zip(run_starts, run_ends):
        num_text = run_start - cursor
        positions[:, cursor:run_start] = torch.arange(next_pos, next_pos + num_text)
        next_pos += num_text
        cursor = run_start
        while cursor < run_end:
            rows, cols = int(grids[block, 0]), int(grids[block, 1])
            size = rows * cols
            if cursor + size > run_end:
                raise ValueError(
                    f"M-RoPE: visual block {block} ({rows}x{cols} tokens) does not fit in the run of "
                    f"{run_end - run_start} visual pad tokens starting at index {run_start}"
                )
            local = torch.arange(size)
            positions[0, cursor : cursor + size] = next_pos
            positions[1, cursor : cursor + size] = next_pos + local // cols
            positions[2, cursor : cursor + size] = next_pos + local % cols
            next_pos += max(rows, cols)
            cursor += size
            block += 1
    positions[:, cursor:] = torch.arange(next_pos, next_pos + length - cursor)
    return positions.to(input_ids.device)
