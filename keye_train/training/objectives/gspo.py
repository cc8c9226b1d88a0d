"""The GSPO objective (keye_train/posttrain/gspo.py has the math) over packed RL micro-batches
(`posttrain.batch.RLBatch`).

The model's output on the last stage is the per-token cross-entropy of `labels`, so log pi_theta = -CE: the
trainer's log-probs are those of the raw logits (temperature 1); the rollout must sample at temperature 1 (or the
model must scale its logits) for pi_old and the rollout log-probs to be the same distribution.

Normalisation: the mean over the global batch's responses of their token-mean pg
(`objectives/per_response.py`).
"""

from __future__ import annotations

from functools import partial

import torch

from keye_train.posttrain.gspo import correction_weights, gspo_token_losses, seq_mean_token_mean_sum
from keye_train.training.objectives import StepLoss
from keye_train.training.objectives.per_response import PerResponseObjective

SUMMED = ("pg_sum", "seqs", "clipped", "ratio_sum", "tokens", "weight_sum")


def _loss(objective: GSPOObjective, batch, per_token_loss: torch.Tensor):
    for key in ("response_index", "advantages"):
        if getattr(batch, key, None) is None:
            raise ValueError(f"the GSPO objective needs RL batches with {key} (posttrain.batch.RLBatch)")
    rl = objective.rl
    logp = -per_token_loss.view(-1).to(torch.promote_types(per_token_loss.dtype, torch.float32))
    mask = batch.loss_mask.to(logp.dtype)
    old = batch.old_logp.to(logp.dtype) if batch.old_logp is not None else logp.detach()
    rollout = batch.rollout_logp.to(logp.dtype) if batch.rollout_logp is not None else None
    weights = correction_weights(old, rollout, str(rl.correction), rl.tis_cap, rl.icepop_low, rl.icepop_high)
    num_seqs = int(batch.advantages.numel())
    pg, stats = gspo_token_losses(
        logp, old, batch.advantages, batch.response_index, mask, rl.clip_ratio_low, rl.clip_ratio_high, weights
    )
    pg_sum = seq_mean_token_mean_sum(pg, mask, batch.response_index, num_seqs)
    counts = torch.zeros(num_seqs, dtype=torch.float64, device=mask.device)
    counts.index_add_(0, batch.response_index.clamp(min=0), mask.double())
    present = counts > 0
    logged = {
        "pg_sum": pg_sum.detach(),
        "seqs": present.sum().double(),
        "clipped": (stats["clipped"] & present).sum().double(),
        "ratio_sum": stats["log_ratio"].double().exp()[present].sum(),
        "tokens": mask.double().sum(),
        "weight_sum": (weights.double() * mask.double()).sum() if weights is not None else mask.double().sum(),
    }
    return pg_sum * objective.scale, logged


class GSPOObjective(PerResponseObjective):
    summed = SUMMED

    def __init__(self, placement, device, rl):
        """rl: the run's RLConfig (clip ratios, correction and its bounds)."""
        super().__init__(placement, device)
        self.rl = rl

    def begin_step(self, microbatches: list) -> int:
        responses = sum(b.num_responses() for b in microbatches)
        return self.count(microbatches, responses, sum(b.num_supervised() for b in microbatches))

    def loss_func(self, batch):
        return partial(_loss, self, batch)

    def end_step(self, outputs: list[dict]) -> StepLoss:
        loss, totals, local_pg = self.reduce(outputs)
        seqs, tokens = max(totals["seqs"], 1.0), max(totals["tokens"], 1.0)
        metrics = {
            "rl/responses": float(self.num_seqs),
            "rl/clip_fraction": totals["clipped"] / seqs,
            "rl/ratio_mean": totals["ratio_sum"] / seqs,
            "rl/correction_weight_mean": totals["weight_sum"] / tokens,
            "supervised_tokens": float(self.tokens),
        }
        return StepLoss(loss, local_pg, self.tokens, metrics)


def gspo_objective(cfg, placement, device) -> GSPOObjective:
    """An `objective_factory` for keye_train.train: GSPO with the run's `rl` section."""
    if cfg.parallel.cp > 1:
        raise ValueError(
            f"parallel.cp={cfg.parallel.cp}: the GSPO objective does not run under context parallelism yet (its "
            "per-response means would need every CP rank's slice of each response); use parallel.cp=1"
        )
    return GSPOObjective(placement, device, cfg.rl)
