"""MOPD, multi-teacher on-policy distillation (training_recipe.md §7): the advantage mode and top-k, token-category
weights, the localized repetition penalty, the optional outcome term, the teachers and the routing table.

KEYE gives no K, gamma, lambda_rep or routing table: the defaults here are our choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Dict, List


class AdvantageMode(StrEnum):
    overlap = "overlap"  # sum over TopK(T) & TopK(S) of renormalised pi_S * (log pi_T - log pi_S)
    student_only = "student_only"  # the same sum over the student's top-k
    teacher_on_student = "teacher_on_student"  # the same sum over the teacher's top-k (the student read there)
    sampled_token = "sampled_token"  # MiMo's k1: log pi_T(y_t) - log pi_S(y_t)


class LossForm(StrEnum):
    """How the teacher's signal enters the loss (keye_train/training/objectives/mopd.py)."""

    auto = "auto"  # sampled for mode=sampled_token, support for the support-set modes
    sampled = "sampled"  # -A^_t log pi(y_t): KEYE's form; zero expected gradient for a state-only A_t
    # -gamma_t sum_{v in Omega_t} sg[pibar_S(v) (log pi_T(v) - log pi_S(v))] log pi_S(v): the sampled-token
    # gradient in expectation over Omega (its weights sum to A_t); 0 at S = T, the reverse-KL gradient on the vocab
    support = "support"


class CheckpointFormat(StrEnum):
    ours = "ours"  # keye_train/checkpoint
    hf = "hf"  # a Hugging Face checkpoint, read through keye_train/convert


class TeacherPlacement(StrEnum):
    in_process = "in_process"  # forward-only on the student's ranks, one teacher resident at a time
    off_rank = "off_rank"  # teachers on their own ranks (not built yet)
    host_stream = "host_stream"  # weights streamed from pinned host memory (not built yet)


@dataclass
class TeacherConfig:
    name: str = "teacher"
    model: str = "tiny"  # a model preset (config/model.py), may differ from the student's; "student": the student's
    checkpoint: str = ""  # a run or checkpoint directory (ours) or an HF model directory (hf)
    format: CheckpointFormat = CheckpointFormat.ours


@dataclass
class RouteConfig:
    """Samples whose (modality, task) tags match go to `teacher`; "*" matches any tag. The first match wins."""

    teacher: str = "teacher"
    modality: str = "*"
    task: str = "*"


def _default_category_weights() -> dict:
    return {"format": 0.5, "perception": 1.5, "reasoning": 1.2, "answer": 1.0}


@dataclass
class RepetitionConfig:
    """A collapse: a span of >= min_span tokens that repeats one period of <= max_period tokens >= min_repeats
    times. Tokens after its first period get -penalty on their advantage."""

    penalty: float = 0.0  # lambda_rep; 0 turns the penalty off
    max_period: int = 64
    min_repeats: int = 3
    min_span: int = 48


@dataclass
class MOPDConfig:
    enabled: bool = False  # distil this stage's rollouts (rl.enabled too: the RL stage's prompts and rollout engine)
    mode: AdvantageMode = AdvantageMode.overlap
    loss: LossForm = LossForm.auto
    top_k: int = 32
    category_weights: Dict[str, float] = field(default_factory=_default_category_weights)  # gamma_c
    format_pattern: str = ""  # regex over a decoded piece that makes it format ("": categories.FORMAT_PIECE)
    perception_pattern: str = ""  # regex that makes a piece perception ("": categories.PERCEPTION_PIECE, a digit)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    outcome_weight: float = 0.0  # alpha in A_t + alpha * A_outcome (the response's group-normalised reward)
    teachers: List[TeacherConfig] = field(default_factory=list)
    routes: List[RouteConfig] = field(default_factory=list)
    default_teacher: str = ""  # samples no route matches ("": such a sample is an error)
    placement: TeacherPlacement = TeacherPlacement.in_process
    chunk_tokens: int = 1024  # response positions whose full-vocab logits are held at once when scoring

    @property
    def on_support(self) -> bool:
        """The distribution-level loss form (over Omega) is in use."""
        if self.loss == LossForm.auto:
            return self.mode != AdvantageMode.sampled_token
        return self.loss == LossForm.support

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"mopd.top_k={self.top_k} must be >= 1")
        if self.chunk_tokens < 1:
            raise ValueError(f"mopd.chunk_tokens={self.chunk_tokens} must be >= 1")
        import re

        from keye_train.posttrain.mopd.categories import CATEGORIES

        for key in ("format_pattern", "perception_pattern"):
            try:
                re.compile(getattr(self, key))
            except re.error as err:
                raise ValueError(f"mopd.{key}={getattr(self, key)!r} is not a regular expression: {err}") from None

        for name, weight in self.category_weights.items():
            if name not in CATEGORIES:
                raise ValueError(f"mopd.category_weights.{name} is not a category: {list(CATEGORIES)}")
            if weight < 0:
                raise ValueError(f"mopd.category_weights.{name}={weight} must be >= 0")
        rep = self.repetition
        if rep.penalty < 0:
            raise ValueError(f"mopd.repetition.penalty={rep.penalty} must be >= 0")
        for key in ("max_period", "min_repeats", "min_span"):
            if getattr(rep, key) < (2 if key == "min_repeats" else 1):
                raise ValueError(f"mopd.repetition.{key}={getattr(rep, key)} is too small")
        names = [t.name for t in self.teachers]
        for k, name in enumerate(names):
            if names.index(name) != k:
                raise ValueError(f"mopd.teachers[{k}].name={name!r} is given twice")
        for k, route in enumerate(self.routes):
            if route.teacher not in names:
                raise ValueError(f"mopd.routes[{k}].teacher={route.teacher!r} is not in mopd.teachers: {names}")
        if self.default_teacher and self.default_teacher not in names:
            raise ValueError(f"mopd.default_teacher={self.default_teacher!r} is not in mopd.teachers: {names}")
        if self.loss == LossForm.support and self.mode == AdvantageMode.sampled_token:
            raise ValueError("mopd.loss=support needs a support-set mopd.mode (sampled_token has no support set)")
        if self.enabled and not self.teachers:
            raise ValueError("mopd.teachers is empty: a MOPD stage (mopd.enabled=true) needs at least one teacher")
        for k, teacher in enumerate(self.teachers):
            if self.enabled and not teacher.checkpoint:
                raise ValueError(f"mopd.teachers[{k}].checkpoint is empty (teacher {teacher.name!r})")
        if self.placement != TeacherPlacement.in_process:
            raise ValueError(f"mopd.placement={self.placement}: only in_process is built")
