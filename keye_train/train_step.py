"""One optimizer step: micro-batches through megatron's schedule, gradient sync, clipping and update.

Loss = (sum of next-token cross-entropy over supervised tokens of the whole global batch) / (their count)
     + MoE aux loss (mean over micro-batches and DP ranks)
     + DSA: lambda * sum over layers of the mean per-token indexer KL (mean over micro-batches and DP ranks),
       which reaches only the indexers (keye_train.model.dsa).
megatron divides each micro-batch loss by the micro-batch count and DDP averages over DP, so each
micro-batch's summed CE is multiplied by (micro-batches * DP size / global supervised tokens).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from data_pipeline.batch import PackedBatch
from keye_train.model.dsa import KeyePackedSeqParams, set_indexer_loss_scale
from keye_train.model.keye_vl import embed_inputs


def packed_params(batch: PackedBatch) -> KeyePackedSeqParams:
    cu = batch.cu_seqlens
    longest = int((cu[1:] - cu[:-1]).max())
    return KeyePackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                               max_seqlen_kv=longest, position_ids=batch.position_ids.view(3, -1))


def next_token_loss(loss_mask: torch.Tensor, scale: float, per_token_loss: torch.Tensor):
    ce_sum = (per_token_loss.float().view(-1) * loss_mask).sum()
    return ce_sum * scale, {"ce_sum": ce_sum.detach()}


def global_supervised_tokens(microbatches, device) -> int:
    count = torch.tensor([sum(b.num_supervised() for b in microbatches)], dtype=torch.float64, device=device)
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return int(count.item())


def run_microbatches(lm_chunk, vision, microbatches, tokens, sequence_parallel: bool, device,
                     forward_only: bool = False) -> tuple[float, int]:
    """Forward (and backward) all micro-batches; return (summed CE on this DP rank's last stage, global tokens)."""
    n_global = global_supervised_tokens(microbatches, device)
    set_indexer_loss_scale(unwrap_model(lm_chunk), 1.0 / len(microbatches))  # like the schedule's MoE aux scale
    scale = len(microbatches) * parallel_state.get_data_parallel_world_size() / max(n_global, 1)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        lm = unwrap_model(model)
        decoder_input = embed_inputs(lm, vision, batch, tokens, sequence_parallel) if lm.pre_process else None
        if decoder_input is not None and not decoder_input.requires_grad and not forward_only:
            # Stage 0 on a text-only pack: nothing upstream trains, but the backward must still run through the
            # LM, whose TP/EP collectives every rank of the group has to join.
            decoder_input = decoder_input.detach().requires_grad_()
        output = model(input_ids=batch.input_ids.view(1, -1), position_ids=batch.position_ids.view(3, 1, -1),
                       attention_mask=None, decoder_input=decoder_input, labels=batch.labels.view(1, -1),
                       packed_seq_params=packed_params(batch))
        return output, partial(next_token_loss, batch.loss_mask, scale)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[lm_chunk],
        num_microbatches=len(microbatches),
        seq_length=microbatches[0].seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )
    ce_sum = sum(float(d["ce_sum"]) for d in losses) if losses else 0.0
    return ce_sum, n_global


def reduce_lm_loss(ce_sum: float, n_global: int, device) -> float:
    """Global mean CE per supervised token (valid on last-stage ranks)."""
    total = torch.tensor([ce_sum], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total.item()) / max(n_global, 1)


def optimizer_step(optimizer, ddp_chunks) -> tuple[bool, float]:
    if ddp_chunks:
        finalize_model_grads(ddp_chunks)
    updated, grad_norm, _ = optimizer.step()
    return bool(updated), float(grad_norm) if grad_norm is not None else float("nan")
