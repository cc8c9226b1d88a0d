"""The RL data source on video prompts (the demo clips, tiny model, 1 rank, CPU), with routing replay and ContextRL
re-sampling on together: the re-sampled groups keep their clip in the report-conditioned context, the packs carry
the rollout's routes over the visual rows too and the pi_old recompute (ViT in the forward) replays them, and a
response in which the policy sampled a visual pad id trains as text."""

import pytest
import torch

from tests.helpers import ensure_test_data
from tests.keye_train.posttrain.rl_source import RoutingMaps, chosen, rl_overrides, rl_source

SEQ = 256  # the conditioned prompt (clip frames, question, failed answer, report turn) fits with room
G = 4


@pytest.fixture(scope="module")
def setup(single_rank):
    prompts = ensure_test_data() / "rl_clip_grounding.jsonl"
    overrides = rl_overrides(
        prompts,
        SEQ,
        f"rl.group_size={G}",
        "rl.prompts_per_step=1",
        "rl.oversample_factor=1",
        "rl.max_sampling_rounds=1",
        "rl.routing_replay=true",
        "rl.recovered_samples=conditioned",
        "rl.judge=tests.keye_train.posttrain.rl_train_worker:reporting_judge",
        "rl.positive_threshold=1.0",  # even_fraction: a group is all-negative unless a response is all even ids
        f"rollout.capacity={SEQ}",
    )
    cfg, tokenizer, model, _, source = rl_source(overrides)
    maps = RoutingMaps(model.parts.lm)
    packs = source.next_step()
    recompute = maps.take()[-len(packs) :]  # the pi_old recompute's forwards, one per pack
    yield cfg, tokenizer, source, packs, recompute
    source.close()


def visual_documents(packs, tokenizer):
    """(pack, recompute index, document length, re-sampled?) of every pack holding a clip and a response."""
    out = []
    for index, pack in enumerate(packs):
        if pack.visual is None or pack.loss_mask.sum() == 0:
            continue
        length = int(pack.cu_seqlens[1])
        out.append((pack, index, length, "reviewer" in tokenizer.decode(pack.input_ids[:length].tolist())))
    return out


def test_resampled_video_groups_keep_their_clip_and_replay_their_routes(setup):
    cfg, tokenizer, source, packs, recompute = setup
    last = source.last
    assert last["rl_groups_resampled"] >= 1 and last["rl_recovered_kept"] >= 1
    docs = visual_documents(packs, tokenizer)
    assert len(docs) == G  # one group of G responses, each its own pack with the clip's patches
    assert sum(resampled for *_, resampled in docs) == G * last["rl_recovered_kept"]
    experts = cfg.model.lm.num_experts
    for pack, index, length, _ in docs:
        layers = recompute[index].shape[1]
        mask = pack.loss_mask > 0
        # pi_old by the trainer (ViT in the forward, the conditioned context) against the engine's T=1 log-probs
        assert (pack.old_logp[mask] - pack.rollout_logp[mask]).abs().max() < 1e-4
        assert int(pack.visual_mask.sum()) == pack.visual.num_merged_tokens()
        assert pack.routes.shape == (SEQ, layers, cfg.model.lm.moe_topk)
        assert (pack.routes[: length - 1] >= 0).all() and (pack.routes[length - 1 :] == -1).all()
        fed = (pack.routes >= 0).all(-1).all(-1)
        assert fed[pack.visual_mask].all()  # the clip's rows too
        assert torch.equal(recompute[index][fed], chosen(pack.routes[fed], experts))


def test_a_sampled_visual_pad_id_in_a_video_response_is_a_text_row(setup):
    """The engine feeds a sampled video_pad id as text (its embedding row, decode positions); the trainer's forward
    must too: only the prompt's pad rows take the ViT's embeddings."""
    from keye_train.model.keye_vl import embed_inputs

    _, tokenizer, source, _, _ = setup
    record = next(p for p in source.prompts if p.prompt is not None)
    pad = tokenizer.ids.video_pad
    response = [11, pad, 12, tokenizer.ids.im_end]
    pack = source._visual_pack(record.prompt, response, [0.0] * len(response), 1.0)
    first = int(record.prompt.input_ids.numel())
    assert pack.input_ids[first + 1] == pad and not pack.visual_mask[first + 1]
    source._recompute_old_logp([pack])  # counting every pad id against the ViT's rows refuses this sequence
    assert torch.isfinite(pack.old_logp).all() and (pack.old_logp[pack.loss_mask > 0] < 0).all()
    lm, vision = source.model.parts.lm, source.model.parts.vision
    with torch.no_grad():
        embeds = embed_inputs(lm, vision, pack, tokenizer.ids, False)
        text = lm.embedding(input_ids=pack.input_ids.view(1, -1), position_ids=None)
        visual = vision(pack.visual)
    assert torch.equal(embeds[first + 1], text[first + 1])  # the response's pad id: its text embedding
    torch.testing.assert_close(embeds[pack.visual_mask, 0], visual.to(embeds.dtype), rtol=0, atol=0)
