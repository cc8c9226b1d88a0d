"""The MOPD objective inside the trainer's own schedule (megatron forward-backward, DDP) on the tiny model: the
step's loss and gradients equal the MOPD loss written out per response over the model's log-probs, for two
micro-batches with tool tokens; all-zero advantages (a teacher equal to the student) give zero gradients."""

import pytest
import torch

from keye_train.posttrain.batch import TextResponse
from keye_train.posttrain.mopd.batch import pack_mopd_responses
from keye_train.training.objectives.mopd import MOPDObjective
from tests.keye_train.posttrain.mopd.mopd_toy import configs

SEQ = 48


def model_logp(lm, tokens, batch):
    from keye_train.model.keye_vl import embed_inputs, lm_token_losses

    return -lm_token_losses(lm, batch, embed_inputs(lm.module, None, batch, tokens, False)).view(-1)


def reference_loss(logps, batches):
    terms = []
    for logp, batch in zip(logps, batches):
        keep = batch.loss_mask * batch.generated
        for r in range(int(batch.response_index.max()) + 1):
            at = (batch.response_index == r) & (keep > 0)
            if at.any():
                terms.append((-batch.token_advantages[at] * logp[at]).mean())
    return torch.stack(terms).sum() / len(terms)


@pytest.mark.parametrize("zero", [False, True])
def test_the_objective_in_the_schedule_gives_the_mopd_loss_and_gradient(single_rank, zero):
    from keye_train.config import ParallelConfig
    from keye_train.model.builder import build_model, initialize_weights
    from keye_train.training.optim import wrap_ddp
    from keye_train.training.schedules.colocated import ColocatedSchedule
    from keye_train.training.setup import TrainModel
    from parallel.placement import ColocatedPlacement

    model = single_rank
    model.lm.moe_aux_loss_coeff = 0.0  # megatron scales the aux loss itself; keep the comparison to MOPD alone
    placement = ColocatedPlacement()
    parts = build_model(model, ParallelConfig(), torch.float32, False, placement)
    initialize_weights(parts, model, seed=6)
    lm = wrap_ddp(parts.lm, distributed_optimizer=False)
    g = torch.Generator().manual_seed(3)
    lengths = [(3, 5), (2, 7), (4, 3), (1, 6), (5, 4), (2, 2)]

    def ids(n):
        return torch.randint(1, 200, (n,), generator=g).tolist()

    samples = [TextResponse(ids(p), ids(n), 0.0) for p, n in lengths]
    advs = [((0 if zero else 1) * torch.randn(n, generator=g)).tolist() for _, n in lengths]
    gens = [(torch.rand(n, generator=g) > 0.25).tolist() for _, n in lengths]
    batches = [
        pack_mopd_responses(samples[:3], advs[:3], SEQ, 0, gens[:3]),
        pack_mopd_responses(samples[3:], advs[3:], SEQ, 0, gens[3:]),
    ]
    mopd, rl = configs()
    objective = MOPDObjective(placement, torch.device("cpu"), mopd, rl)
    assert objective.begin_step(batches) == sum(int(sum(gen)) for gen in gens)
    lm.zero_grad_buffer()
    result = objective.end_step(
        ColocatedSchedule(TrainModel(parts, lm, None, None), model.tokens, placement).run(batches, objective)
    )
    ours = {name: p.main_grad.clone() for name, p in lm.module.named_parameters() if p.requires_grad}
    if zero:
        assert result.loss == 0.0 and all(grad.abs().max().item() == 0.0 for grad in ours.values())
        return
    lm.zero_grad_buffer()
    reference = reference_loss([model_logp(lm, model.tokens, b) for b in batches], batches)
    reference.backward()
    assert result.loss == pytest.approx(reference.item(), rel=1e-5)
    checked = 0
    for name, p in lm.module.named_parameters():
        if p.requires_grad and p.main_grad.abs().sum() > 0:
            torch.testing.assert_close(ours[name], p.main_grad, rtol=1e-4, atol=1e-7, msg=name)
            checked += 1
    assert checked > 10
