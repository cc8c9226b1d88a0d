"""Token budgets of stages and chains."""

from __future__ import annotations

from keye_train.config import TrainConfig


def token_budget(train: TrainConfig) -> int:
    """Tokens a stage trains on: steps x global batch (packed sequences) x sequence length."""
    return train.steps * train.global_batch * train.seq_length


def format_tokens(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
