"""Toy verifiable tasks for the demo's RL stages, one JSONL line per prompt with the reference the outcome reward
reads (`answer_type` picks numeric match or temporal IoU):
- counting: `how many x : x x x ? answer with a number .`, answer `3`;
- grounding in a text timeline: `the red disk 0.5 - 2.0 seconds , the blue disk 2.0 - 4.5 seconds .` then the
  demo's grounding question `Give the start and end time in seconds of: the blue disk`, answer [2.0, 4.5].
The grounding task pays partial credit (IoU), so a tiny model's groups rarely tie and the reward can climb.
The demo's General-RL stage counts 1 or 2 marks (`rl_counting.jsonl`, `max_count=2`): the chain's weak SFT model
writes mostly caption words (about 1% right counts at T = 1), and with two possible answers a sampled digit is
right often enough for groups of 16 not to tie, so the outcome reward alone can climb within the stage.
`toy_sft_records` are other instances of the same tasks as chat samples with their answers, for the demo corpus:
the chain's SFT model then answers in the tasks' formats (a number, `a - b seconds`), not always rightly, and the
RL stages' outcome reward has something to sharpen."""

from __future__ import annotations

import json
import random
from pathlib import Path

MARKS = ("x", "o", "dots")
COLORS = ("red", "green", "blue", "white", "yellow")


def counting_prompt(n: int, rng: random.Random, max_count: int) -> dict:
    mark = MARKS[n % len(MARKS)]
    symbol = "." if mark == "dots" else mark
    answer = rng.randint(1, max_count)
    text = f"how many {mark} : {' '.join([symbol] * answer)} ? answer with a number ."
    solution = f"the marks are {' '.join([symbol] * answer)} : counting them gives {answer}"
    return {
        "id": f"count-{n:04d}",
        "task": "counting",
        "prompt": text,
        "answer": str(answer),
        "answer_type": "number",
        "question": text,
        "solution": solution,
    }


def grounding_prompt(n: int, rng: random.Random) -> dict:
    colors = rng.sample(COLORS, 3)
    cuts = sorted(rng.sample(range(1, 16), 2))
    bounds = [0.0, cuts[0] / 2, cuts[1] / 2, 8.0]
    spans = [(bounds[k], bounds[k + 1]) for k in range(3)]
    timeline = " , ".join(f"the {c} disk {a:.1f} - {b:.1f} seconds" for c, (a, b) in zip(colors, spans))
    pick = rng.randrange(3)
    query = f"the {colors[pick]} disk"
    text = f"{timeline} .\nGive the start and end time in seconds of: {query}"
    start, end = spans[pick]
    solution = f"the timeline says {query} is at {start:.1f} - {end:.1f} seconds"
    return {
        "id": f"ground-{n:04d}",
        "task": "grounding",
        "prompt": text,
        "start": start,
        "end": end,
        "answer": f"{start:.1f} - {end:.1f} seconds",
        "answer_type": "segment",
        "question": text,
        "solution": solution,
    }


def toy_prompts(count: int, seed: int = 0, max_count: int = 4, tasks: tuple[str, ...] = ("count", "ground")):
    """`count` prompts, the tasks alternating; each carries `question` and `solution` for a judge."""
    if count < 1 or max_count < 1 or not tasks or set(tasks) - {"count", "ground"}:
        raise ValueError("toy_prompts: count, max_count >= 1 and tasks among count, ground")
    rng = random.Random(seed)
    out = []
    for n in range(count):
        task = tasks[n % len(tasks)]
        out.append(counting_prompt(n, rng, max_count) if task == "count" else grounding_prompt(n, rng))
    return out


def toy_sft_records(count: int, seed: int = 1) -> list[dict]:
    """`count` chat records (the demo manifest's `chat` kind) of toy prompts drawn with their own seed, each
    answered with its reference (`3`; `2.0 - 4.5 seconds`)."""
    return [
        {
            "id": f"toy-sft-{record['id']}",
            "kind": "chat",
            "messages": [
                {"role": "user", "content": [{"text": record["prompt"]}]},
                {"role": "assistant", "content": record["answer"]},
            ],
        }
        for record in toy_prompts(count, seed)
    ]


def counting_prompts(count: int, seed: int = 0, max_count: int = 4) -> list[dict]:
    return toy_prompts(count, seed, max_count, ("count",))


def write_toy_prompts(path: str | Path, count: int = 64, seed: int = 0, tasks=("count", "ground")) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_prompts(count, seed, tasks=tuple(tasks))))
    return path


def write_counting_prompts(path: str | Path, count: int = 64, seed: int = 0, max_count: int = 4) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in counting_prompts(count, seed, max_count)))
    return path


def clip_grounding_prompts(manifest: str | Path, media_dir: str = "media") -> list[dict]:
    """The demo's grounding records as RL prompts on their clips (the video path relative to the JSONL's folder),
    asked as the SFT data asks them, answered by temporal IoU."""
    out = []
    for line in Path(manifest).read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") != "grounding":
            continue
        query = record["query"]
        text = f"\nGive the start and end time in seconds of: {query}"
        start, end = float(record["start"]), float(record["end"])
        out.append(
            {
                "id": f"clip-{record['id']}",
                "task": "grounding",
                "query": query,
                "prompt": text,
                "video": f"{media_dir}/{record['media'][record['video']]}",
                "start": start,
                "end": end,
                "answer": f"{start:.1f} - {end:.1f} seconds",
                "answer_type": "segment",
                "question": text,
                "solution": f"{query} is visible from {start:.1f} to {end:.1f} seconds",
            }
        )
    return out


def write_clip_grounding_prompts(path: str | Path, manifest: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in clip_grounding_prompts(manifest)))
    return path
