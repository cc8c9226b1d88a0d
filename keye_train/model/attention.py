"""The core-attention slot of every transformer layer (LM and ViT).

Megatron builds it from the layer spec; the DSA work plugs its sparse attention in here. Packed sequences
arrive as sbhd with batch 1 and `PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=...)`, so megatron
applies our M-RoPE positions unchanged and only this module reads the document boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from kernels.dense_attention import dense_varlen_attention
from keye_train.model.context_parallel import context_attention


@dataclass
class KeyePackedSeqParams(PackedSeqParams):
    """megatron's packed-sequence parameters plus the [3, T] M-RoPE position ids the indexer rotates with and the
    document lengths on the host (dense attention splits long and short documents without a device sync). Under
    context parallelism `context` is this rank's `data_pipeline.context_parallel.ContextShard`."""

    position_ids: torch.Tensor = None
    document_lengths: list = None
    # A rollout's KV-cache step (keye_train/posttrain/rollout/cache.py): when set, the core attention appends
    # this pack's keys and values to the cache and attends over it; None on every training path.
    kv_cache: object = None
    context: object = None  # context parallelism: this rank's ContextShard (model/context_parallel.py)


class VarlenCoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        cp_comm_type=None,
        softmax_scale: float | None = None,
        pg_collection=None,
        backend: str = "auto",
    ):
        super().__init__(config=config)
        self.layer_number = layer_number  # the rollout's KV cache is indexed by it
        self.causal = attn_mask_type == AttnMaskType.causal
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.backend = str(backend)  # kernels.dense_attention: auto, cudnn or flash on CUDA

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if getattr(packed_seq_params, "kv_cache", None) is not None:
            return packed_seq_params.kv_cache.attend(self.layer_number, query, key, value, self.scale)
        seq, batch, heads, dim = query.shape
        if getattr(packed_seq_params, "context", None) is not None:  # CP: local queries, K/V gathered over CP
            q, k, v = (x.reshape(seq, x.shape[2], dim) for x in (query, key, value))
            out = context_attention(q, k, v, packed_seq_params.context, self.scale, self.backend)
            return out.view(seq, 1, heads * dim)
        if packed_seq_params is not None:
            if batch != 1:
                raise ValueError(f"packed sequences need micro-batch size 1, got {batch}")
            cu, longest = packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q
            lengths = getattr(packed_seq_params, "document_lengths", None)
        else:  # one document per batch row
            cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device)
            longest, lengths = seq, [seq] * batch
        q, k, v = (x.transpose(0, 1).reshape(batch * seq, x.shape[2], dim) for x in (query, key, value))
        out = dense_varlen_attention(
            q, k, v, cu, causal=self.causal, scale=self.scale, max_seqlen=longest, lengths=lengths, backend=self.backend
        )
        return out.view(batch, seq, heads * dim).transpose(0, 1).contiguous()
