"""Encoded samples -> one `PackedBatch`: concatenated tokens, next-token labels, loss mask, per-sample M-RoPE
ids, document boundaries and the ViT patch list. The tail no sample fills is one padding document."""

from __future__ import annotations

import torch

from data_pipeline.batch import PackedBatch, VisualInput
from data_pipeline.encode import EncodedSample
from data_pipeline.positions import mrope_position_ids
from data_pipeline.tokenizer import TokenIds


def assemble_pack(samples: list[EncodedSample], seq_length: int, ids: TokenIds) -> PackedBatch:
    input_ids, labels, loss_mask, positions, doc_lengths = [], [], [], [], []
    visual_tokens = (ids.image_pad, ids.video_pad)
    for sample in samples:
        input_ids.append(sample.input_ids)
        labels.append(torch.cat([sample.input_ids[1:], torch.tensor([ids.pad])]))
        loss_mask.append(torch.cat([sample.supervised[1:], torch.tensor([False])]).float())
        positions.append(mrope_position_ids(sample.input_ids, visual_tokens, sample.merged_grids))
        doc_lengths.append(sample.length)
    tail = seq_length - sum(doc_lengths)
    if tail < 0:
        raise ValueError(f"{sum(doc_lengths)} tokens do not fit in a pack of {seq_length}")
    if tail > 0:
        input_ids.append(torch.full((tail,), ids.pad, dtype=torch.int64))
        labels.append(torch.full((tail,), ids.pad, dtype=torch.int64))
        loss_mask.append(torch.zeros(tail))
        positions.append(torch.arange(tail).expand(3, tail))
        doc_lengths.append(tail)
    with_pixels = [s for s in samples if s.num_patches]
    visual = None
    if with_pixels:
        visual = VisualInput(
            patches=torch.cat([s.patches for s in with_pixels]), grids=torch.cat([s.patch_grids for s in with_pixels])
        )
    return PackedBatch(
        input_ids=torch.cat(input_ids),
        labels=torch.cat(labels),
        loss_mask=torch.cat(loss_mask),
        position_ids=torch.cat(positions, dim=1).contiguous(),
        cu_seqlens=torch.tensor([0] + doc_lengths, dtype=torch.int64).cumsum(0).to(torch.int32),
        visual=visual,
        sample_ids=[s.key for s in samples],
    )
