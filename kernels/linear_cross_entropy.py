"""LM head + next-token cross-entropy over chunks of tokens, vocab-parallel, without the full logits.

loss[i] = logsumexp_v(h_i . w_v) - h_i . w_target(i), with the vocabulary split over a tensor-parallel group
(this rank holds rows [vocab_start, vocab_start + V_local) of the head). A target outside every rank's rows
(an ignore id) adds no target logit: its loss is the logsumexp and its gradient the softmax (megatron's
vocab-parallel CE has the same gradient there; its value is the logsumexp minus the row max).

Forward, per chunk of tokens: the chunk's logits (a GEMM in the operands' dtype, then fp32, as megatron's head
+ CE round them), their max, sum of exp and the target logit; after the last chunk one MAX and one SUM
all-reduce over the group give each token's max and sum of exp over the whole vocabulary, the only [tokens]
state kept besides the inputs. Backward recomputes each chunk's logits and forms the softmax as
exp(logit - max) / sum (megatron's rounding, more exact than exp(logit - logsumexp)), g = (softmax - one-hot)
x dloss in fp32, then dhidden = g @ W for the chunk's rows and dW += g^T @ h (summed in fp32 across chunks).
dhidden is this rank's share; the caller sums it over the group (megatron's sequence-parallel reduce-scatter
or TP all-reduce).
Peak extra memory is a few [chunk, V_local] fp32 buffers and an fp32 [V_local, H] accumulator, instead of the
[tokens, V_local] logits in bf16 and fp32. No megatron imports; the group is passed in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int = 0,
    group=None,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """hidden [N, H], weight [V_local, H] (this rank's vocab rows), target [N] global ids -> loss [N] in fp32
    (float64 for float64 inputs)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, H], [V, H]")
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target {tuple(target.shape)} needs one id per row of hidden {tuple(hidden.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    return _LinearCrossEntropy.apply(hidden, weight, target, vocab_start, group, chunk_tokens)


def _local_targets(target: torch.Tensor, vocab_start: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column in this rank's logits, whether this rank holds the target), with column 0 where it does not."""
    local = target - vocab_start
    held = (local >= 0) & (local < vocab_local)
    return torch.where(held, local, torch.zeros_like(local)), held


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or float64 for float64 inputs


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (hidden @ weight.t()).to(_stats_dtype(hidden.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_start, group, chunk_tokens):
        n, vocab_local = hidden.shape[0], weight.shape[0]
        column, held = _local_targets(target, vocab_start, vocab_local)
        stats_dtype = _stats_dtype(hidden.dtype)
        local_max = hidden.new_empty(n, dtype=stats_dtype)
        sum_exp = hidden.new_empty(n, dtype=stats_dtype)
        target_logit = hidden.new_empty(n, dtype=stats_dtype)
        for start in range(0, n, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, n))
            logits = _chunk_logits(hidden[rows], weight)
            target_logit[rows] = logits.gather(1, column[rows, None]).squeeze(1) * held[rows]
            local_max[rows] = logits.amax(dim=1)
            sum_exp[rows] = logits.sub_(local_max[rows, None]).exp_().sum(dim=1)
            del logits
        if group is None:
            row_max = local_max
        else:
            row_max = local_max.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            stats = torch.stack([sum_exp * (local_max - row_max).exp(), target_logit])
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            sum_exp, target_logit = stats[0], stats[1]
        ctx.save_for_backward(hidden, weight, column, held, row_max, sum_exp)
        ctx.chunk_tokens = chunk_tokens
        return row_max + sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, column, held, row_max, sum_exp = ctx.saved_tensors
        n, chunk = hidden.shape[0], ctx.chunk_tokens
        grad_loss = grad_loss.to(row_max.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=row_max.dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            probs = _chunk_logits(hidden[rows], weight).sub_(row_max[rows, None]).exp_()
            probs.div_(sum_exp[rows, None])  # the softmax over every rank's vocab rows
            index = torch.arange(probs.shape[0], device=probs.device)
            probs[index, column[rows]] -= held[rows].to(probs.dtype)
            grad_logits = probs.mul_(grad_loss[rows, None]).to(hidden.dtype)
            del probs
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                if grad_logits.dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad_logits.t(), hidden[rows])
                else:  # bf16/fp16 GEMM, summed over chunks in fp32
                    grad_weight.add_(grad_logits.t() @ hidden[rows])
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The unchunked, single-rank definition (full logits), for tests: targets outside the vocab add no logit."""
    logits = hidden @ weight.t()
    column, held = _local_targets(target, 0, weight.shape[0])
    return torch.logsumexp(logits, dim=1) - logits.gather(1, column[:, None]).squeeze(1) * held
