"""Resume after a hard kill continues bit-identically, and an unfinished checkpoint is never 'latest'."""

import signal
import subprocess
import sys
import time

from keye_train import checkpoint
from tests.helpers import QUIET, cli_env, logged_losses

ARGS = [
    *QUIET,
    "parallel.nproc=1",
    "train.steps=6",
    "train.global_batch=2",
    "train.seq_length=128",
    "checkpoint.interval=3",
    "optim.warmup_steps=2",
]


def start(run_dir) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "keye_train.cli", *ARGS, f"run_dir={run_dir}"],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_and_resume_is_bit_identical(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert start(straight).wait(timeout=600) == 0
    proc = start(interrupted)
    marker = interrupted / "checkpoints" / "step_00000003" / "meta.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "timed out"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.latest_checkpoint(interrupted).name == "step_00000003"
    assert start(interrupted).wait(timeout=600) == 0
    expected, got = logged_losses(straight), logged_losses(interrupted)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4, 5, 6]
    assert got == expected  # exact float equality


def test_partial_checkpoint_is_never_latest(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "meta.json").write_text("{}")
    (root / "step_00000004.partial").mkdir()
    (root / "step_00000004.partial" / "meta.json").write_text("{}")
    (root / "step_00000006").mkdir()  # renamed but no meta.json: not complete
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000002"
