"""The MOPD objective (training_recipe.md §7 step 7) over packed micro-batches (`posttrain.mopd.batch.MOPDBatch`):

    L = -(1 / #responses of the global batch) sum_i (1/|M_i|) sum_{t in M_i} w_t (A^_t + alpha A_i) log pi(y_t)

A^_t is the shaped teacher advantage, a constant (computed under no_grad before the step), so the gradient flows
only through the sampled token's log-prob. M_i is the response's generated tokens (tool / environment tokens
excluded). A_i is the response's outcome advantage (alpha = mopd.outcome_weight, 0: off), w_t the optional TIS /
IcePop weight of pi_old over the rollout engine (rl.correction).

Normalisation is GSPO's (objectives/gspo.py): each micro-batch sum is multiplied by (micro-batches * DP size /
global responses), so the gradient is that of the global mean for any micro-batch split and DP size.

A caveat of the loss as KEYE writes it: in the support-set modes (overlap, student_only, teacher_on_student) A_t
depends only on the state s_t, not on the sampled y_t, so E_y[A_t grad log pi(y_t | s_t)] = 0: at its own token the
term is zero-mean noise for the distribution at s_t (tests/keye_train/posttrain/mopd/test_objective.py enumerates
the expectation). The sampled-token mode (MiMo k1) depends on y_t and is an unbiased reverse-KL gradient.

So the support-set modes train with the support form (mopd.loss=auto picks it; mopd.loss=sampled keeps KEYE's):

    L_t = gamma_t * -sum_{v in Omega_t} sg[pibar_S(v) (log pi_T(v) - log pi_S(v))] log pi_S(v)

(`posttrain.mopd.advantage.support_surrogate`), plus the sampled-token terms (repetition penalty, outcome). It is
the sampled-token gradient taken in expectation over Omega under pibar_S: its weights sum to A_t, it is exactly 0
when the student equals the teacher, and with Omega = the whole vocab its gradient is grad KL(pi_S || pi_T). On the
toy, 30 Adam steps lower the full reverse KL 3.06 -> 2.18 (overlap), -> 0.72 (student_only, teacher_on_student).
We do not use the differentiated -A_t (`support_kl_loss`): pibar is renormalised on Omega, so at S = T its
gradient is d log(pi_S(Omega)), not 0, and it raised the reverse KL on the same toy (3.06 -> 4.75 overlap).
The support form needs the student's logits in the loss: the objective sets `wants_logits`, the schedule then
returns [1, S, V] logits and the loss takes the log-softmax itself (tp = 1, root config check).
"""

from __future__ import annotations

from functools import partial

import torch

from keye_train.posttrain.gspo import correction_weights, seq_mean_token_mean_sum, token_counts
from keye_train.posttrain.mopd.advantage import support_surrogate
from keye_train.training.objectives import StepLoss
from keye_train.training.objectives.per_response import PerResponseObjective

SUMMED = ("pg_sum", "seqs", "tokens", "adv_sum", "adv_sq_sum", "weight_sum")


def loss_mask(batch) -> torch.Tensor:
    mask = batch.loss_mask.float()
    generated = getattr(batch, "generated", None)
    return mask * generated.to(mask.dtype) if generated is not None else mask


