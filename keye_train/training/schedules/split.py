"""The split schedule (parallel.placement=split): the ViT + projector on ranks of their own, the LM on the rest.

ViT ranks read no data; with parallel.vision.tp = T each block of T of them is one tensor-parallel ViT group. At
the start of each step the first LM stage of every replica deals its micro-batches with visual input over the ViT
groups serving it (parallel/placement.py `split_serving`) by the ViT's cost-model time (level 1 of
parallel/balance.py: LPT, within its bound), and its TP rank 0 sends every rank of each group the list of the
group's micro-batches, then their patches and supervised-token counts (`VisionFeed` is the ViT ranks' data
source). The ViT groups encode ahead of the LM and each group's first rank (its leader; the TP ranks' outputs are
equal) sends each embedding by p2p to every TP rank of the replica's first stage. The LM runs megatron's schedule
as in the colocated placement, with those embeddings standing in for the tower. When the tower trains, stage 0's
TP rank 0 sends each embedding's gradient back to every rank of its group after the step's backward, and they
back-propagate it into their own DDP buffers; the optimizers then clip by one norm over both modules
(training/optim.py `SharedNormOptimizer`). A frozen tower runs without autograd and gets nothing back.

Gradient scale: the objective scales each replica's loss by the LM's DP size D (megatron DDP averages over D),
and the ViT's DDP averages over its V groups, so each returned gradient is multiplied by V / D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from data_pipeline.batch import VisualInput
from keye_train.model.keye_vl import visual_token_mask
from keye_train.training.schedules.colocated import ColocatedSchedule
from parallel.balance import lpt
from parallel.costs import load_rates

_FEED_TAG = 1 << 20  # above every micro-batch index, so feed messages never match an embedding's


def has_visual(batch) -> bool:
    return batch.visual is not None and batch.visual.num_frames > 0


def visual_cost(batch, rates) -> float:
    """The ViT's cost-model seconds for a micro-batch's frames (0 without visual input)."""
    if not has_visual(batch):
        return 0.0
    return rates.vit.time([int(rows) * int(cols) for rows, cols in batch.visual.grids.tolist()])


def deal_visual(microbatches: list, ranks: list[int], rates) -> dict[int, int]:
    """Micro-batch index -> the rank of `ranks` that encodes it, for those with visual input (LPT by cost)."""
    visual = [m for m, batch in enumerate(microbatches) if has_visual(batch)]
    dealt = lpt([visual_cost(microbatches[m], rates) for m in visual], len(ranks))
    return {visual[i]: ranks[r] for r, items in enumerate(dealt) for i in items}


@dataclass
class VisionItem:
    """A ViT rank's view of one micro-batch: where it belongs, its patches and its supervised-token count."""

    replica: int
    index: int  # the micro-batch's index in its replica's step
    visual: VisualInput | None
    supervised: int

    def num_supervised(self) -> int:
        return self.supervised

    def to(self, device) -> VisionItem:
        if self.visual is None:
            return self
        visual = VisualInput(self.visual.patches.to(device), self.visual.grids.to(device))
        return VisionItem(self.replica, self.index, visual, self.supervised)


def _send_feed(microbatches: list, mine: list[int], rank: int, device) -> list:
    requests = [dist.isend(torch.tensor([len(mine)], device=device), dst=rank, tag=_FEED_TAG)]
    if mine:
        requests.append(dist.isend(torch.tensor(mine, device=device), dst=rank, tag=_FEED_TAG))
    for m in mine:
        batch, tag = microbatches[m], _FEED_TAG + 1 + m
        visual = batch.visual if has_visual(batch) else None
        patches, width = visual.patches.shape if visual is not None else (0, 0)
        frames = visual.num_frames if visual is not None else 0
        header = torch.tensor([patches, frames, width, batch.num_supervised()], device=device)
        requests.append(dist.isend(header, dst=rank, tag=tag))
        if visual is not None:
            requests.append(dist.isend(visual.patches.contiguous(), dst=rank, tag=tag))
            requests.append(dist.isend(visual.grids.to(torch.int64).contiguous(), dst=rank, tag=tag))
    return requests


def send_visual_inputs(placement, microbatches: list, encoder_of: dict[int, int]) -> list:
    """LM stage 0, TP rank 0: to every rank of each serving ViT group, the indices the group encodes, then per
    micro-batch a header [patches, frames, patch width, supervised] with its patches and grids. Micro-batches
    without visual input go to the first serving group (their supervised tokens count toward the step's total
    there). encoder_of: micro-batch -> its group's leader. Returns requests."""
    serving = placement.serving(parallel_state.get_data_parallel_rank())
    owner = {m: encoder_of.get(m, serving[0]) for m in range(len(microbatches))}
    requests, device = [], microbatches[0].input_ids.device
    for leader in serving:
        mine = [m for m in range(len(microbatches)) if owner[m] == leader]
        for rank in placement.vision_group(leader):
            requests += _send_feed(microbatches, mine, rank, device)
    return requests


