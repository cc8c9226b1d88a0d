"""The one place where the vision tower meets the LM: visual embeddings replace pad-token rows."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from data_pipeline.batch import PackedBatch
from keye_train.config import TokenIds


def visual_token_mask(input_ids: torch.Tensor, tokens: TokenIds) -> torch.Tensor:
    return (input_ids == tokens.image_pad) | (input_ids == tokens.video_pad)


def merge_visual_embeddings(text_embeds: torch.Tensor, visual_embeds: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """text_embeds [S, 1, H]; visual_embeds [N, H]; mask [S] bool with N true entries, in order."""
    count = int(mask.sum())
    if count != visual_embeds.shape[0]:
        raise ValueError(f"{count} visual pad tokens but the vision tower produced {visual_embeds.shape[0]} "
                         "embeddings; the pad count must equal the merged patch count")
    merged = text_embeds.clone()
    merged[mask.view(-1), 0] = visual_embeds.to(merged.dtype)
    return merged


def embed_inputs(lm, vision, batch: PackedBatch, tokens: TokenIds, sequence_parallel: bool) -> torch.Tensor:
    """Decoder input of the first LM pipeline stage: [S, 1, H], scattered over TP when SP is on."""
    embeds = lm.embedding(input_ids=batch.input_ids.view(1, -1), position_ids=None)
    if batch.visual is not None and batch.visual.num_frames > 0:
        embeds = merge_visual_embeddings(embeds, vision(batch.visual), visual_token_mask(batch.input_ids, tokens))
    if sequence_parallel:
        embeds = tensor_parallel.scatter_to_sequence_parallel_region(embeds)
    return embeds
