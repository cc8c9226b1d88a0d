"""The demo chain's MOPD stage: per-teacher reverse KL over the steps and the SPRR mismatch counters; figures to
benchmarks/results/mopd_demo_cpu.json.

    .venv/bin/python benchmarks/mopd_demo_cpu.py [--root runs/demo_chain] [--no-run]

Runs `keye-train chain demo` (finished stages are skipped, so after a full demo run this only reads) and reads the
mopd stage's metrics.jsonl: per step and teacher, the responses routed and aligned, the mean reverse KL
KL(pi_S || pi_T) over their response tokens (the data source's sums, added over the DP ranks), the mean advantage,
and the SPRR turns checked and rejected by reason.
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

STAGE = "mopd"
OUT = REPO / "benchmarks" / "results" / "mopd_demo_cpu.json"
REASONS = ("visual_tokens", "frame_sampling", "template", "mrope", "echo", "length")


def teacher_curves(rows: dict, teacher: str) -> dict:
    steps = sorted(rows)
    get = lambda s, key: rows[s].get(f"data/mopd_{teacher}_{key}", 0.0)  # noqa: E731
    tokens = [get(s, "tokens") for s in steps]
    kl = [get(s, "reverse_kl") / t if t else None for s, t in zip(steps, tokens)]
    adv = [get(s, "adv") / t if t else None for s, t in zip(steps, tokens)]
    seen = [v for v in kl if v is not None]
    k = max(1, len(seen) // 4)
    return {
        "routed_aligned": [get(s, "routed") for s in steps],
        "response_tokens": tokens,
        "reverse_kl": kl,
        "advantage_mean": adv,
        f"reverse_kl_first_{k}": sum(seen[:k]) / k if seen else None,
        f"reverse_kl_last_{k}": sum(seen[-k:]) / k if seen else None,
        "checked": sum(get(s, "checked") for s in steps),
        "mismatch": {r: sum(get(s, f"mismatch_{r}") for s in steps) for r in REASONS},
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "demo_chain")
    parser.add_argument("--no-run", action="store_true", help="only read the stage's metrics")
    args = parser.parse_args()
    if not args.no_run:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, "-m", "keye_train.cli", "chain", "demo"]
        subprocess.run(
            [*cmd, "logging.wandb_mode=disabled", "logging.progress_bar=false"], cwd=REPO, env=env, check=True
        )
    from keye_train.cli.chain import load_chain, stage_arguments
    from keye_train.config.compose import load_config

    chain = load_chain("demo")
    index = [s.name for s in chain.stages].index(STAGE)
    cfg = load_config(stage_arguments(chain, index, []))
    rows = {}
    for line in (args.root / STAGE / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed stage re-logs its steps: the last wins
    teachers = {t.name: teacher_curves(rows, t.name) for t in cfg.mopd.teachers}
    result = {
        "benchmark": "mopd_demo_cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": cpu_description(),
        **git_state(),
        "config": {
            "mode": str(cfg.mopd.mode),
            "top_k": cfg.mopd.top_k,
            "teachers": {t.name: str(t.checkpoint) for t in cfg.mopd.teachers},
            "routes": [{"teacher": r.teacher, "modality": r.modality, "task": r.task} for r in cfg.mopd.routes],
            "default_teacher": cfg.mopd.default_teacher,
            "student_init": f"{chain.run_root}/{chain.stages[index - 1].name}",
            "group_size": cfg.rl.group_size,
            "prompts_per_step": cfg.rl.prompts_per_step,
            "max_new_tokens": cfg.rollout.sampling.max_new_tokens,
            "lr": cfg.optim.lr,
            "ranks": cfg.parallel.nproc,
            "ep": cfg.parallel.ep,
        },
        "steps": sorted(rows),
        "loss": [rows[s]["loss"] for s in sorted(rows)],
        "step_time_s": [rows[s]["step_time_s"] for s in sorted(rows)],
        "teacher_loads_per_step": [rows[s].get("data/mopd_teacher_loads") for s in sorted(rows)],
        "teachers": teachers,
    }
    for name, curve in teachers.items():
        first = [v for k, v in curve.items() if k.startswith("reverse_kl_first")][0]
        last = [v for k, v in curve.items() if k.startswith("reverse_kl_last")][0]
        print(
            f"{name:<12} checked {curve['checked']:>5.0f}  reverse KL {first} -> {last}  mismatch {curve['mismatch']}"
        )
    write_result(OUT, result)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
