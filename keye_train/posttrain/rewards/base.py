"""The reward protocol, the registry of rewards by name, and the answer-extraction helpers they share.

A reward scores one decoded response against its sample's reference (a mapping read from the RL data; each reward
documents the keys it reads) and returns a float, usually in [0, 1]. Rewards are built by name from the config
(`rl.rewards: [{name: ..., weight: ..., options: {...}}]`), so a new reward is a factory registered here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol


class Reward(Protocol):
    def __call__(self, response: str, reference: Mapping[str, Any]) -> float:
        """The score of `response` against `reference`; never raises on a malformed response (it scores 0)."""


REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    """Decorator: registers a reward factory (a class or a function returning a Reward) under `name`."""

    def add(factory):
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        REGISTRY[name] = factory
        return factory

    return add


def reward_names() -> list[str]:
    return sorted(REGISTRY)


def build_reward(name: str, **options) -> Reward:
    """The reward registered as `name`, built with its options; unknown names and options say what exists."""
    if name not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(reward_names())}")
    try:
        return REGISTRY[name](**options)
    except TypeError as err:
        raise ValueError(f"reward {name!r}: bad options {options}: {err}") from err


class WeightedReward:
    """sum_k w_k * r_k(response), times the product of the gate rewards (a gate is a reward in {0, 1}, e.g. the
    format: a response that breaks the format scores 0 whatever its answer)."""

    def __init__(self, terms: list[tuple[str, float, Reward]], gates: list[tuple[str, Reward]] = ()):
        if not terms and not gates:
            raise ValueError("a weighted reward needs at least one term or gate")
        self.terms, self.gates = list(terms), list(gates)

    def __call__(self, response: str, reference: Mapping[str, Any]) -> float:
        for _, gate in self.gates:
            if gate(response, reference) <= 0.0:
                return 0.0
        if not self.terms:
            return 1.0
        return float(sum(weight * reward(response, reference) for _, weight, reward in self.terms))

    def scored(self, response: str, reference: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
        """The reward and each term's and gate's raw score, every reward evaluated once (a judge is called once)."""
        parts = self.components(response, reference)
        if any(parts[name] <= 0.0 for name, _ in self.gates):
            return 0.0, parts
        if not self.terms:
            return 1.0, parts
        return float(sum(weight * parts[name] for name, weight, _ in self.terms)), parts

    def components(self, response: str, reference: Mapping[str, Any]) -> dict[str, float]:
        """Each term's and gate's raw score, for logging."""
        out = {name: float(reward(response, reference)) for name, _, reward in self.terms}
        out.update({name: float(gate(response, reference)) for name, gate in self.gates})
        return out


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def answer_text(response: str) -> str:
    """The part of a response that holds its final answer: the last `<answer>...</answer>`, else the last
    `\\boxed{...}`, else what follows `</think>`, else the whole response."""
    found = _ANSWER.findall(response)
    if found:
        return found[-1].strip()
    boxed = _BOXED.findall(response)
    if boxed:
        return boxed[-1].strip()
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1].strip()
    return response.strip()
