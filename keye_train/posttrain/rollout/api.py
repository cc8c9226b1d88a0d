"""What the RL objective calls: `Rollout.generate` and the packs the trainer recomputes the samples on.

A rollout's samples become training sequences [prompt | response] with the loss mask on the response tokens;
`sample_batch` builds that pack as the data pipeline would (next-token labels, the prompt's M-RoPE ids and
patches, the response at the engine's decode positions), so the trainer's log-probs are computed on exactly the
rollout's tokens.
`routes_for_pack` lines up the recorded routes with such a pack for routing replay (R3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_pipeline.batch import PackedBatch, VisualInput
from data_pipeline.positions import mrope_position_ids
from data_pipeline.tokenizer import TokenIds
from keye_train.posttrain.rollout.engine import Prompt, RolloutEngine, Sample
from keye_train.posttrain.rollout.sampler import SamplingParams


@dataclass
class RolloutBatch:
    """samples: group_size per prompt, prompt-major; the per-sample fields as lists in the same order."""

    samples: list[Sample]
    group_size: int

    @property
    def tokens(self) -> list[torch.Tensor]:
        return [torch.tensor(s.tokens, dtype=torch.long) for s in self.samples]

    @property
    def logprobs(self) -> list[torch.Tensor]:
        return [torch.tensor(s.logprobs, dtype=torch.float32) for s in self.samples]

    @property
    def finish_reasons(self) -> list[str]:
        return [s.finish_reason for s in self.samples]

    @property
    def routes(self) -> list[torch.Tensor | None]:
        return [s.routes for s in self.samples]


class Rollout:
    """The policy's sampler for RL: the training model parts themselves (weights are shared, so an optimizer
    step is the weight handoff). One engine, and so one KV cache, is kept between calls."""

    def __init__(self, parts, model, tokens: TokenIds | None = None, **engine_options):
        self.engine = RolloutEngine(parts, model, tokens, **engine_options)

    @classmethod
    def from_config(cls, parts, model, rollout, tokens: TokenIds | None = None) -> Rollout:
        """From keye_train.config.rollout.RolloutConfig; `generate` then defaults to its sampling and G."""
        made = cls(
            parts,
            model,
            tokens,
            slots=rollout.slots,
            capacity=rollout.capacity,
            prefill_tokens=rollout.prefill_tokens,
            record_routes=rollout.record_routes,
            decode_graph=rollout.decode_graph,
            decode_ahead=rollout.decode_ahead,
        )
        made.default_params, made.default_group_size = SamplingParams.from_config(rollout.sampling), rollout.group_size
        return made

    default_params: SamplingParams | None = None
    default_group_size: int = 1

    def generate(
        self,
        prompts: list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        group_size: int | None = None,
    ) -> RolloutBatch:
        params = params if params is not None else self.default_params
        if params is None:
            raise ValueError("Rollout.generate needs sampling params (or a Rollout built from_config)")
        group_size = group_size if group_size is not None else self.default_group_size
        return RolloutBatch(self.engine.generate(prompts, params, group_size), group_size)

    def release(self) -> None:
        """Free the KV cache before a training phase."""
        self.engine.release()


def document_positions(prompt_ids: torch.Tensor, response_length: int, tokens: TokenIds, grids) -> torch.Tensor:
    """[3, L + R] M-RoPE ids of [prompt | response]: the prompt's from its layout, then the decode rule (the prompt's
    largest position + 1 + step) whatever the response ids are, as the engine fed them; a sampled visual pad id in
    the response is a text position, not a visual block."""
    prompt = mrope_position_ids(prompt_ids, (tokens.image_pad, tokens.video_pad), grids)
    start = int(prompt.max()) + 1 if prompt.numel() else 0
    return torch.cat([prompt, torch.arange(start, start + response_length).expand(3, -1)], dim=1)


def sample_batch(prompt: Prompt, sample: Sample, tokens: TokenIds | None = None) -> PackedBatch:
    """One [prompt | response] document as a PackedBatch: labels are the next tokens, the loss mask marks the
    positions whose next token is a response token (so log-prob i of the response sits at prompt_len - 1 + i)."""
    tokens = tokens or TokenIds()
    prompt_ids = prompt.input_ids.view(-1).long().cpu()
    ids = torch.cat([prompt_ids, torch.tensor(sample.tokens, dtype=torch.long)])
    length, first = int(ids.numel()), int(prompt_ids.numel())
    labels = torch.cat([ids[1:], torch.tensor([tokens.pad])])
    mask = torch.zeros(length)
    mask[first - 1 : length - 1] = 1.0
    visual = prompt.visual
    grids = torch.zeros(0, 2, dtype=torch.long)
    visual_mask = None
    if visual is not None and visual.num_frames > 0:
        grids = visual.grids // 2
        visual = VisualInput(visual.patches, visual.grids)
        visual_mask = torch.zeros(length, dtype=torch.bool)  # the prompt's pad rows: a sampled pad id is text
        visual_mask[:first] = (prompt_ids == tokens.image_pad) | (prompt_ids == tokens.video_pad)
    else:
        visual = None
    return PackedBatch(
        input_ids=ids,
        labels=labels,
        loss_mask=mask,
        position_ids=document_positions(prompt_ids, len(sample.tokens), tokens, grids),
        cu_seqlens=torch.tensor([0, length], dtype=torch.int32),
        visual=visual,
        visual_mask=visual_mask,
    )


def routes_for_pack(sample: Sample) -> torch.Tensor:
    """[prompt + response, layers, k] int64 for replaying `sample_batch(.., sample)`: the recorded routes, and
    -1 (route natively) for the last response token, which the rollout never fed forward."""
    if sample.routes is None:
        raise ValueError("the sample has no routes: build the engine with record_routes=True")
    routes = sample.routes.long()
    return torch.cat([routes, torch.full_like(routes[:1], -1)])


def pack_routes(samples: list[Sample], seq_length: int | None = None) -> torch.Tensor:
    """Routes for a pack of [prompt | response] documents in this order, padded with -1 (native routing) to
    `seq_length` rows (the pack's padding tail)."""
    routes = torch.cat([routes_for_pack(s) for s in samples])
    if seq_length is not None:
        if seq_length < routes.shape[0]:
            raise ValueError(f"{routes.shape[0]} routed tokens do not fit a pack of {seq_length}")
        tail = torch.full((seq_length - routes.shape[0], *routes.shape[1:]), -1, dtype=routes.dtype)
        routes = torch.cat([routes, tail])
    return routes
