"""Routing replay (R3): the routes recorded at rollout equal a full forward's; replaying them reproduces the
native forward, a forced route changes it, and clearing restores native routing."""

import torch

from data_pipeline.batch import PackedBatch
from keye_train.posttrain.rollout import ModelRoutes, RolloutEngine, SamplingParams, routes_for_pack, sample_batch
from tests.keye_train.posttrain.rollout.common import TOKENS, build_parts, full_logits, image_prompt, text_prompt


def test_recorded_routes_equal_a_full_forward_and_replay_restores_them(single_rank):
    model = single_rank
    parts = build_parts(model, seed=31)
    prompts = [text_prompt(9, 1), image_prompt([[2, 4]], seed=2), text_prompt(4, 3)]
    rollout = RolloutEngine(parts, model, TOKENS, slots=4, capacity=64, prefill_tokens=5, record_routes=True)
    samples = rollout.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=5, seed=1), group_size=2)
    layers, k = model.lm.num_layers, model.lm.moe_topk
    routes = ModelRoutes(parts.lm)
    for s in samples:
        batch = sample_batch(prompts[s.prompt], s, TOKENS)
        routes.record()
        native = full_logits(parts, batch)
        full = routes.recorded()
        recorded = routes_for_pack(s)
        assert recorded.shape == full.shape == (batch.seq_length, layers, k)
        assert torch.equal(recorded[:-1], full[:-1]) and (recorded[-1] == -1).all()
        routes.replay(recorded)  # the last token (-1) routes natively
        torch.testing.assert_close(full_logits(parts, batch), native, rtol=0, atol=1e-6)
        forced = torch.stack([torch.randperm(model.lm.num_experts)[:k] for _ in range(batch.seq_length * layers)])
        routes.replay(forced.view(batch.seq_length, layers, k))
        assert (full_logits(parts, batch) - native).abs().max() > 1e-3
        routes.replay(recorded)
        torch.testing.assert_close(full_logits(parts, batch), native, rtol=0, atol=1e-6)
        routes.clear()
        torch.testing.assert_close(full_logits(parts, batch), native, rtol=0, atol=1e-6)
    # a group's members share the prompt's recorded routes
    prompt_len = prompts[0].input_ids.numel()
    assert torch.equal(samples[0].routes[:prompt_len], samples[1].routes[:prompt_len])


def test_replay_holds_through_a_training_backward(single_rank):
    """In train mode with gradients the replayed routes are used and the router still gets a gradient."""
    from keye_train.model.keye_vl import embed_inputs, lm_token_losses

    model = single_rank
    parts = build_parts(model, seed=32)
    prompt = text_prompt(7, 4)
    rollout = RolloutEngine(parts, model, TOKENS, slots=1, capacity=32, record_routes=True)
    sample = rollout.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=4, seed=2))[0]
    batch = sample_batch(prompt, sample, TOKENS)
    routes = ModelRoutes(parts.lm)
    routes.replay(routes_for_pack(sample))
    parts.lm.train()
    embeds = embed_inputs(parts.lm, parts.vision, batch, TOKENS, sequence_parallel=False)
    loss = lm_token_losses(parts.lm, batch, embeds)
    (loss[0] * batch.loss_mask).sum().backward()
    router = routes.routers[0]
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert torch.equal(router.router_replay.target_topk_idx, routes_for_pack(sample)[:, 0])
    routes.clear()
    assert router.router_replay.target_topk_idx is None and router.router_replay.router_replay_action is None


def test_a_packed_micro_batch_replays_the_routes_of_its_samples(single_rank):
    """Two samples and a padding tail in one pack, as the trainer packs them: replay gives the native logits."""
    from keye_train.posttrain.rollout import Rollout, pack_routes

    model = single_rank
    parts = build_parts(model, seed=33)
    prompts = [text_prompt(6, 1), text_prompt(8, 2)]
    batch = Rollout(parts, model, TOKENS, slots=2, capacity=32, record_routes=True).generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=4, seed=3)
    )
    assert [len(t) for t in batch.tokens] == [4, 4] and batch.finish_reasons == ["length", "length"]
    docs = [sample_batch(p, s, TOKENS) for p, s in zip(prompts, batch.samples)]
    tail = 5  # the pack's padding document
    ids = torch.cat([d.input_ids for d in docs] + [torch.full((tail,), TOKENS.pad)])
    positions = torch.cat([d.position_ids for d in docs] + [torch.arange(tail).expand(3, tail)], dim=1)
    lengths = [d.seq_length for d in docs] + [tail]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pack = PackedBatch(ids, ids, torch.zeros(ids.numel()), positions, cu)
    routes = ModelRoutes(parts.lm)
    native = full_logits(parts, pack)
    routes.replay(pack_routes(batch.samples, pack.seq_length))
    torch.testing.assert_close(full_logits(parts, pack), native, rtol=0, atol=1e-6)
    rows = pack.seq_length * model.lm.num_layers
    forced = torch.stack([torch.randperm(model.lm.num_experts)[:2] for _ in range(rows)])
    routes.replay(forced.view(pack.seq_length, model.lm.num_layers, 2))
    assert (full_logits(parts, pack) - native).abs().max() > 1e-3
    routes.clear()
