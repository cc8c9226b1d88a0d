"""The normalisation shared by objectives whose loss is a mean over the global batch's responses (GSPO, MOPD).

The loss is the sum over the global batch's responses of a per-response value, divided by the number of responses
in the global batch (counted over DP in `begin_step`). megatron divides each micro-batch loss by the micro-batch
count and DDP averages over DP, so each micro-batch's sum is multiplied by (micro-batches * DP size / global
responses): the gradient is the same for any micro-batch split and DP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from keye_train.training.objectives import last_stage_value


class PerResponseObjective:
    summed: tuple[str, ...] = ()  # logged values summed over DP on the last stage; "pg_sum" is the loss's sum

    def __init__(self, placement, device):
        self.placement, self.device = placement, device
        self.num_seqs, self.tokens, self.scale = 0, 0, 1.0

    def count(self, microbatches: list, responses: float, tokens: float) -> int:
        """Collective: this rank's response and target-token counts -> the global ones; returns the token count
        (0 when the global batch has no response)."""
        counts = torch.tensor([responses, tokens], dtype=torch.float64, device=self.device)
        group = self.placement.data_parallel_group()
        dist.all_reduce(counts, group=group)
        self.num_seqs, self.tokens = int(counts[0].item()), int(counts[1].item())
        self.scale = len(microbatches) * dist.get_world_size(group) / max(self.num_seqs, 1)
        return self.tokens if self.num_seqs else 0

    def reduce(self, outputs: list[dict]) -> tuple[float, dict, float]:
        """Collective: (the step's loss on every rank, the DP-summed values on the last stage, this rank's pg sum)."""
        local = [sum(float(d[k]) for d in outputs) for k in self.summed]
        last = self.placement.is_last_stage()
        totals = dict(zip(self.summed, local))
        if last:
            reduced = torch.tensor(local, dtype=torch.float64, device=self.device)
            dist.all_reduce(reduced, group=self.placement.data_parallel_group())
            totals = dict(zip(self.summed, reduced.tolist()))
        loss = totals["pg_sum"] / max(self.num_seqs, 1) if last else float("nan")
        if self.placement.loss_elsewhere():
            loss = last_stage_value(loss, last, self.device)
        return loss, totals, local[self.summed.index("pg_sum")]
