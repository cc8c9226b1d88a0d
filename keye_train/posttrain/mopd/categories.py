"""Token categories for MOPD's advantage scaling, A~_t = gamma_{c(t)} A_t (training_recipe.md §7 step 5).

The default tagger reads each response token's id and its decoded piece:
    format      special / template tokens, <think> and tool-call tags, JSON punctuation
    perception  numbers, timestamps and coordinates (pieces with a digit), anything inside a box / quad / ref span
                (Qwen's grounding and OCR markup), and the pieces of a quoted string in an OCR-style answer
    reasoning   the rest of a <think> ... </think> span
    answer      everything else (gamma 1 by default)
The patterns are arguments, so a recipe can change what counts as what.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

CATEGORIES = ("format", "perception", "reasoning", "answer")
FORMAT_PIECE = r"^\s*[{}\[\]\":,]+\s*$|^\s*<\|?/?[A-Za-z_]+\|?>\s*$"
PERCEPTION_PIECE = r"\d"


@dataclass
class Tagger:
    format_piece: str = FORMAT_PIECE
    perception_piece: str = PERCEPTION_PIECE
    think_open: str = "<think>"
    think_close: str = "</think>"
    perception_open: Sequence[str] = field(
        default_factory=lambda: ("<|box_start|>", "<|quad_start|>", "<|object_ref_start|>")
    )
    perception_close: Sequence[str] = field(
        default_factory=lambda: ("<|box_end|>", "<|quad_end|>", "<|object_ref_end|>")
    )
    special_ids: frozenset = frozenset()  # ids that are always format (the tokenizer's special tokens)

    def tag(self, ids: Sequence[int], pieces: Sequence[str]) -> list[str]:
        """One category per response token (pieces[i] is ids[i] decoded on its own). Tags and spans are found in
        the decoded text, so a tag split over several pieces (a tokenizer without a <think> token) still counts."""
        if len(ids) != len(pieces):
            raise ValueError(f"{len(ids)} ids but {len(pieces)} decoded pieces")
        text = "".join(pieces)
        tags, think, perceive = [], [], []  # char spans of the tags themselves, of <think> and of perception spans
        for opener, closer, spans in [(self.think_open, self.think_close, think)] + [
            (o, c, perceive) for o, c in zip(self.perception_open, self.perception_close)
        ]:
            at = 0
            while (i := text.find(opener, at)) >= 0:
                j = text.find(closer, i + len(opener))
                end = j if j >= 0 else len(text)
                tags.append((i, i + len(opener)))
                if j >= 0:
                    tags.append((j, j + len(closer)))
                spans.append((i + len(opener), end))
                at = end + (len(closer) if j >= 0 else 0)
        fmt, perc = re.compile(self.format_piece), re.compile(self.perception_piece)

        def inside(spans, a, b):
            return any(a < hi and lo < b for lo, hi in spans)

        out, at, quoted = [], 0, False
        for token, piece in zip(ids, pieces):
            a, b = at, at + max(len(piece), 1)
            at += len(piece)
            if token in self.special_ids or inside(tags, a, b) or fmt.search(piece):
                out.append("format")
            elif inside(perceive, a, b) or quoted or perc.search(piece):
                out.append("perception")
            elif inside(think, a, b):
                out.append("reasoning")
            else:
                out.append("answer")
            quoted ^= piece.count('"') % 2 == 1
        return out


def category_weights(categories: Sequence[str], gamma: Mapping[str, float]) -> torch.Tensor:
    """[T] gamma_{c(t)} (float64); a category missing from gamma weighs 1."""
    for c in set(categories):
        if c not in CATEGORIES:
            raise ValueError(f"token category {c!r} is not one of {list(CATEGORIES)}")
    return torch.tensor([float(gamma.get(c, 1.0)) for c in categories], dtype=torch.float64)


def tagger_for(tokenizer, format_pattern: str = "", perception_pattern: str = "") -> Tagger:
    """The default tagger for a KeyeTokenizer (its special ids are format), with mopd.*_pattern if set."""
    specials = frozenset(int(getattr(tokenizer.ids, f)) for f in tokenizer.ids.__dataclass_fields__)
    return Tagger(
        format_piece=format_pattern or FORMAT_PIECE,
        perception_piece=perception_pattern or PERCEPTION_PIECE,
        special_ids=specials,
    )


def tag_response(ids: Sequence[int], tokenizer, tagger: Tagger | None = None) -> list[str]:
    """The categories of a response's tokens with a KeyeTokenizer: each id decoded on its own."""
    tagger = tagger if tagger is not None else tagger_for(tokenizer)
    return tagger.tag(list(ids), [tokenizer.decode([int(t)]) for t in ids])
