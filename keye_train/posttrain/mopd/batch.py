"""The packed micro-batch of a MOPD step: an `RLBatch` plus, per label position, the shaped token advantage
A^_t (category-scaled, repetition-penalised; 0 for a sample SPRR masked) and which tokens the policy generated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from keye_train.posttrain.batch import RLBatch, TextResponse, pack_text_responses


@dataclass
class MOPDBatch(RLBatch):
    """token_advantages: [S] float32 A^_t at each response label position (0 elsewhere); with the support-KL
    loss form, only the terms on the sampled token (the repetition penalty).
    generated: [S] float32 1 where the policy sampled the label, 0 at tool / environment tokens inside a response
    (None: every response token was generated). `advantages` [R] is the outcome advantage (used with
    mopd.outcome_weight > 0)."""

    token_advantages: torch.Tensor | None = None
    generated: torch.Tensor | None = None
    # the support-KL loss form (mopd.loss): [S, k] Omega ids (-1 outside), [S, k] log pi_T there, [S] gamma_t
    support_ids: torch.Tensor | None = None
    support_teacher_logp: torch.Tensor | None = None
    support_weights: torch.Tensor | None = None


def pack_mopd_responses(
    samples: Sequence[TextResponse],
    token_advantages: Sequence[Sequence[float]],
    seq_length: int,
    pad_id: int,
    generated: Sequence[Sequence[bool]] | None = None,
) -> MOPDBatch:
    """`pack_text_responses` with each response's token advantages (and generated flags) at its label positions."""
    base = pack_text_responses(samples, seq_length, pad_id)
    adv = torch.zeros(seq_length, dtype=torch.float32)
    gen = torch.zeros(seq_length, dtype=torch.float32) if generated is not None else None
    for r, sample in enumerate(samples):
        at = (base.response_index == r).nonzero()[:, 0]
        if len(token_advantages[r]) != len(sample.response_ids):
            raise ValueError(f"sample {r}: {len(token_advantages[r])} advantages for {len(sample.response_ids)} tokens")
        adv[at] = torch.tensor(token_advantages[r], dtype=torch.float32)
        if gen is not None:
            if len(generated[r]) != len(sample.response_ids):
                raise ValueError(
                    f"sample {r}: {len(generated[r])} generated flags for {len(sample.response_ids)} tokens"
                )
            gen[at] = torch.tensor([float(g) for g in generated[r]])
    fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
    return MOPDBatch(**fields, token_advantages=adv, generated=gen)
