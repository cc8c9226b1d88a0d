"""sample_batch, the [prompt | response] document the trainer recomputes a rollout with: response positions follow
the engine's decode rule whatever ids were sampled."""

import torch

from data_pipeline.positions import mrope_position_ids
from data_pipeline.tokenizer import TokenIds
from keye_train.posttrain.rollout import Prompt, Sample, sample_batch

TOKENS = TokenIds()


def batch_of(prompt_ids, response):
    prompt = Prompt(torch.tensor(prompt_ids, dtype=torch.long))
    return sample_batch(prompt, Sample(0, 0, prompt.input_ids, tokens=list(response)), TOKENS)


def test_a_text_response_has_the_positions_of_the_whole_document():
    prompt, response = [1, 40, 41, 42, 2, 1, 43], [50, 51, 52, 2]
    batch = batch_of(prompt, response)
    ids = torch.tensor(prompt + response)
    assert torch.equal(
        batch.position_ids, mrope_position_ids(ids, (TOKENS.image_pad, TOKENS.video_pad), torch.zeros(0, 2))
    )
    assert batch.loss_mask[len(prompt) - 1 : -1].tolist() == [1.0] * len(response)


def test_a_sampled_visual_pad_id_in_the_response_is_a_text_position():
    """A policy can sample image_pad / video_pad; the engine fed it at the prompt's max position + 1 + step (a
    document-wide M-RoPE layout would count it as a visual block with no grid and refuse the sequence)."""
    prompt, response = [1, 40, 41, 2, 1, 43], [50, TOKENS.image_pad, 51, TOKENS.video_pad]
    batch = batch_of(prompt, response)
    n = len(prompt) + len(response)
    assert torch.equal(batch.position_ids, torch.arange(n).expand(3, -1))
    assert batch.input_ids.tolist() == prompt + response
