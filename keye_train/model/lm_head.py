"""The LM's GPTModel with the output layer + cross-entropy run chunked (model.lm.loss_impl=chunked).

megatron's GPTModel with labels forms the [s, b, V/tp] logits, casts them to fp32 and runs its vocab-parallel
cross-entropy: at 32K tokens x 151,936 that is about 20 GB of fp32 and 10 GB of bf16 logits. With labels,
`ChunkedLossGPTModel` instead hands the final hidden states and the output layer's weight shard to
`kernels.linear_cross_entropy`, which keeps only a logsumexp per token, and returns the same per-token loss
[b, s] (train_step masks and sums it as before). The output layer's input communication stays megatron's:
sequence-parallel all-gather (reduce-scatter of the gradient), or under TP without SP a copy whose gradient is
all-reduced. Without labels (logits wanted) it is megatron's path.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

from kernels.linear_cross_entropy import linear_cross_entropy


class ChunkedLossGPTModel(GPTModel):
    loss_chunk_tokens: int | None = None  # None: megatron's logits + cross-entropy

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        chunked = (
            self.loss_chunk_tokens is not None
            and labels is not None
            and self.post_process
            and self.config.mtp_num_layers is None
            and kwargs.get("inference_context") is None
        )
        if not chunked:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        return self.chunked_loss(hidden_states, labels)

    def chunked_loss(self, hidden_states, labels):
        """hidden_states [s(/tp under SP), b, h] after the final norm, labels [b, s] -> per-token loss [b, s]."""
        tp = self.pg_collection.tp
        tp_size = tp.size() if tp is not None else 1
        if self.config.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=tp)
        elif tp_size > 1:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp)
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else self.output_layer.weight
        )
        s, b, h = hidden_states.shape
        loss = linear_cross_entropy(
            hidden_states.reshape(s * b, h),
            weight,
            labels.t().reshape(s * b),
            vocab_start=(tp.rank() if tp_size > 1 else 0) * weight.shape[0],
            group=tp if tp_size > 1 else None,
            chunk_tokens=self.loss_chunk_tokens,
        )
        return loss.view(s, b).t().contiguous()
