"""Where the vision tower meets the LM (visual embeddings replace pad-token rows), and how a packed batch is fed
to the LM (megatron's packed-sequence parameters carry the document boundaries and the M-RoPE ids). Under context
parallelism the batch is this rank's slice (`data_pipeline.context_parallel.ContextSlicedBatch`): the ViT runs on
the whole pack and the slice keeps its rows of the output; the attention slot reads the slice's shard."""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

from data_pipeline.batch import PackedBatch
from data_pipeline.tokenizer import TokenIds
from keye_train.model.attention import KeyePackedSeqParams
from parallel import context


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
        visual = vision(batch.visual)
        if getattr(batch, "shard", None) is not None:  # CP: the ViT ran on the whole pack; keep this slice's rows
            visual = visual.index_select(0, batch.shard.visual_rows)
        mask = batch.visual_mask if batch.visual_mask is not None else visual_token_mask(batch.input_ids, tokens)
        embeds = merge_visual_embeddings(embeds, visual, mask)
    if sequence_parallel:
        embeds = tensor_parallel.scatter_to_sequence_parallel_region(embeds)
    return embeds


def packed_params(batch: PackedBatch) -> KeyePackedSeqParams:
    cu = batch.cu_seqlens
    lengths = (cu[1:] - cu[:-1]).tolist()  # one host round trip per micro-batch, shared by every layer
    shard = getattr(batch, "shard", None)
    return KeyePackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
        position_ids=batch.position_ids.view(3, -1),
        document_lengths=lengths,
        context=shard,
        cp_group=context.alone_group() if shard is not None else None,  # M-RoPE ids arrive sliced already
    )


def cp_padding_mask(batch: PackedBatch, sequence_parallel: bool) -> torch.Tensor | None:
    """[1, n (/ tp under SP)] bool, True on the rows padded for CP: megatron leaves them out of MoE routing
    statistics (the aux loss); None without CP."""
    shard = getattr(batch, "shard", None)
    if shard is None:
        return None
    pad = shard.pad.view(1, -1)
    if sequence_parallel:
        tp, rank = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(),
        )
        size = pad.shape[1] // tp
        pad = pad[:, rank * size : (rank + 1) * size]
    return pad.contiguous()


def lm_token_losses(lm_chunk, batch: PackedBatch, decoder_input: torch.Tensor | None, labels: bool = True):
    """One LM pipeline chunk over a packed batch: the next-token cross-entropy per token on the last stage
    ([1, S]; with labels=False the logits [1, S, V/TP]), the hidden states for the next stage elsewhere."""
    padding = cp_padding_mask(batch, lm_chunk.config.sequence_parallel)
    extra = {"padding_mask": padding} if padding is not None else {}
    return lm_chunk(
        input_ids=batch.input_ids.view(1, -1),
        position_ids=batch.position_ids.view(3, 1, -1),
        attention_mask=None,
        decoder_input=decoder_input,
        labels=batch.labels.view(1, -1) if labels else None,
        packed_seq_params=packed_params(batch),
        **extra,
    )
