"""Per-teacher MOPD metrics (training_recipe.md §7): routed responses, overlap ratio |Omega| / k, empty-Omega
fraction, teacher and student top-k mass, advantage statistics and the reverse KL; SPRR's mismatch rates come
from `sprr.MismatchCounter`. Sums are kept so ranks can all-reduce them."""

from __future__ import annotations

import torch
import torch.distributed as dist

from keye_train.posttrain.mopd.advantage import TokenScores

SUMS = ("routed", "tokens", "overlap", "empty", "student_mass", "teacher_mass", "adv", "adv_sq", "reverse_kl")


class TeacherMetrics:
    def __init__(self, teachers: list[str], k: int):
        self.teachers, self.k = list(teachers), k
        self.sums = torch.zeros(len(self.teachers), len(SUMS), dtype=torch.float64)
        self.extremes = torch.full((len(self.teachers), 2), float("-inf"), dtype=torch.float64)  # max A, max -A

    def add(self, teacher: str, scores: TokenScores, advantage: torch.Tensor | None = None) -> None:
        """One routed response: its token scores and the advantage the loss uses (default: the raw one)."""
        row = self.teachers.index(teacher)
        adv = (scores.advantage if advantage is None else advantage).double().cpu()
        values = [
            1.0,
            adv.numel(),
            scores.overlap.double().sum().item() / self.k,
            (scores.overlap == 0).sum().item(),
            scores.student_mass.double().sum().item(),
            scores.teacher_mass.double().sum().item(),
            adv.sum().item(),
            (adv * adv).sum().item(),
            scores.reverse_kl.double().sum().item(),
        ]
        self.sums[row] += torch.tensor(values, dtype=torch.float64)
        if adv.numel():
            self.extremes[row] = torch.maximum(self.extremes[row], torch.stack([adv.max(), -adv.min()]))

    def reduce(self, group=None) -> None:
        """Collective: sum (and max) over the ranks of `group`."""
        dist.all_reduce(self.sums, group=group)
        dist.all_reduce(self.extremes, op=dist.ReduceOp.MAX, group=group)

    def as_dict(self) -> dict[str, float]:
        out = {}
        for row, teacher in enumerate(self.teachers):
            s = dict(zip(SUMS, self.sums[row].tolist()))
            n = max(s["tokens"], 1.0)
            mean = s["adv"] / n
            out.update(
                {
                    f"mopd/{teacher}/routed": s["routed"],
                    f"mopd/{teacher}/overlap_ratio": s["overlap"] / n,
                    f"mopd/{teacher}/empty_fraction": s["empty"] / n,
                    f"mopd/{teacher}/student_topk_mass": s["student_mass"] / n,
                    f"mopd/{teacher}/teacher_topk_mass": s["teacher_mass"] / n,
                    f"mopd/{teacher}/advantage_mean": mean,
                    f"mopd/{teacher}/advantage_std": max(s["adv_sq"] / n - mean * mean, 0.0) ** 0.5,
                    f"mopd/{teacher}/advantage_max": float(self.extremes[row, 0]) if s["tokens"] else 0.0,
                    f"mopd/{teacher}/advantage_min": -float(self.extremes[row, 1]) if s["tokens"] else 0.0,
                    f"mopd/{teacher}/reverse_kl": s["reverse_kl"] / n,
                }
            )
        return out
