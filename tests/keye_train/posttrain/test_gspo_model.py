"""The GSPO objective inside the trainer's own schedule (megatron forward-backward, DDP) on the tiny model:
the step's loss and gradients equal the GSPO loss written out per response over the model's log-probs, for two
micro-batches of ragged responses."""

import pytest
import torch

from keye_train.posttrain.batch import TextResponse, pack_text_responses
from keye_train.posttrain.gspo import group_advantages
from keye_train.training.objectives.gspo import GSPOObjective
from tests.keye_train.posttrain.gspo_toy import rl_config

SEQ = 48


def model_logp(lm, tokens, batch):
    from keye_train.model.keye_vl import embed_inputs, lm_token_losses

    return -lm_token_losses(lm, batch, embed_inputs(lm.module, None, batch, tokens, False)).view(-1)


def reference_loss(logps, batches, rl):
    """(1/N) sum_i (1/|y_i|) sum_t max(-A s_it, -A clip(s_it)), response by response."""
    terms = []
    for logp, batch in zip(logps, batches):
        for r in range(batch.advantages.numel()):
            at = (batch.response_index == r) & (batch.loss_mask > 0)
            lp, old, a = logp[at], batch.old_logp[at], float(batch.advantages[r])
            s = torch.exp((lp - old).mean()).detach()
            s_t = s * torch.exp(lp - lp.detach())
            value = torch.maximum(-a * s_t, -a * s_t.clamp(1 - rl.clip_ratio_low, 1 + rl.clip_ratio_high))
            terms.append(value.mean())
    return torch.stack(terms).sum() / len(terms)


def test_the_objective_in_the_schedule_gives_the_gspo_loss_and_gradient(single_rank):
    from keye_train.config import ParallelConfig
    from keye_train.model.builder import build_model, initialize_weights
    from keye_train.training.optim import wrap_ddp
    from keye_train.training.schedules.colocated import ColocatedSchedule
    from keye_train.training.setup import TrainModel
    from parallel.placement import ColocatedPlacement

    model = single_rank
    model.lm.moe_aux_loss_coeff = 0.0  # megatron scales the aux loss itself; keep the comparison to GSPO alone
    placement = ColocatedPlacement()
    parts = build_model(model, ParallelConfig(), torch.float32, False, placement)
    initialize_weights(parts, model, seed=5)
    lm = wrap_ddp(parts.lm, distributed_optimizer=False)
    g = torch.Generator().manual_seed(2)
    vocab = 200  # ids below the special tokens of the tiny vocab
    lengths = [(3, 5), (2, 7), (4, 3), (1, 6), (5, 4), (2, 2), (3, 8), (6, 3)]
    advantages = group_advantages(torch.rand(8, generator=g), 4).float()

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    samples = [TextResponse(ids(p), ids(n), float(a)) for (p, n), a in zip(lengths, advantages)]
    batches = [pack_text_responses(samples[:3], SEQ, 0), pack_text_responses(samples[3:], SEQ, 0)]
    rl = rl_config(clip_ratio_low=0.002, clip_ratio_high=0.003)
    with torch.no_grad():  # pi_old: the current policy's log-probs, perturbed so that some responses clip
        for batch in batches:
            noise = 0.01 * torch.randn(SEQ, generator=g)
            batch.old_logp = (model_logp(lm, model.tokens, batch) + noise) * batch.loss_mask
    objective = GSPOObjective(placement, torch.device("cpu"), rl)
    assert objective.begin_step(batches) == sum(n for _, n in lengths)
    lm.zero_grad_buffer()
    train_model = TrainModel(parts, lm, None, None)
    result = objective.end_step(ColocatedSchedule(train_model, model.tokens, placement).run(batches, objective))
    ours = {name: p.main_grad.clone() for name, p in lm.module.named_parameters() if p.requires_grad}

    lm.zero_grad_buffer()
    reference = reference_loss([model_logp(lm, model.tokens, b) for b in batches], batches, rl)
    reference.backward()
    assert result.loss == pytest.approx(reference.item(), rel=1e-5)
    assert 0 < result.metrics["rl/clip_fraction"] < 1 and result.metrics["rl/responses"] == 8
    checked = 0
    for name, p in lm.module.named_parameters():
        if p.requires_grad and p.main_grad.abs().sum() > 0:
            torch.testing.assert_close(ours[name], p.main_grad, rtol=1e-4, atol=1e-7, msg=name)
            checked += 1
    assert checked > 10
