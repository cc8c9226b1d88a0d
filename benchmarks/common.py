"""What every benchmark records next to its figures: the device, the code and the process's memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_description() -> dict:
    model = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count()}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def git_state() -> dict:
    """HEAD and whether the working tree differs from it (then HEAD alone does not identify the code).
    KEYE_COMMIT, when set, names the code instead: a device machine's copy of the tree may carry a stale .git."""
    if os.environ.get("KEYE_COMMIT"):
        return {"commit": os.environ["KEYE_COMMIT"], "worktree_dirty": None}
    try:
        return {"commit": _git("rev-parse", "HEAD"), "worktree_dirty": bool(_git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):  # a copy without .git
        return {"commit": "unknown", "worktree_dirty": None}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_result(path: Path, result: dict) -> None:
    """The benchmark's JSON record (rewritten whole, so a script may call it after every row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def demo_stage_model(stage: str):
    """One rank (no EP) of a stage of the demo chain in this process, weights initialised but not loaded:
    (config, rank context, tokenizer, model parts). Every stage of the chain has the same model."""
    from data_pipeline.tokenizer import KeyeTokenizer
    from keye_train.cli.chain import load_chain, stage_arguments
    from keye_train.cli.spawn import single_process_env
    from keye_train.config.compose import load_checked_config
    from keye_train.model.builder import build_model, initialize_weights
    from keye_train.training.setup import start_rank

    chain = load_chain("demo")
    index = [s.name for s in chain.stages].index(stage)
    one_rank = ["parallel.nproc=1", "parallel.ep=1", "logging.wandb_mode=disabled"]
    cfg, _ = load_checked_config(stage_arguments(chain, index, one_rank), 1, check_data=False)
    single_process_env()
    ctx = start_rank(cfg)
    tokenizer = KeyeTokenizer(cfg.data.tokenizer)
    cfg.model.tokens = tokenizer.ids
    parts = build_model(cfg.model, cfg.parallel, ctx.dtype, ctx.device.type == "cuda", ctx.placement)
    initialize_weights(parts, cfg.model, cfg.train.seed)
    return cfg, ctx, tokenizer, parts
