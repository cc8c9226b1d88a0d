"""Shaping (category scale, repetition tail, SPRR mask) and the per-teacher metrics against hand sums."""

import math
from types import SimpleNamespace

import pytest
import torch

from keye_train.posttrain.mopd.advantage import token_scores
from keye_train.posttrain.mopd.metrics import TeacherMetrics
from keye_train.posttrain.mopd.shaping import shaped_advantages

REP = SimpleNamespace(penalty=0.25, max_period=4, min_repeats=3, min_span=6)


def test_shaping_scales_by_category_penalises_the_tail_and_masks_misaligned_responses():
    raw = torch.tensor([1.0, -2.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    ids = [10, 11, 3, 4, 3, 4, 3, 4, 3, 4]  # period 2 from index 2: tau = 4
    cats = ["format", "perception", "reasoning", "answer", "answer", "answer", "answer", "answer", "answer", "answer"]
    gamma = {"format": 0.5, "perception": 1.5, "reasoning": 1.2}
    got = shaped_advantages(raw, ids, cats, gamma, REP)
    expected = [0.5, -3.0, 0.6, 0.5] + [0.5 - 0.25] * 6
    assert got.tolist() == pytest.approx(expected, abs=1e-15)
    assert shaped_advantages(raw, ids, cats, gamma, REP, aligned=False).tolist() == [0.0] * 10
    with pytest.raises(ValueError, match="10 advantages, 9 ids"):
        shaped_advantages(raw, ids[:9], cats, gamma, REP)


def test_per_teacher_metrics_are_the_hand_averages():
    g = torch.Generator().manual_seed(0)
    k = 3
    student = torch.randn(5, 9, generator=g, dtype=torch.float64)
    teachers = {"math": torch.randn(5, 9, generator=g, dtype=torch.float64), "ocr": student.clone()}
    metrics = TeacherMetrics(["math", "ocr"], k)
    scored = {}
    for name, teacher in teachers.items():
        for rows in (slice(0, 2), slice(2, 5)):  # two responses per teacher
            s = token_scores(
                student[rows], teacher[rows], torch.zeros(rows.stop - rows.start, dtype=torch.long), "overlap", k
            )
            metrics.add(name, s)
            scored.setdefault(name, []).append(s)
    out = metrics.as_dict()
    math_scores = scored["math"]
    adv = torch.cat([s.advantage for s in math_scores])
    overlap = torch.cat([s.overlap for s in math_scores]).double()
    assert out["mopd/math/routed"] == 2
    assert out["mopd/math/overlap_ratio"] == pytest.approx((overlap / k).mean().item(), rel=1e-12)
    assert out["mopd/math/empty_fraction"] == pytest.approx((overlap == 0).double().mean().item(), rel=1e-12)
    assert out["mopd/math/advantage_mean"] == pytest.approx(adv.mean().item(), rel=1e-12)
    assert out["mopd/math/advantage_std"] == pytest.approx(adv.std(unbiased=False).item(), rel=1e-9)
    assert out["mopd/math/advantage_max"] == adv.max().item() and out["mopd/math/advantage_min"] == adv.min().item()
    ls, lt = torch.log_softmax(student, -1), torch.log_softmax(teachers["math"], -1)
    assert out["mopd/math/reverse_kl"] == pytest.approx((ls.exp() * (ls - lt)).sum(-1).mean().item(), rel=1e-12)
    top = torch.topk(ls, k, -1).values.exp().sum(-1).mean().item()
    assert out["mopd/math/student_topk_mass"] == pytest.approx(top, rel=1e-12)
    # a teacher equal to the student: full overlap, no gap
    assert out["mopd/ocr/overlap_ratio"] == 1.0 and out["mopd/ocr/empty_fraction"] == 0.0
    assert out["mopd/ocr/reverse_kl"] == pytest.approx(0.0, abs=1e-15) and out["mopd/ocr/advantage_max"] == 0.0
    assert not math.isnan(out["mopd/ocr/teacher_topk_mass"])
