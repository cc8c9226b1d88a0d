"""The colocated schedule: the ViT runs on the LM's first pipeline stage inside that stage's forward step;
megatron's 1F1B schedule runs the micro-batches across stages when PP > 1, one forward-backward each otherwise.
Under context parallelism each rank first takes its slice of every micro-batch (data_pipeline/context_parallel.py)."""

from __future__ import annotations

from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from data_pipeline.context_parallel import slice_step
from keye_train.model.dsa import set_indexer_loss_scale
from keye_train.model.keye_vl import embed_inputs, lm_token_losses
from keye_train.posttrain.rollout.routing import micro_batch_replay
from parallel import context


class ColocatedSchedule:
    def __init__(self, model, tokens, placement):
        """model: the rank's wrapped chunks (training/setup.py TrainModel); tokens: the special token ids."""
        self.model, self.tokens, self.placement = model, tokens, placement
        self.sequence_parallel = unwrap_model(model.lm_chunk).config.sequence_parallel

    def run(self, microbatches: list, objective, forward_only: bool = False) -> list[dict]:
        set_indexer_loss_scale(unwrap_model(self.model.lm_chunk), 1.0 / len(microbatches))  # like megatron's aux
        if context.size() > 1:
            microbatches = self.context_slices(microbatches)
        with micro_batch_replay(unwrap_model(self.model.lm_chunk), microbatches) as replay:
            return self._run(microbatches, objective, forward_only, replay)

    def _run(self, microbatches: list, objective, forward_only: bool, replay) -> list[dict]:
        """replay(batch): routing replay (R3) of the micro-batch about to run forward (posttrain/rollout/routing.py)."""

        def forward_step(data_iterator, chunk):
            batch = next(data_iterator)
            replay(batch)
            lm = unwrap_model(chunk)
            decoder_input = (
                embed_inputs(lm, self.vision_for(batch), batch, self.tokens, self.sequence_parallel)
                if lm.pre_process
                else None
            )
            if decoder_input is not None and not decoder_input.requires_grad and not forward_only:
                # Stage 0 on a text-only pack: nothing upstream trains, but the backward must still run through
                # the LM, whose TP/EP collectives every rank of the group has to join.
                decoder_input = decoder_input.detach().requires_grad_()
            labels = not getattr(objective, "wants_logits", False)  # else the objective takes the logits
            return lm_token_losses(chunk, batch, decoder_input, labels=labels), objective.loss_func(batch)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[self.model.lm_chunk],
            num_microbatches=len(microbatches),
            seq_length=getattr(microbatches[0], "full_length", microbatches[0].seq_length),  # megatron divides by cp
            micro_batch_size=1,
            forward_only=forward_only,
        )

    def vision_for(self, batch):
        """The first stage's vision tower for this micro-batch (called once per micro-batch, in order)."""
        return self.model.vision_chunk

    def context_slices(self, microbatches: list) -> list:
        """This CP rank's slice of each micro-batch, all padded to one length that splits evenly over SP."""
        tp = unwrap_model(self.model.lm_chunk).config.tensor_model_parallel_size
        visual_ids = (self.tokens.image_pad, self.tokens.video_pad)
        align = tp if self.sequence_parallel else 1
        return slice_step(microbatches, context.size(), context.rank(), self.tokens.pad, visual_ids, align)
