"""The split schedule (parallel.placement=split): the ViT + projector on ranks of their own, the LM on the rest.

ViT ranks encode their share of the step's micro-batches (parallel/placement.py `split_assignment`) ahead of the
LM and send each one's visual embeddings by p2p to every TP rank of its replica's first LM stage. The LM runs
megatron's schedule as in the colocated placement, with those embeddings standing in for the tower's output.
When the tower trains, the LM's TP rank 0 of stage 0 sends each embedding's gradient back after the step's
backward and the ViT rank back-propagates it into its own DDP buffers; the optimizers then clip by one norm
over both modules (training/optim.py `SharedNormOptimizer`).

Gradient scale: the objective scales each replica's loss by the LM's DP size D (megatron DDP averages over D),
and the ViT's DDP averages over its V ranks, so each returned gradient is multiplied by V / D.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from keye_train.model.keye_vl import visual_token_mask
from keye_train.training.schedules.colocated import ColocatedSchedule


def has_visual(batch) -> bool:
    return batch.visual is not None and batch.visual.num_frames > 0


class SplitLMSchedule(ColocatedSchedule):
    """An LM rank's side: the colocated schedule whose vision tower is the embeddings received from ViT ranks."""

    def __init__(self, model, tokens, placement, vision_trains: bool):
        super().__init__(model, tokens, placement)
        self.vision_trains = vision_trains

    def run(self, microbatches: list, objective, forward_only: bool = False) -> list[dict]:
        self.received: list[tuple[int, torch.Tensor]] = []
        self.numbered = iter(range(len(microbatches)))  # stage 0 embeds the micro-batches in order
        outputs = super().run(microbatches, objective, forward_only)
        if self.vision_trains and not forward_only and self.placement.is_first_stage():
            self._return_gradients()
        return outputs

    def vision_for(self, batch):
        """Stage 0: a stand-in for the tower that receives micro-batch m's embeddings from its ViT rank."""
        m = next(self.numbered)
        if not has_visual(batch):
            return None
        lm = unwrap_model(self.model.lm_chunk)
        rows = int(visual_token_mask(batch.input_ids, self.tokens).sum())
        embeds = torch.empty(rows, lm.config.hidden_size, dtype=lm.config.params_dtype, device=batch.input_ids.device)
        dist.recv(embeds, src=self.placement.sender(parallel_state.get_data_parallel_rank(), m), tag=m)
        embeds.requires_grad_(self.vision_trains)
        self.received.append((m, embeds))
        return lambda visual: embeds

    def _return_gradients(self) -> None:
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            return
        replica = parallel_state.get_data_parallel_rank()
        sends = []
        for m, embeds in self.received:
            grad = embeds.grad if embeds.grad is not None else torch.zeros_like(embeds)
            sends.append(dist.isend(grad.contiguous(), dst=self.placement.sender(replica, m), tag=m))
        for request in sends:
            request.wait()


class SplitVisionSchedule:
    """A ViT rank's side: encode this rank's micro-batches, send, and back-propagate the returned gradients."""

    def __init__(self, model, placement, vision_trains: bool):
        self.model, self.placement, self.vision_trains = model, placement, vision_trains

    def run(self, microbatches: list, objective, forward_only: bool = False) -> list[dict]:
        """microbatches: this rank's share, in `placement.my_work()` order."""
        work = self.placement.my_work()
        if len(work) != len(microbatches):
            raise ValueError(f"ViT rank holds {len(microbatches)} micro-batches for {len(work)} assigned items")
        trains = self.vision_trains and not forward_only
        encoded, sends = [], []
        with torch.set_grad_enabled(trains):
            for (replica, m), batch in zip(work, microbatches):
                if not has_visual(batch):
                    continue
                embeds = self.model.vision_chunk(batch.visual)
                payload = embeds.detach().contiguous()
                sends += [dist.isend(payload, dst=r, tag=m) for r in self.placement.receivers(replica)]
                encoded.append((replica, m, embeds))
        for request in sends:
            request.wait()
        if trains:
            scale = self.placement.vision_ranks / self.placement.dp
            for replica, m, embeds in encoded:
                grad = torch.empty_like(embeds)
                dist.recv(grad, src=self.placement.receivers(replica)[0], tag=m)
                torch.autograd.backward(embeds, grad * scale)
        return []
