"""Format reward: the response is `<think>...</think>` followed by `<answer>...</answer>` and nothing else (the
structure KEYE gates the math and video rewards on). Keep its weight small or use it as a gate."""

from __future__ import annotations

import re

from keye_train.posttrain.rewards.base import register

_THINK_ANSWER = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_ANSWER_ONLY = re.compile(r"\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@register("format")
class FormatReward:
    """1.0 when the whole response is one think block then one non-empty answer block (or, with
    require_think=False, an optional think block), else 0.0. Any repeated tag fails the format."""

    def __init__(self, require_think: bool = True):
        self.require_think = require_think

    def __call__(self, response: str, reference=None) -> float:
        if any(response.count(tag) > 1 for tag in _TAGS):
            return 0.0
        match = _THINK_ANSWER.fullmatch(response)
        if match is None and not self.require_think and "<think>" not in response:
            match = _ANSWER_ONLY.fullmatch(response)
        if match is None or not match.group("answer").strip():
            return 0.0
        if "think" in match.groupdict() and not match.group("think").strip():
            return 0.0
        return 1.0


@register("distinct_words")
class DistinctWordsReward:
    """The share of distinct words among the response's words (1.0 when none repeats, 1/n for one word said n
    times, 0.0 for an empty response): a verifiable anti-repetition term, the sequence-level counterpart of the
    repetition penalties RL recipes add against collapse. Reads no reference."""

    def __call__(self, response: str, reference=None) -> float:
        words = response.split()
        return len(set(words)) / len(words) if words else 0.0
