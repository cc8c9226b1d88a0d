"""Shared pieces of the rollout tests: the tiny model's parts and the training-path reference forward."""

import dataclasses

import torch

from data_pipeline.batch import VisualInput
from data_pipeline.tokenizer import TokenIds
from keye_train.config import ParallelConfig

TOKENS = TokenIds()
PATCH = 3 * 14 * 14


def build_parts(model, seed=11):
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    parts = build_model(model, ParallelConfig(), torch.float32, False, ColocatedPlacement())
    initialize_weights(parts, model, seed=seed)
    return parts


def with_dsa(model, mode, **dsa):
    model = dataclasses.replace(model, lm=dataclasses.replace(model.lm))
    model.lm.dsa = dataclasses.replace(model.lm.dsa, mode=mode, **dsa)
    return model


def text_prompt(length, seed):
    from keye_train.posttrain.rollout import Prompt

    g = torch.Generator().manual_seed(seed)
    return Prompt(torch.randint(0, 2000, (length,), generator=g))


def image_prompt(grids, seed, before=3, after=4):
    """Text, <|vision_start|>, one block of image pads per picture, <|vision_end|>, text."""
    from keye_train.posttrain.rollout import Prompt

    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor(grids)
    ids = [*torch.randint(0, 2000, (before,), generator=g).tolist()]
    for rows, cols in grids.tolist():
        ids += [TOKENS.vision_start] + [TOKENS.image_pad] * (rows * cols // 4) + [TOKENS.vision_end]
    ids += torch.randint(0, 2000, (after,), generator=g).tolist()
    patches = torch.randn(int(grids.prod(1).sum()), PATCH, generator=g)
    return Prompt(torch.tensor(ids), VisualInput(patches, grids))


def video_prompt(frames, grid, seed):
    """<|vision_start|>, per frame <|frame|> + two 'timestamp' tokens + its video pads, <|vision_end|>, text."""
    from keye_train.posttrain.rollout import Prompt

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2000, (2,), generator=g).tolist() + [TOKENS.vision_start]
    for f in range(frames):
        ids += [TOKENS.frame, 15 + f, 13] + [TOKENS.video_pad] * (grid[0] * grid[1] // 4)
    ids += [TOKENS.vision_end] + torch.randint(0, 2000, (5,), generator=g).tolist()
    grids = torch.tensor([grid] * frames)
    patches = torch.randn(int(grids.prod(1).sum()), PATCH, generator=g)
    return Prompt(torch.tensor(ids), VisualInput(patches, grids))


def full_logits(parts, batch) -> torch.Tensor:
    """[S, V] logits of one packed batch through the training forward (embed_inputs + the GPTModel), no cache."""
    from keye_train.model.keye_vl import embed_inputs, lm_token_losses

    with torch.no_grad():
        embeds = embed_inputs(parts.lm, parts.vision, batch, TOKENS, sequence_parallel=False)
        logits = lm_token_losses(parts.lm, batch, embeds, labels=False)
    return logits[0].float()


def response_logits(parts, prompt, sample) -> torch.Tensor:
    """[n, V]: the uncached logits that predicted each of the sample's n response tokens."""
    from keye_train.posttrain.rollout import sample_batch

    first = int(prompt.input_ids.numel())
    logits = full_logits(parts, sample_batch(prompt, sample, TOKENS))
    return logits[first - 1 : first - 1 + len(sample.tokens)]


def assert_matches_full_forward(parts, prompts, samples, group_size=1, greedy=True):
    assert len(samples) == len(prompts) * group_size
    for sample in samples:
        prompt = prompts[sample.prompt]
        reference = response_logits(parts, prompt, sample)
        cached = torch.stack(sample.logits)
        torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)
        if greedy:
            assert sample.tokens == reference.argmax(-1).tolist()
