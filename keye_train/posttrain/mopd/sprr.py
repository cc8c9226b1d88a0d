"""SPRR, Segmented Prompt-Response Re-tokenization (training_recipe.md §7): the teacher's sequence for one assistant
turn of a student rollout, and the checks that its log-probs line up with the student's response tokens.

Per assistant turn:
1. The teacher's context is rendered from the raw multimodal record (its messages before that turn) by the
   teacher's own renderer: its tokenizer and chat template, pixel budget, frame sampling and visual-pad expansion
   (data_pipeline.encode), ending in its generation header plus the boundary glue (e.g. an implicit "<think>\n").
2. The student's response ids are appended verbatim: decoded text is never re-tokenized (BPE merges would move
   the boundaries). The teacher must share the student's vocabulary for that (MOPD's teachers do).
3. M-RoPE ids are recomputed for the teacher's whole sequence (data_pipeline.positions).
4. The teacher's logits are read at exactly the R positions that predict the response tokens.
A multi-turn rollout is scored turn by turn: the caller puts the student's earlier turns into the record's
messages (they are then context, rendered as text by the teacher's template) and scores each turn's own ids.

Checks, each a reason a sample is masked (advantage 0) and counted, never silently misaligned:
    visual_tokens    the teacher's pad tokens != its processor's merged grids, or a different number of media blocks
    frame_sampling   the teacher's video frame times differ from the student's
    template         the text after the last <|im_start|> (role header + glue) differs from the student's
    mrope            the response positions are not text positions following the context's largest position
    echo             the appended ids differ from the student's response ids
    length           the teacher's log-prob rows read at the response != R
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data_pipeline.batch import PackedBatch, VisualInput
from data_pipeline.encode import MediaBudget, encode_sample
from data_pipeline.positions import mrope_position_ids

REASONS = ("visual_tokens", "frame_sampling", "template", "mrope", "echo", "length")


@dataclass
class RenderedContext:
    """One turn's context as a model's processor renders it (up to and including the generation header + glue)."""

    input_ids: torch.Tensor  # [L] int64
    patches: torch.Tensor  # [N, 3 * 14 * 14]
    patch_grids: torch.Tensor  # [F, 2] per image / frame, in patches


class ChatRenderer:
    """A model's own rendering of a chat record's context: its KeyeTokenizer, MediaBudget and glue."""

    def __init__(self, tokenizer, budget: MediaBudget, glue: str = ""):
        self.tokenizer, self.budget, self.glue = tokenizer, budget, glue

    def render(self, record: dict, media: dict[str, bytes], turn: int) -> RenderedContext:
        """The context of the `turn`-th assistant message (0-based): every message before it, then the header."""
        messages = record["messages"]
        at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if turn >= len(at):
            raise ValueError(f"the record has {len(at)} assistant turns, turn {turn} was asked for")
        encoded = encode_sample(
            "sprr", {"kind": "chat", "messages": messages[: at[turn]]}, media, self.tokenizer, self.budget
        )
        ids = self.tokenizer.ids
        header = [ids.im_start, *self.tokenizer.encode("assistant\n" + self.glue)]
        input_ids = torch.cat([encoded.input_ids, torch.tensor(header, dtype=torch.int64)])
        return RenderedContext(input_ids, encoded.patches, encoded.patch_grids)


def frame_times(input_ids: Sequence[int], tokenizer) -> list[list[float]]:
    """Per video, the times written after each <|frame|> (the frames its processor sampled)."""
    ids, out, current, stamp = tokenizer.ids, [], None, None
    for token in [int(t) for t in input_ids]:
        if token == ids.vision_start:
            current = []
        elif token == ids.frame and current is not None:
            stamp = []
        elif stamp is not None and token not in (ids.video_pad, ids.vision_end):
            stamp.append(token)
        else:
            if stamp is not None:
                current.append(float(re.sub(r"[^0-9.]", "", tokenizer.decode(stamp))))
                stamp = None
            if token == ids.vision_end and current is not None:
                if current:
                    out.append(current)
                current = None
    return out


def boundary_text(input_ids: Sequence[int], tokenizer) -> str:
    """What follows the last <|im_start|>: the role header and the glue the response starts after."""
    ids = [int(t) for t in input_ids]
    if tokenizer.ids.im_start not in ids:
        return ""
    last = len(ids) - 1 - ids[::-1].index(tokenizer.ids.im_start)
    return tokenizer.decode(ids[last + 1 :])


def media_blocks(input_ids: Sequence[int], tokenizer) -> int:
    return sum(int(t) == tokenizer.ids.vision_start for t in input_ids)


@dataclass
class TeacherSequence:
    """The teacher's [context | student response] sequence of one turn, or the reason it was rejected."""

    input_ids: torch.Tensor | None  # [L + R]
    position_ids: torch.Tensor | None  # [3, L + R]
    visual: VisualInput | None
    context_length: int  # L
    response_length: int  # R
    reason: str | None = None  # one of REASONS, None when every check passed

    @property
    def ok(self) -> bool:
        return self.reason is None

    def batch(self) -> PackedBatch:
        """One packed document for the teacher's forward (labels: the next ids; no loss)."""
        n = int(self.input_ids.numel())
        labels = torch.cat([self.input_ids[1:], self.input_ids[-1:]])
        return PackedBatch(
            self.input_ids,
            labels,
            torch.zeros(n),
            self.position_ids,
            torch.tensor([0, n], dtype=torch.int32),
            self.visual,
        )

    def response_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """The R rows of the teacher's [L + R, V] logits that predict the response tokens (positions L-1 ..
        L+R-2); raises when the teacher gave another count (the `length` check)."""
        rows = logits[self.context_length - 1 : self.context_length - 1 + self.response_length]
        if rows.shape[0] != self.response_length:
            raise ValueError(f"length: {rows.shape[0]} teacher rows for a response of {self.response_length}")
        return rows


