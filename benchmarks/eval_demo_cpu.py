"""The eval table of the demo chain: the TimeLens grounding evaluator and the multiple-choice evaluator (the code
`keye-train eval` runs, greedy rollouts) on each post-training checkpoint; figures to
benchmarks/results/eval_demo_cpu.json.

    .venv/bin/python benchmarks/eval_demo_cpu.py [--root runs/demo_chain] [--data runs/demo/data]

Sets, both from `keye-data demo`:
- grounding: the demo clips' grounding records (`rl_clip_grounding.jsonl`, Video-RL's training prompts), asked
  with the TimeLens prompt, scored R1@0.3/0.5/0.7 and mIoU;
- multiple choice: 64 held-out counting questions (counts 1-4, options `1`-`4`), text only.
Chance lines come with them: the grounding metrics of always answering the set's mean reference segment, and
the multiple-choice accuracy of always answering each letter. One process, one rank, the rl_video stage's config
(every stage of the chain has the same model).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.insert(0, str(REPO))
from benchmarks.common import cpu_description, demo_stage_model, git_state, write_result  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "eval_demo_cpu.json"
STAGES = ("sft", "rl_general", "rl_context", "rl_video", "mopd")
HELD_OUT_SEED = 7
MAX_NEW_TOKENS = 16


def counting_choices(path: Path) -> Path:
    """Held-out counting prompts as four-option questions; written next to the demo data."""
    from data_pipeline.rl_demo import counting_prompts

    lines = []
    for record in counting_prompts(64, seed=HELD_OUT_SEED, max_count=4):
        question = record["prompt"].removesuffix(" answer with a number .")
        answer = "ABCD"[int(record["answer"]) - 1]
        lines.append({"id": record["id"], "question": question, "options": ["1", "2", "3", "4"], "answer": answer})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def chance_lines(ground_items, mcq_items) -> dict:
    from keye_train.posttrain.evaluation import grounding

    starts = [item.windows[0][0] for item in ground_items]
    ends = [item.windows[0][1] for item in ground_items]
    mean_span = f"{sum(starts) / len(starts):.1f} - {sum(ends) / len(ends):.1f} seconds"
    letters = collections.Counter(item.answer for item in mcq_items)
    return {
        "grounding_mean_segment": {
            "answer": mean_span,
            **grounding.grounding_metrics([mean_span] * len(ground_items), ground_items),
        },
        "mcq_always_letter": {letter: 100.0 * letters[letter] / len(mcq_items) for letter in "ABCD"},
    }


def print_row(name: str, ground: dict, mcq_accuracy: float, unparsed: bool = True) -> None:
    unparsed = f"{ground['unparsed']:>8.0f}" if unparsed else " " * 8
    print(
        f"{name:<22} {ground['R1@0.3']:>7.1f} {ground['R1@0.5']:>7.1f} {ground['R1@0.7']:>7.1f} "
        f"{ground['mIoU']:>7.1f} {unparsed} {mcq_accuracy:>8.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "demo_chain")
    parser.add_argument("--data", type=Path, default=REPO / "runs" / "demo" / "data")
    args = parser.parse_args()
    from keye_train import checkpoint
    from keye_train.cli.eval import rollout_generate
    from keye_train.posttrain.evaluation import grounding, mcq

    cfg, ctx, tokenizer, parts = demo_stage_model("rl_video")
    ground_path = args.data / "rl_clip_grounding.jsonl"
    mcq_path = counting_choices(args.data / "eval_counting_mcq.jsonl")
    ground_items, mcq_items = grounding.read_grounding(ground_path), mcq.read_mcq(mcq_path)
    settings = {"fps": cfg.data.video_fps, "video_total_tokens": cfg.data.video_total_tokens}
    result = {
        "benchmark": "eval_demo_cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": cpu_description(),
        **git_state(),
        "grounding_set": {"file": "rl_clip_grounding.jsonl", "items": len(ground_items)},
        "mcq_set": {"file": "eval_counting_mcq.jsonl", "items": len(mcq_items), "seed": HELD_OUT_SEED},
        "max_new_tokens": MAX_NEW_TOKENS,
        "chance": chance_lines(ground_items, mcq_items),
        "checkpoints": {},
    }
    columns = ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "unparsed", "MCQ acc")
    print("metrics in percent\n" + f"{'checkpoint':<22} " + " ".join(f"{c:>{max(len(c), 7)}}" for c in columns))
    chance = result["chance"]
    print_row(
        "chance (mean segment)", chance["grounding_mean_segment"], max(chance["mcq_always_letter"].values()), False
    )
    generate = rollout_generate(cfg, parts, tokenizer, MAX_NEW_TOKENS, args.data)  # both sets live in args.data
    for stage in STAGES:
        checkpoint.load_weights(str(args.root / stage), parts, ctx.layout)
        ground_metrics, ground_records = grounding.evaluate_grounding(ground_items, generate, settings)
        mcq_metrics, mcq_records = mcq.evaluate_mcq(mcq_items, generate, settings=settings)
        chosen = collections.Counter(r["chosen"] for r in mcq_records)
        result["checkpoints"][stage] = {
            "grounding": {k: v for k, v in ground_metrics.items() if k not in ("settings", "prompt_template")},
            "mcq": {k: v for k, v in mcq_metrics.items() if k not in ("settings", "reasoning")},
            "mcq_chosen": dict(chosen.most_common()),
            "grounding_examples": [r["response"] for r in ground_records[:4]],
        }
        row = result["checkpoints"][stage]
        print_row(stage, row["grounding"], row["mcq"]["accuracy"])
    write_result(OUT, result)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
