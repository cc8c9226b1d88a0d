"""Where the vision tower meets the LM (visual embeddings replace pad-token rows), and how a packed batch is fed
to the LM (megatron's packed-sequence parameters carry the document boundaries and the M-RoPE ids)."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from data_pipeline.batch import PackedBatch
from data_pipeline.tokenizer import TokenIds
from keye_train.model.attention import KeyePackedSeqParams


def visual_token_mask(input_ids: torch.Tensor, tokens: TokenIds) -> torch.Tensor:
    return (input_ids == tokens.image_pad) | (input_ids == tokens.video_pad)


def merge_visual_embeddings(text_embeds: torch.Tensor, visual_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """text_embeds [S, 1, H]; visual_embeds [N, H]; mask [S] bool with N true entries, in order."""
    count = int(mask.sum())
    if count != visual_embeds.shape[0]:
        raise ValueError(
            f"{count} visual pad tokens but the vision tower produced {visual_embeds.shape[0]} "
            "embeddings; the pad count must equal the merged patch count"
        )
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


def packed_params(batch: PackedBatch) -> KeyePackedSeqParams:
    cu = batch.cu_seqlens
    lengths = (cu[1:] - cu[:-1]).tolist()  # one host round trip per micro-batch, shared by every layer
    return KeyePackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
        position_ids=batch.position_ids.view(3, -1),
        document_lengths=lengths,
    )


def lm_token_losses(lm_chunk, batch: PackedBatch, decoder_input: torch.Tensor | None) -> torch.Tensor:
    """One LM pipeline chunk over a packed batch: the next-token cross-entropy per token on the last stage
    ([1, S]), the hidden states for the next stage elsewhere."""
    return lm_chunk(
        input_ids=batch.input_ids.view(1, -1),
        position_ids=batch.position_ids.view(3, 1, -1),
        attention_mask=None,
        decoder_input=decoder_input,
        labels=batch.labels.view(1, -1),
        packed_seq_params=packed_params(batch),
    )
