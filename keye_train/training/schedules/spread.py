"""The spread schedule (parallel.placement=spread): every rank encodes a share of its LM replica's micro-batches.

The ranks of a replica (all its TP x PP ranks read the same packs) deal its micro-batches with visual input among
themselves by the ViT's cost-model time (level 1 of parallel/balance.py, LPT within its bound), encode their
share before the LM runs and send each one's embeddings to every TP rank of the replica's first stage (a rank of
that stage keeps its own). The LM then runs megatron's schedule as in the colocated placement with those
embeddings standing in for the tower. When the tower trains, stage 0's TP rank 0 sends each embedding's gradient
back to its encoder (a stage-0 encoder reads its own copy's), which back-propagates it into the replicated ViT's
DDP buffers; they reduce over the world, and one chained optimizer clips both modules by one norm.

Gradient scale: the objective scales each replica's loss by the LM's DP size D and the ViT's DDP averages over
all W ranks, so each returned gradient is multiplied by W / D.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from keye_train.model.keye_vl import visual_token_mask
from keye_train.training.schedules.colocated import ColocatedSchedule
from keye_train.training.schedules.split import deal_visual, has_visual
from parallel.costs import load_rates


class SpreadSchedule(ColocatedSchedule):
    def __init__(self, model, tokens, placement, vision_trains: bool):
        super().__init__(model, tokens, placement)
        self.vision_trains = vision_trains
        self.rates = load_rates()

    def run(self, microbatches: list, objective, forward_only: bool = False) -> list[dict]:
        self.trains = trains = self.vision_trains and not forward_only
        me, encoders, receivers = dist.get_rank(), self.placement.encoders(), self.placement.receivers()
        self.encoder_of = deal_visual(microbatches, encoders, self.rates)
        visual = sorted(self.encoder_of)
        self.kept: dict[int, torch.Tensor] = {}  # stage 0: the embeddings its LM consumes, by micro-batch
        encoded, sends = [], []
        with torch.set_grad_enabled(trains):
            for m in visual:
                if self.encoder_of[m] != me:
                    continue
                embeds = self.model.vision_chunk(microbatches[m].visual)
                payload = embeds.detach().contiguous()
                sends += [dist.isend(payload, dst=r, tag=m) for r in receivers if r != me]
                if me in receivers:
                    self.kept[m] = payload.clone().requires_grad_(trains)
                encoded.append((m, embeds))
        self.encoded = len(encoded)
        self.numbered = iter(range(len(microbatches)))  # stage 0 embeds the micro-batches in order
        outputs = super().run(microbatches, objective, forward_only)
        for request in sends:
            request.wait()
        if trains:
            self._return_gradients(receivers, me)
            scale = dist.get_world_size() / parallel_state.get_data_parallel_world_size()
            for m, embeds in encoded:
                if me in receivers:
                    grad = self._grad_of(m)
                else:
                    grad = torch.empty_like(embeds)
                    dist.recv(grad, src=receivers[0], tag=m)
                torch.autograd.backward(embeds, grad * scale)
        return outputs

    def vision_for(self, batch):
        """Stage 0: the micro-batch's embeddings, its own or received from the replica rank that encoded them."""
        m = next(self.numbered)
        if not has_visual(batch):
            return None
        if m not in self.kept:
            lm = unwrap_model(self.model.lm_chunk)
            rows = int(visual_token_mask(batch.input_ids, self.tokens).sum())
            embeds = torch.empty(
                rows, lm.config.hidden_size, dtype=lm.config.params_dtype, device=batch.input_ids.device
            )
            dist.recv(embeds, src=self.encoder_of[m], tag=m)
            self.kept[m] = embeds.requires_grad_(self.trains)
        embeds = self.kept[m]
        return lambda visual: embeds

    def _grad_of(self, m: int) -> torch.Tensor:
        grad = self.kept[m].grad
        return grad if grad is not None else torch.zeros_like(self.kept[m])

    def _return_gradients(self, receivers: list[int], me: int) -> None:
        if me != receivers[0]:
            return
        sends = [
            dist.isend(self._grad_of(m).contiguous(), dst=encoder, tag=m)
            for m, encoder in sorted(self.encoder_of.items())
            if encoder not in receivers
        ]
        for request in sends:
            request.wait()
