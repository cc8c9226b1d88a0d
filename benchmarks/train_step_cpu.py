"""Time the tiny model's training step on the CPU (one process, gloo) and record the figures as JSON.

.venv/bin/python benchmarks/train_step_cpu.py [--steps 5] [--warmup 2] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_description, git_state, peak_rss_mib, write_result  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "train_step_cpu.json"


def run(steps: int, warmup: int, overrides: list[str], run_dir: str) -> dict:
    import torch

    from data_pipeline.demo import make_demo
    from keye_train.cli.spawn import single_process_env
    from keye_train.config.compose import load_config
    from keye_train.training import build_trainer
    from parallel.layout import destroy_process_groups

    data = Path(run_dir) / "data"  # the demo corpus, built fresh (a few seconds)
    make_demo(data, log=lambda _: None)
    cfg = load_config(
        [
            "parallel.nproc=1",
            "parallel.ep=1",
            "logging.wandb_mode=disabled",
            "logging.progress_bar=false",
            "checkpoint.resume=false",
            f"run_dir={run_dir}",
            f"data.shards={data / 'shards'}",
            f"data.tokenizer={data / 'tokenizer.json'}",
            "data.workers=0",
            f"train.steps={warmup + steps}",
            *overrides,
        ]
    )
    single_process_env()
    trainer = build_trainer(cfg)
    try:
        for _ in range(warmup):
            trainer.train_step()
        times, losses = [], []
        for _ in range(steps):
            started = time.perf_counter()
            metrics = trainer.train_step()
            times.append(time.perf_counter() - started)
            losses.append(metrics["loss"])
    finally:
        destroy_process_groups()
    tokens = cfg.train.global_batch * cfg.train.seq_length
    median = statistics.median(times)
    return {
        "shapes": {
            "model": cfg.model.name,
            "seq_length": cfg.train.seq_length,
            "global_batch": cfg.train.global_batch,
            "tokens_per_step": tokens,
        },
        "settings": {
            "warmup_steps": warmup,
            "timed_steps": steps,
            "torch_threads": torch.get_num_threads(),
            "dtype": str(trainer.ctx.dtype),
            "overrides": overrides,
        },
        "figures": {
            "median_step_s": median,
            "min_step_s": min(times),
            "max_step_s": max(times),
            "step_times_s": times,
            "tokens_per_s": tokens / median,
            "peak_rss_mib": peak_rss_mib(),
            "last_loss": losses[-1],
        },
    }


def print_table(result: dict) -> None:
    shapes, figures = result["shapes"], result["figures"]
    rows = [
        ("model", shapes["model"]),
        ("seq_length x global_batch", f"{shapes['seq_length']} x {shapes['global_batch']}"),
        ("median step (s)", f"{figures['median_step_s']:.3f}"),
        ("min / max step (s)", f"{figures['min_step_s']:.3f} / {figures['max_step_s']:.3f}"),
        ("tokens/s", f"{figures['tokens_per_s']:.0f}"),
        ("peak RSS (MiB)", f"{figures['peak_rss_mib']:.0f}"),
    ]
    for name, value in rows:
        print(f"{name:<28}{value:>20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. train.seq_length=512")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="keye_bench_") as run_dir:
        measured = run(args.steps, args.warmup, args.overrides, run_dir)
    result = {
        "benchmark": "train_step_cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        **git_state(),
        "device": cpu_description(),
        **measured,
    }
    print_table(result)
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
