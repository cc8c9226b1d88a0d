"""Shared helpers for tests that run the real CLI in a subprocess."""

import os
import subprocess
import sys

QUIET = ["~recipe", "model=tiny", "logging.wandb_mode=disabled", "logging.progress_bar=false"]


def cli_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")


def keye_train(*args: str, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "keye_train.cli", *args]
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout, **popen)


def logged_losses(run_dir) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl; a resumed run re-logs steps after its checkpoint, the last wins."""
    import json

    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out