def teacher_sequence(
    context: RenderedContext,
    teacher_tokenizer,
    student_prompt_ids: Sequence[int],
    student_tokenizer,
    response_ids: Sequence[int],
    vocab_size: int | None = None,
) -> TeacherSequence:
    """Append the student's response ids verbatim to the teacher's rendered context, recompute M-RoPE, check.
    vocab_size: the ids the teacher model reads (its padded embedding; default its tokenizer's vocabulary)."""
    response = torch.as_tensor(list(response_ids), dtype=torch.int64)
    ctx = context.input_ids.to(torch.int64)
    L, R = int(ctx.numel()), int(response.numel())

    def rejected(reason: str) -> TeacherSequence:
        return TeacherSequence(None, None, None, L, R, reason)

    tok = teacher_tokenizer.ids
    merged = context.patch_grids // 2
    pads = int(torch.isin(ctx, torch.tensor([tok.image_pad, tok.video_pad])).sum())
    expected = int((merged[:, 0] * merged[:, 1]).sum()) if merged.numel() else 0
    if pads != expected or media_blocks(ctx, teacher_tokenizer) != media_blocks(student_prompt_ids, student_tokenizer):
        return rejected("visual_tokens")
    if int(context.patch_grids.prod(-1).sum() if context.patch_grids.numel() else 0) != context.patches.shape[0]:
        return rejected("visual_tokens")
    teacher_times = frame_times(ctx.tolist(), teacher_tokenizer)
    student_times = frame_times(student_prompt_ids, student_tokenizer)
    if len(teacher_times) != len(student_times) or any(
        len(a) != len(b) or any(abs(x - y) > 0.05 for x, y in zip(a, b)) for a, b in zip(teacher_times, student_times)
    ):
        return rejected("frame_sampling")
    if boundary_text(ctx.tolist(), teacher_tokenizer) != boundary_text(student_prompt_ids, student_tokenizer):
        return rejected("template")
    ids = torch.cat([ctx, response])
    vocab = teacher_tokenizer.vocab_size if vocab_size is None else vocab_size
    if not torch.equal(ids[L:], response) or (R and int(response.max()) >= vocab):
        return rejected("echo")  # the teacher cannot read an id outside its vocabulary
    try:
        positions = mrope_position_ids(ids, [tok.image_pad, tok.video_pad], merged)
    except ValueError:  # a visual pad inside the response: no consistent layout
        return rejected("mrope")
    start = int(positions[:, :L].max()) + 1 if L else 0
    want = torch.arange(start, start + R).expand(3, -1)
    if not torch.equal(positions[:, L:], want):
        return rejected("mrope")
    visual = VisualInput(context.patches, context.patch_grids) if context.patches.shape[0] else None
    return TeacherSequence(ids, positions, visual, L, R)


class MismatchCounter:
    """Per teacher: SPRR turns checked and rejected, by reason."""

    def __init__(self):
        self.checked: Counter = Counter()
        self.rejected: dict[str, Counter] = {}

    def add(self, teacher: str, reason: str | None) -> None:
        """One turn checked for `teacher`; reason: why it was rejected (one of REASONS), None when it aligned."""
        if reason is not None and reason not in REASONS:
            raise ValueError(f"SPRR reason {reason!r} is not one of {list(REASONS)}")
        self.checked[teacher] += 1
        if reason is not None:
            self.rejected.setdefault(teacher, Counter())[reason] += 1

    def rates(self) -> dict[str, float]:
        """{"mopd/<teacher>/mismatch/<reason>": rate} and the overall rate per teacher."""
        out = {}
        for teacher, n in self.checked.items():
            by_reason = self.rejected.get(teacher, Counter())
            out[f"mopd/{teacher}/mismatch_rate"] = sum(by_reason.values()) / n
            for reason in REASONS:
                out[f"mopd/{teacher}/mismatch/{reason}"] = by_reason[reason] / n
        return out
