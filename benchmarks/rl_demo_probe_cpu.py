"""What the demo's General-RL stage learned: T=1 samples of the SFT and rl_general checkpoints on the counting
prompts (the training ones, rl_counting.jsonl, and held-out ones of another seed), scored by the outcome reward;
figures to benchmarks/results/rl_demo_probe_cpu.json.

    .venv/bin/python benchmarks/rl_demo_probe_cpu.py [--root runs/demo_chain] [--samples 8]

Per checkpoint and prompt set: the share of answers holding a number, the mean outcome, the mean outcome per
reference answer, the most frequent answers and what always giving each answer would score (the chance lines).
One process, the rl_general stage's config on one rank; 2 new tokens, as in the stage.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.insert(0, str(REPO))
from benchmarks.common import cpu_description, demo_stage_model, git_state, write_result  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "rl_demo_probe_cpu.json"
HELD_OUT_SEED = 7


def probe(rollout, tokenizer, records: list[dict], samples: int, max_new_tokens: int) -> dict:
    import torch

    from keye_train.posttrain.rewards import build_reward
    from keye_train.posttrain.rewards.match import parse_numbers
    from keye_train.posttrain.rl_data import chat_prompt_ids
    from keye_train.posttrain.rollout import Prompt, SamplingParams

    outcome = build_reward("outcome")
    stops = (tokenizer.ids.im_end, tokenizer.ids.pad)
    rewards, numbers, by_answer, answers = [], [], collections.defaultdict(list), collections.Counter()
    for start in range(0, len(records), 16):
        chunk = records[start : start + 16]
        prompts = [Prompt(torch.tensor(chat_prompt_ids(tokenizer, r["prompt"]), dtype=torch.long)) for r in chunk]
        params = [SamplingParams(max_new_tokens=max_new_tokens, stop_ids=stops, seed=start + i) for i in range(16)]
        out = rollout.generate(prompts, params[: len(chunk)], samples)
        rollout.release()
        for i, record in enumerate(chunk):
            for sample in out.samples[i * samples : (i + 1) * samples]:
                tokens = sample.tokens[:-1] if sample.tokens and sample.tokens[-1] in stops else sample.tokens
                text = tokenizer.decode(tokens)
                reward = outcome(text, record)
                rewards.append(reward)
                numbers.append(float(bool(parse_numbers(text))))
                by_answer[record["answer"]].append(reward)
                answers[text.strip()] += 1
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "responses": len(rewards),
        "has_number": mean(numbers),
        "outcome": mean(rewards),
        "outcome_by_reference": {a: mean(v) for a, v in sorted(by_answer.items())},
        "top_answers": answers.most_common(6),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "demo_chain")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    from data_pipeline.rl_demo import counting_prompts
    from keye_train import checkpoint
    from keye_train.posttrain.evaluation.jsonl import read_jsonl
    from keye_train.posttrain.rollout import Rollout

    cfg, ctx, tokenizer, parts = demo_stage_model("rl_general")
    rollout = Rollout(parts, cfg.model, tokenizer.ids, slots=16 * args.samples, capacity=64, prefill_tokens=1024)
    sets = {
        "training": [record for _, record in read_jsonl(REPO / cfg.rl.prompts)],
        "held_out": counting_prompts(64, seed=HELD_OUT_SEED, max_count=2),
    }
    result = {
        "benchmark": "rl_demo_probe_cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": cpu_description(),
        **git_state(),
        "samples_per_prompt": args.samples,
        "max_new_tokens": cfg.rollout.sampling.max_new_tokens,
        "always_answer": {
            name: {a: n / len(records) for a, n in collections.Counter(r["answer"] for r in records).items()}
            for name, records in sets.items()
        },
        "checkpoints": {},
    }
    for stage in ("sft", "rl_general"):
        checkpoint.load_weights(str(args.root / stage), parts, ctx.layout)
        result["checkpoints"][stage] = {
            name: probe(rollout, tokenizer, records, args.samples, cfg.rollout.sampling.max_new_tokens)
            for name, records in sets.items()
        }
        for name, row in result["checkpoints"][stage].items():
            print(
                f"{stage:<11} {name:<9} number {row['has_number']:.3f} outcome {row['outcome']:.3f} "
                f"{row['top_answers'][:3]}"
            )
    write_result(OUT, result)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
