"""Next-token cross-entropy over supervised tokens (the batch's loss mask: all text for pretraining kinds, the
assistant turns for chat and grounding), averaged over the whole global batch.

Loss = (sum of CE over the supervised tokens of the global batch) / (their count)
     + MoE aux loss (added inside megatron's router, mean over micro-batches and DP ranks)
     + DSA: lambda * sum over layers of the mean per-token indexer KL, which reaches only the indexers.
megatron divides each micro-batch loss by the micro-batch count and DDP averages over DP, so each
micro-batch's summed CE is multiplied by (micro-batches * DP size / global supervised tokens).
Under context parallelism `begin_step` still sees whole packs (each CP rank of a DP replica the same ones), so
their DP sum is the global count; each CP rank's loss is the CE sum of its slice, megatron multiplies it by the CP
size and DDP averages over DP x CP, which leaves the same scale; the step's loss sums the slices over DP x CP.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from keye_train.training.objectives import StepLoss, last_stage_value


def masked_ce_sum(loss_mask: torch.Tensor, scale: float, per_token_loss: torch.Tensor):
    ce_sum = (per_token_loss.float().view(-1) * loss_mask).sum()
    return ce_sum * scale, {"ce_sum": ce_sum.detach()}


class NextTokenObjective:
    def __init__(self, placement, device):
        self.placement, self.device = placement, device
        self.supervised_tokens, self.scale = 0, 1.0

    def begin_step(self, microbatches: list) -> int:
        count = torch.tensor([sum(b.num_supervised() for b in microbatches)], dtype=torch.float64, device=self.device)
        group = self.placement.data_parallel_group()
        dist.all_reduce(count, group=group)
        self.supervised_tokens = int(count.item())
        self.scale = len(microbatches) * dist.get_world_size(group) / max(self.supervised_tokens, 1)
        return self.supervised_tokens

    def loss_func(self, batch):
        return partial(masked_ce_sum, batch.loss_mask, self.scale)

    def end_step(self, outputs: list[dict]) -> StepLoss:
        ce_sum = sum(float(d["ce_sum"]) for d in outputs) if outputs else 0.0
        last = self.placement.is_last_stage()
        loss = self._global_mean(ce_sum) if last else float("nan")
        if self.placement.loss_elsewhere():  # only the last stage has it; every rank judges the step alike
            loss = last_stage_value(loss, last, self.device)
        return StepLoss(loss, ce_sum, self.supervised_tokens, {"supervised_tokens": float(self.supervised_tokens)})

    def _global_mean(self, ce_sum: float) -> float:
        total = torch.tensor([ce_sum], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.placement.data_context_parallel_group())  # every slice of every pack
        return float(total.item()) / max(self.supervised_tokens, 1)
