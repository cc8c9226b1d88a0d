"""A toy verifiable task for the demo's RL stages: count the marks in a short text (`how many x : x x x ?`,
answer `3`), one JSONL line per prompt with the reference the numeric-match and exact-match rewards read."""

from __future__ import annotations

import json
import random
from pathlib import Path

MARKS = ("x", "o", "dots")


def counting_prompts(count: int, seed: int = 0, max_count: int = 4) -> list[dict]:
    """`count` prompts {"id", "prompt", "answer", "answer_type", "question", "solution"} (the last two for a
    judge); answers uniform in 1..max_count."""
    if count < 1 or max_count < 1:
        raise ValueError("counting_prompts: count and max_count must be >= 1")
    rng = random.Random(seed)
    records = []
    for n in range(count):
        mark = MARKS[n % len(MARKS)]
        symbol = "." if mark == "dots" else mark
        answer = rng.randint(1, max_count)
        text = f"how many {mark} : {' '.join([symbol] * answer)} ? answer with a number ."
        solution = f"the marks are {' '.join([symbol] * answer)} : counting them gives {answer}"
        records.append(
            {
                "id": f"count-{n:04d}",
                "prompt": text,
                "answer": str(answer),
                "answer_type": "number",
                "question": text,
                "solution": solution,
            }
        )
    return records


def write_counting_prompts(path: str | Path, count: int = 64, seed: int = 0, max_count: int = 4) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in counting_prompts(count, seed, max_count)))
    return path
