"""Routing replay (R3) in training, on the tiny MoE model (1 rank, CPU): the RL data source keeps each response's
rollout routes in its packs (packing order and padding), and the GSPO step's forward and the pi_old recompute
replay them per micro-batch. Checked on the routers' own outputs (their routing maps), not on the replay state."""

import dataclasses

import pytest
import torch

from tests.keye_train.posttrain.rl_source import RoutingMaps, chosen, rl_overrides, rl_source

SEQ = 128


@pytest.fixture(scope="module")
def setup(single_rank, tmp_path_factory):
    from data_pipeline.rl_demo import write_counting_prompts

    prompts = write_counting_prompts(tmp_path_factory.mktemp("r3") / "prompts.jsonl", count=8)
    overrides = rl_overrides(
        prompts,
        SEQ,
        "rl.group_size=4",
        "rl.prompts_per_step=1",
        "rl.routing_replay=true",
        "rollout.capacity=64",
        "optim.lr=0.05",
    )
    cfg, _, model, placement, source = rl_source(overrides, optimizer=True)
    maps = RoutingMaps(model.parts.lm)
    packs = source.next_step()
    recompute = maps.take()[-len(packs) :]  # the pi_old recompute's forwards, one per pack
    yield cfg, model, placement, source, packs, maps, recompute
    source.close()


def train_forward(cfg, model, placement, packs, forward_only=False):
    """The GSPO step's forward-backward (or forward) through the trainer's schedule; each pack's log pi."""
    from keye_train.training.objectives.gspo import GSPOObjective
    from keye_train.training.schedules.colocated import ColocatedSchedule

    logps = []

    class Recording(GSPOObjective):
        def loss_func(self, batch):
            inner = super().loss_func(batch)

            def loss(per_token_loss):
                logps.append(-per_token_loss.detach().view(-1).float())
                return inner(per_token_loss)

            return loss

    objective = Recording(placement, torch.device("cpu"), cfg.rl)
    model.zero_grad()
    assert objective.begin_step(packs) > 0
    objective.end_step(ColocatedSchedule(model, cfg.model.tokens, placement).run(packs, objective, forward_only))
    return logps


def replay_idle(model) -> bool:
    from keye_train.posttrain.rollout.routing import routers

    return all(
        r.router_replay.router_replay_action is None and r.router_replay.target_topk_idx is None
        for r in routers(model.parts.lm)
    )


def test_packs_carry_the_routes_in_packing_order_and_padding(setup):
    cfg, model, _, source, packs, _, _ = setup
    assert replay_idle(model)  # the rollout and the pi_old recompute left nothing behind
    layers, k = len(RoutingMaps(model.parts.lm).handles), cfg.model.lm.moe_topk
    responses = 0
    for pack in packs:
        assert pack.routes.shape == (SEQ, layers, k) and pack.routes.dtype == torch.int16
        bounds = pack.cu_seqlens.tolist()
        documents = [(a, b) for a, b in zip(bounds, bounds[1:]) if pack.loss_mask[a:b].sum() > 0]
        responses += len(documents)
        for a, b in documents:  # the last token of every document was never fed at rollout: native
            assert (pack.routes[a : b - 1] >= 0).all() and (pack.routes[b - 1] == -1).all()
        assert (pack.routes[documents[-1][1] :] == -1).all()  # the padding tail
    assert responses == 4 and max(p.advantages.numel() for p in packs) > 1


def test_without_a_weight_change_replayed_training_logprobs_equal_the_rollouts(setup):
    cfg, model, placement, source, packs, maps, recompute = setup
    # pi_old (replayed recompute) against the engine's T=1 log-probs, over the response tokens
    assert source.last["rl_logp_gap_sum"] / source.last["rl_response_tokens"] < 1e-5
    maps.take()
    logps = train_forward(cfg, model, placement, packs)
    forwards = maps.take()
    assert len(logps) == len(forwards) == len(packs)
    experts = cfg.model.lm.num_experts
    for pack, logp, used, old in zip(packs, logps, forwards, recompute):
        mask = pack.loss_mask > 0
        gap = (logp - pack.rollout_logp)[mask].abs()
        assert gap.mean() < 1e-5 and gap.max() < 1e-4
        fed = (pack.routes >= 0).all(-1).all(-1)
        assert torch.equal(used[fed], chosen(pack.routes[fed], experts))
        assert torch.equal(old[fed], chosen(pack.routes[fed], experts))
    assert replay_idle(model)


def test_after_an_optimizer_step_the_forward_replays_the_recorded_experts_and_then_clears(setup):
    from keye_train.training.optim import optimizer_step

    cfg, model, placement, _, packs, maps, _ = setup
    train_forward(cfg, model, placement, packs)
    updated, _ = optimizer_step(model.optimizer, model.ddp_chunks)  # Adam at lr 0.05 moves the routers
    assert updated
    natural_packs = [dataclasses.replace(p, routes=None) for p in packs]
    maps.take()
    natural = train_forward(cfg, model, placement, natural_packs, forward_only=True)
    natural_maps = maps.take()
    replayed = train_forward(cfg, model, placement, packs, forward_only=True)
    replayed_maps = maps.take()
    after = train_forward(cfg, model, placement, natural_packs, forward_only=True)
    after_maps = maps.take()
    experts, moved = cfg.model.lm.num_experts, 0
    for p, pack in enumerate(packs):
        fed = (pack.routes >= 0).all(-1).all(-1)
        recorded = chosen(pack.routes[fed], experts)
        assert torch.equal(replayed_maps[p][fed], recorded)  # exactly the rollout's experts
        moved += int((natural_maps[p][fed] != recorded).any(-1).sum())  # natural routing has moved on
        mask = pack.loss_mask > 0
        assert (replayed[p] - natural[p])[mask].abs().max() > 1e-4
        # nothing leaked: the next forward without routes routes as before the replay
        assert torch.equal(after_maps[p], natural_maps[p])
        torch.testing.assert_close(after[p], natural[p], rtol=0, atol=1e-6)
    assert moved > 0
    assert replay_idle(model)