class VisionFeed:
    """A ViT rank's data source: the micro-batches dealt to it, received from the LM's first stage."""

    def __init__(self, placement, device):
        self.placement, self.device = placement, device

    def _recv(self, shape, src: int, tag: int, dtype=torch.int64) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(out, src=src, tag=tag)
        return out

    def next_step(self) -> list:
        items = []
        for replica in self.placement.served_replicas():
            src = self.placement.receivers(replica)[0]
            count = int(self._recv(1, src, _FEED_TAG))
            for m in self._recv(count, src, _FEED_TAG).tolist() if count else []:
                tag = _FEED_TAG + 1 + m
                patches, frames, width, supervised = self._recv(4, src, tag).tolist()
                visual = None
                if frames:
                    visual = VisualInput(
                        self._recv((patches, width), src, tag, torch.float32), self._recv((frames, 2), src, tag)
                    )
                items.append(VisionItem(replica, m, visual, supervised))
        return items

    def counters(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}  # the LM ranks' loaders hold the data position

    def load_state_dict(self, state: dict) -> None:
        pass

    def load_regrouped_state(self, states: list[dict]) -> None:
        pass  # a resume from another layout: the LM ranks' loaders regroup the data position

    def close(self) -> None:
        pass


class SplitLMSchedule(ColocatedSchedule):
    """An LM rank's side: the colocated schedule whose vision tower is the embeddings received from ViT ranks."""

    def __init__(self, model, tokens, placement, vision_trains: bool):
        super().__init__(model, tokens, placement)
        self.vision_trains = vision_trains
        self.rates = load_rates()

    def run(self, microbatches: list, objective, forward_only: bool = False) -> list[dict]:
        feeding, self.received = [], []
        if self.placement.is_first_stage():
            replica = parallel_state.get_data_parallel_rank()
            self.encoder_of = deal_visual(microbatches, self.placement.serving(replica), self.rates)
            if parallel_state.get_tensor_model_parallel_rank() == 0:
                feeding = send_visual_inputs(self.placement, microbatches, self.encoder_of)
        self.numbered = iter(range(len(microbatches)))  # stage 0 embeds the micro-batches in order
        outputs = super().run(microbatches, objective, forward_only)
        for request in feeding:
            request.wait()
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
        dist.recv(embeds, src=self.encoder_of[m], tag=m)
        embeds.requires_grad_(self.vision_trains)
        self.received.append((m, embeds))
        return lambda visual: embeds

    def _return_gradients(self) -> None:
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            return
        sends = []
        for m, embeds in self.received:
            grad = embeds.grad if embeds.grad is not None else torch.zeros_like(embeds)
            group = self.placement.vision_group(self.encoder_of[m])
            sends += [dist.isend(grad.contiguous(), dst=rank, tag=m) for rank in group]
        for request in sends:
            request.wait()


class SplitVisionSchedule:
    """A ViT rank's side: encode the micro-batches dealt to it, send, and back-propagate the returned gradients."""

    def __init__(self, model, placement, vision_trains: bool):
        self.model, self.placement, self.vision_trains = model, placement, vision_trains

    def run(self, microbatches: list, objective, forward_only: bool = False) -> list[dict]:
        """microbatches: this rank's VisionItems of the step (VisionFeed)."""
        trains = self.vision_trains and not forward_only
        leads = dist.get_rank() == self.placement.vision_leader()  # a ViT group's TP ranks hold equal embeddings
        encoded, sends = [], []
        with torch.set_grad_enabled(trains):
            for item in microbatches:
                if not has_visual(item):
                    continue
                embeds = self.model.vision_chunk(item.visual)
                if leads:
                    payload = embeds.detach().contiguous()
                    receivers = self.placement.receivers(item.replica)
                    sends += [dist.isend(payload, dst=r, tag=item.index) for r in receivers]
                encoded.append((item, embeds))
        self.encoded = len(encoded)
        for request in sends:
            request.wait()
        if trains:
            scale = self.placement.vision_dp / self.placement.dp
            for item, embeds in encoded:
                grad = torch.empty_like(embeds)
                dist.recv(grad, src=self.placement.receivers(item.replica)[0], tag=item.index)
                torch.autograd.backward(embeds, grad * scale)
        return []
