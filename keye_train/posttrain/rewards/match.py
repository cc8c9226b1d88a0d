"""Outcome rewards on the final answer (`base.answer_text`): exact text match, numeric match with tolerance,
and the multiple-choice letter.

Reference keys: `answer` (a string, a number, or a list of acceptable answers); the multiple-choice reward also
reads `options` (a list of option texts, or a mapping letter -> text) when present.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from fractions import Fraction

from keye_train.posttrain.rewards.base import answer_text, register

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str, case_sensitive: bool = False) -> str:
    """Lower case, no punctuation, no English articles, single spaces (the SQuAD normalisation)."""
    text = text if case_sensitive else text.lower()
    text = text.translate(_PUNCT)
    if not case_sensitive:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _accepted(reference: Mapping) -> list:
    if "answer" not in reference:
        raise KeyError("the reference has no 'answer'")
    answer = reference["answer"]
    return list(answer) if isinstance(answer, (list, tuple)) else [answer]


@register("exact_match")
class ExactMatchReward:
    """1.0 when the normalised final answer equals a normalised accepted answer."""

    def __init__(self, case_sensitive: bool = False):
        self.case_sensitive = case_sensitive

    def __call__(self, response: str, reference: Mapping) -> float:
        got = normalize_text(answer_text(response), self.case_sensitive)
        return float(any(got == normalize_text(str(a), self.case_sensitive) for a in _accepted(reference)))


# A number: optional sign, digits with optional thousands commas, optional decimals, optional exponent; or a
# fraction a/b; then an optional percent sign. Units after it are ignored.
_NUMBER = re.compile(
    r"(?P<sign>[-+\u2212]?)(?:(?P<num>\d+)\s*/\s*(?P<den>\d+)"
    r"|(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<frac>\.\d+)?(?P<exp>[eE][-+]?\d+)?)(?P<pct>\s*%)?"
)


def parse_numbers(text: str) -> list[tuple[float, bool]]:
    """Every number in the text, in order, as (value, had a percent sign). Handles `1,234.5`, `-3`, `.5`, `2e-3`,
    `3/4`, `45%`, `$12`, `12 km`; a comma not followed by exactly three digits separates numbers."""
    out = []
    for m in _NUMBER.finditer(text):
        sign = -1.0 if m.group("sign") in ("-", "\u2212") else 1.0
        if m.group("num") is not None:
            if int(m.group("den")) == 0:
                continue
            value = float(Fraction(int(m.group("num")), int(m.group("den"))))
        elif m.group("int") is None and m.group("frac") is None:
            continue  # an empty match, or a sign alone
        else:
            body = (m.group("int") or "0").replace(",", "") + (m.group("frac") or "") + (m.group("exp") or "")
            value = float(body)
        out.append((sign * value, m.group("pct") is not None))
    return out


def numbers_close(a: float, b: float, rel_tol: float, abs_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


@register("numeric_match")
class NumericMatchReward:
    """1.0 when the last number of the final answer equals an accepted answer within the tolerance
    (|a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)). A percentage also matches as a fraction (`45%` matches
    45 and 0.45). A string reference is parsed the same way (its last number)."""

    def __init__(self, rel_tol: float = 1e-4, abs_tol: float = 1e-8):
        if rel_tol < 0 or abs_tol < 0:
            raise ValueError("numeric_match: rel_tol and abs_tol must be >= 0")
        self.rel_tol, self.abs_tol = rel_tol, abs_tol

    def __call__(self, response: str, reference: Mapping) -> float:
        found = parse_numbers(answer_text(response))
        if not found:
            return 0.0
        value, percent = found[-1]
        candidates = [value, value / 100.0] if percent else [value]
        for accepted in _accepted(reference):
            targets = (
                [float(accepted)]
                if isinstance(accepted, (int, float))
                else [v for v, _ in parse_numbers(str(accepted))[-1:]]
            )
            if any(numbers_close(c, t, self.rel_tol, self.abs_tol) for c in candidates for t in targets):
                return 1.0
        return 0.0


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def option_texts(reference: Mapping) -> dict[str, str]:
    """letter -> option text from `options` (a list in letter order, or a mapping); `A. text` prefixes dropped."""
    options = reference.get("options")
    if options is None:
        return {}
    items = options.items() if isinstance(options, Mapping) else zip(LETTERS, options)
    out = {}
    for letter, text in items:
        text = re.sub(rf"^\s*\(?{re.escape(str(letter))}[\).:]\s*", "", str(text))
        out[str(letter).upper()] = text.strip()
    return out


def reference_letter(reference: Mapping) -> str:
    """The correct letter: `answer` as a letter (or `A. text`), or `answer` / `correct_choice` as a 0-based index."""
    for key in ("answer", "correct_choice"):
        if key in reference:
            value = reference[key]
            if isinstance(value, int) and not isinstance(value, bool):
                return LETTERS[value]
            match = re.match(r"\s*\(?([A-Za-z])\b", str(value))
            if match:
                return match.group(1).upper()
            raise ValueError(f"reference {key}={value!r} is not a letter or an index")
    raise KeyError("the reference has no 'answer' or 'correct_choice'")


# Cue words are matched in any case, the letter only as a capital (so "the answer is a cat" picks nothing).
_CUES = re.compile(
    r"(?i:final\s+answer|correct\s+(?:answer|option)|best\s+answer|answer|option|choice)\s*(?i:is|:)?\s*"
    r"(?i:option\s*)?[\(\[]?([A-Z])(?![\w'])"
)


def extract_letter(response: str, letters: str = LETTERS[:8], options: Mapping[str, str] | None = None) -> str | None:
    """The chosen option letter, or None. First rule that applies, on the final answer (`answer_text`):
    1. the answer starts with a bracketed letter `(C)`, or is a letter alone or followed by `.`, `)` or `:`;
    2. a cue: `Final Answer: C`, `the answer is (C)`, `option C`, the last cue winning;
    3. the answer equals one option's text (normalised);
    4. exactly one distinct standalone capital letter among `letters` (`(C)`, ` C.`)."""
    text = answer_text(response)
    bracketed = re.match(rf"\s*[\(\[]([{letters}])[\)\]]", text)
    bare = re.match(rf"\s*([{letters}])(?:[.:)]|\s*$)", text)
    if bracketed or bare:
        return (bracketed or bare).group(1)
    cues = [m.group(1) for m in _CUES.finditer(text) if m.group(1) in letters]
    if cues:
        return cues[-1]
    if options:
        got = normalize_text(text)
        hits = [letter for letter, option in options.items() if got and normalize_text(option) == got]
        if len(hits) == 1:
            return hits[0]
    alone = set(re.findall(rf"(?<![\w'])[\(\[]?([{letters}])[\)\]]?(?![\w'])", text))
    if len(alone) == 1:
        return alone.pop()
    return None


@register("mcq_letter")
class MultipleChoiceReward:
    """1.0 when the extracted letter is the reference letter. Valid letters are A.. as many as `options` has,
    else A-H (Video-MME-v2 has 8 options)."""

    def __init__(self, max_letters: int = 8):
        if not 2 <= max_letters <= 26:
            raise ValueError("mcq_letter: max_letters must be in [2, 26]")
        self.max_letters = max_letters

    def __call__(self, response: str, reference: Mapping) -> float:
        options = option_texts(reference)
        letters = LETTERS[: len(options)] if options else LETTERS[: self.max_letters]
        return float(extract_letter(response, letters, options) == reference_letter(reference))
