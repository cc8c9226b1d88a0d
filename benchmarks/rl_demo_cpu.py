"""The reward of the demo chain's RL stages on the toy tasks; figures to benchmarks/results/rl_demo_cpu.json.

    .venv/bin/python benchmarks/rl_demo_cpu.py [--root runs/demo_chain] [--no-run]

Runs `keye-train chain demo` (finished stages are skipped, so after a full demo run this only reads) and reads
each RL stage's metrics.jsonl: per step, the mean reward of every response the rollout scored (all sampling
rounds, before dynamic sampling drops the equal-reward groups), each reward term's raw mean over the same
responses (`term_mean`: the outcome apart from an auxiliary term), the share of dropped groups, the GSPO loss and
the step time. The stages chain: rl_general starts from the SFT weights, rl_context from rl_general's, rl_video
from rl_context's. A reward that rises from the first steps to the last is the point of the demo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.insert(0, str(REPO))
from benchmarks.common import cpu_description, git_state, write_result  # noqa: E402

STAGES = ("rl_general", "rl_context", "rl_video")
OUT = REPO / "benchmarks" / "results" / "rl_demo_cpu.json"


def stage_curve(run_dir: Path) -> dict:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed stage re-logs its steps: the last wins
    steps = sorted(rows)
    reward = [rows[s]["data/rl_reward_sum"] / max(rows[s]["data/rl_rewards_scored"], 1) for s in steps]
    dropped = [rows[s]["data/rl_groups_dropped"] / max(rows[s]["data/rl_groups_generated"], 1) for s in steps]
    k = max(1, len(steps) // 4)
    names = sorted({key[len("data/rl_term_") : -len("_sum")] for r in rows.values() for key in r if "rl_term_" in key})
    terms = {  # each reward term's raw mean score over the same responses (the outcome apart from the rest)
        name: [rows[s].get(f"data/rl_term_{name}_sum", 0.0) / max(rows[s]["data/rl_rewards_scored"], 1) for s in steps]
        for name in names
    }
    summary = {f"{name}_first_{k}_last_{k}": [sum(curve[:k]) / k, sum(curve[-k:]) / k] for name, curve in terms.items()}
    return {
        "steps": steps,
        "reward_mean": reward,
        "term_mean": terms,
        **summary,
        "filtered_fraction": dropped,
        "loss": [rows[s]["loss"] for s in steps],
        "step_time_s": [rows[s]["step_time_s"] for s in steps],
        "responses_scored": [rows[s]["data/rl_rewards_scored"] for s in steps],
        f"reward_first_{k}": sum(reward[:k]) / k,
        f"reward_last_{k}": sum(reward[-k:]) / k,
        "reward_rises": sum(reward[-k:]) / k > sum(reward[:k]) / k,
        "empty_steps": sum(1 for s in steps if rows[s]["update_skipped"] and rows[s]["supervised_tokens"] == 0),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "demo_chain")
    parser.add_argument("--no-run", action="store_true", help="only read the stages' metrics")
    args = parser.parse_args()
    if not args.no_run:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        cmd = [
            sys.executable,
            "-m",
            "keye_train.cli",
            "chain",
            "demo",
            "logging.wandb_mode=disabled",
            "logging.progress_bar=false",
        ]
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
    from keye_train.cli.chain import load_chain, stage_arguments
    from keye_train.config.compose import load_config

    chain = load_chain("demo")
    result = {
        "benchmark": "rl_demo_cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": cpu_description(),
        **git_state(),
        "task": (
            "data_pipeline/rl_demo.py: rl_general counts 1-2 marks (rl_counting.jsonl, numeric match); rl_context "
            "counting and text-timeline grounding (rl_prompts.jsonl); rl_video grounding on the demo clips (tIoU)"
        ),
        "stages": {},
    }
    print(f"{'stage':<12} {'steps':>5} {'reward first':>13} {'reward last':>12} {'filtered':>9} {'s/step':>7}")
    for index, stage in enumerate(chain.stages):
        if stage.name not in STAGES:
            continue
        cfg = load_config(stage_arguments(chain, index, []))
        curve = stage_curve(args.root / stage.name)
        curve["shapes"] = {
            "group_size": cfg.rl.group_size,
            "prompts_per_step": cfg.rl.prompts_per_step,
            "max_new_tokens": cfg.rollout.sampling.max_new_tokens,
            "seq_length": cfg.train.seq_length,
            "ranks": cfg.parallel.nproc,
            "ep": cfg.parallel.ep,
            "lr": cfg.optim.lr,
            "rewards": [t.name for t in cfg.rl.rewards],
            "trainable": [str(t) for t in cfg.stage.trainable],
        }
        result["stages"][stage.name] = curve
        first, last = (
            [v for k, v in curve.items() if k.startswith("reward_first")],
            [v for k, v in curve.items() if k.startswith("reward_last")],
        )
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        print(
            f"{stage.name:<12} {len(curve['steps']):>5} {first[0]:>13.3f} {last[0]:>12.3f} "
            f"{mean(curve['filtered_fraction']):>9.2f} {mean(curve['step_time_s']):>7.1f}"
        )
    write_result(OUT, result)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
