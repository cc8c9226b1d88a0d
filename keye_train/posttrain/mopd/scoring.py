"""One MOPD scoring pass over a step's responses: each routed to its teacher, SPRR-aligned, scored forward-only
by the teacher (grouped so each instance loads once), turned into shaped token advantages, with the per-teacher
metrics and the mismatch counters updated. A response SPRR rejects gets A^ = 0."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from keye_train.posttrain.mopd.advantage import token_scores
from keye_train.posttrain.mopd.metrics import TeacherMetrics
from keye_train.posttrain.mopd.shaping import shaped_advantages
from keye_train.posttrain.mopd.sprr import MismatchCounter, TeacherSequence
from keye_train.posttrain.mopd.teachers import TeacherPool


@dataclass
class ResponseToScore:
    teacher: str  # the routed teacher's name
    sequence: TeacherSequence  # the teacher's SPRR sequence of this turn
    student_logits: torch.Tensor  # [R, V_local] the student's logits at the response positions
    response_ids: Sequence[int]
    categories: Sequence[str]  # one per response token (categories.Tagger)


@torch.no_grad()
def score_responses(
    pool: TeacherPool,
    items: Sequence[ResponseToScore],
    mopd,
    metrics: TeacherMetrics,
    counter: MismatchCounter,
    vocab_start: int = 0,
    group=None,
) -> list[torch.Tensor]:
    """[R] float64 shaped advantages per response, in the order of `items`. mopd: the MOPDConfig."""
    out: list[torch.Tensor | None] = [None] * len(items)

    def score(teacher, name: str, indices: list[int]) -> None:
        for i in indices:
            item = items[i]
            zeros = torch.zeros(len(item.response_ids), dtype=torch.float64)
            if not item.sequence.ok:
                counter.add(name, item.sequence.reason)
                out[i] = zeros
                continue
            try:
                rows = item.sequence.response_rows(teacher.logits(item.sequence.batch()))
            except ValueError:
                counter.add(name, "length")
                out[i] = zeros
                continue
            counter.add(name, None)
            ids = torch.as_tensor(list(item.response_ids), dtype=torch.int64, device=rows.device)
            scores = token_scores(
                item.student_logits, rows, ids, str(mopd.mode), mopd.top_k, vocab_start, group, mopd.chunk_tokens
            )
            shaped = shaped_advantages(
                scores.advantage, item.response_ids, item.categories, mopd.category_weights, mopd.repetition
            )
            metrics.add(name, scores, shaped)
            out[i] = shaped

    pool.score([item.teacher for item in items], score)
    return out