def _loss(objective: MOPDObjective, batch, per_token_loss: torch.Tensor):
    for key in ("response_index", "token_advantages"):
        if getattr(batch, key, None) is None:
            raise ValueError(f"the MOPD objective needs batches with {key} (posttrain.mopd.batch.MOPDBatch)")
    rl, alpha = objective.rl, float(objective.mopd.outcome_weight)
    support = None
    if objective.wants_logits:  # the support-KL form: the model gave [1, S, V] logits
        logits = per_token_loss.reshape(-1, per_token_loss.shape[-1])
        all_logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
        logp = all_logp.gather(-1, batch.labels.view(-1, 1).long())[:, 0]
        if batch.support_ids is None:
            raise ValueError("the support-KL MOPD loss needs batches with support_ids (mopd.loss)")
        support = support_surrogate(all_logp, batch.support_ids, batch.support_teacher_logp)
        support = support * batch.support_weights.to(support.dtype)
    else:
        logp = -per_token_loss.view(-1).to(torch.promote_types(per_token_loss.dtype, torch.float32))
    mask = loss_mask(batch).to(logp.dtype)
    index = batch.response_index.clamp(min=0)
    advantage = batch.token_advantages.to(logp.dtype)
    if alpha:
        if batch.advantages is None:
            raise ValueError("mopd.outcome_weight > 0 needs the batch's outcome advantages")
        advantage = advantage + alpha * batch.advantages.to(logp.dtype)[index]
    advantage = advantage.detach() * mask
    old = batch.old_logp.to(logp.dtype) if batch.old_logp is not None else logp.detach()
    rollout = batch.rollout_logp.to(logp.dtype) if batch.rollout_logp is not None else None
    weights = correction_weights(old, rollout, str(rl.correction), rl.tis_cap, rl.icepop_low, rl.icepop_high)
    pg = -advantage * logp
    if support is not None:
        pg = pg + support * mask
    if weights is not None:
        pg = pg * weights.to(pg.dtype)
    num_seqs = int(batch.response_index.max().item()) + 1 if (batch.response_index >= 0).any() else 1  # a pad pack
    pg_sum = seq_mean_token_mean_sum(pg * mask, mask, batch.response_index, num_seqs)
    present = token_counts(mask, batch.response_index, num_seqs) > 0
    adv = advantage.detach().double()
    logged = {
        "pg_sum": pg_sum.detach(),
        "seqs": present.sum().double(),
        "tokens": mask.double().sum(),
        "adv_sum": adv.sum(),
        "adv_sq_sum": (adv * adv).sum(),
        "weight_sum": (weights.double() * mask.double()).sum() if weights is not None else mask.double().sum(),
    }
    return pg_sum * objective.scale, logged


def num_responses(batch) -> int:
    """Responses with at least one generated supervised token (the sequences the loss averages over)."""
    if batch.response_index is None:
        raise ValueError("a MOPD batch needs response_index")
    mask = loss_mask(batch).double().cpu()
    size = int(batch.response_index.max().item()) + 1 if (batch.response_index >= 0).any() else 0
    counts = torch.zeros(max(size, 1), dtype=torch.float64)
    counts.index_add_(0, batch.response_index.clamp(min=0).cpu(), mask)
    return int((counts > 0).sum().item())


class MOPDObjective(PerResponseObjective):
    summed = SUMMED

    def __init__(self, placement, device, mopd, rl):
        """mopd: the run's MOPDConfig (outcome_weight); rl: its RLConfig (the correction and its bounds)."""
        super().__init__(placement, device)
        self.mopd, self.rl = mopd, rl
        self.wants_logits = bool(getattr(mopd, "on_support", False))  # the schedule hands over the logits

    def begin_step(self, microbatches: list) -> int:
        responses = sum(num_responses(b) for b in microbatches)
        return self.count(microbatches, responses, sum(float(loss_mask(b).sum()) for b in microbatches))

    def loss_func(self, batch):
        return partial(_loss, self, batch)

    def end_step(self, outputs: list[dict]) -> StepLoss:
        loss, totals, local_pg = self.reduce(outputs)
        tokens = max(totals["tokens"], 1.0)
        mean = totals["adv_sum"] / tokens
        metrics = {
            "mopd/responses": float(self.num_seqs),
            "mopd/advantage_mean": mean,
            "mopd/advantage_std": max(totals["adv_sq_sum"] / tokens - mean * mean, 0.0) ** 0.5,
            "mopd/correction_weight_mean": totals["weight_sum"] / tokens,
            "supervised_tokens": float(self.tokens),
        }
        return StepLoss(loss, local_pg, self.tokens, metrics)


def mopd_objective(cfg, placement, device) -> MOPDObjective:
    """An `objective_factory` for keye_train.train: MOPD with the run's `mopd` and `rl` sections."""
    return MOPDObjective(placement, device, cfg.mopd, cfg.rl)
