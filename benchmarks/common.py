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
