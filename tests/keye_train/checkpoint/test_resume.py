"""Resume after a hard kill continues bit-identically, and an unfinished checkpoint is never 'latest'."""

import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from keye_train import checkpoint
from keye_train.config import ParallelConfig, tiny
from parallel.layout import check_layout
from tests.helpers import QUIET, cli_env, logged_losses

ARGS = [
    *QUIET,
    "parallel.nproc=1",
    "train.steps=4",
    "train.global_batch=2",
    "train.seq_length=128",
    "checkpoint.interval=2",
    "optim.warmup_steps=2",
]
TP2_EP2 = ["parallel.nproc=4", "parallel.tp=2", "parallel.ep=2"]
FIVE = ["train.steps=5", "checkpoint.interval=2", "checkpoint.keep_last=0"]  # checkpoints at steps 2 and 4
LAYOUT_TOL = 1e-6  # relative loss difference between layouts: fp32 with another reduction order


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
    reference = start(straight)  # beside the interrupted run: one process (one thread) each
    proc = start(interrupted)
    marker = interrupted / "checkpoints" / "step_00000002" / "meta.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "timed out"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.latest_checkpoint(interrupted).name == "step_00000002"
    assert start(interrupted).wait(timeout=600) == 0
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    expected, got = logged_losses(straight), logged_losses(interrupted)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4]  # step 4's loss follows step 3's restored Adam update
    assert got == expected  # exact float equality


def test_partial_checkpoint_is_never_latest(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "meta.json").write_text("{}")
    (root / "step_00000004.partial").mkdir()
    (root / "step_00000004.partial" / "meta.json").write_text("{}")
    (root / "step_00000006").mkdir()  # renamed but no meta.json: not complete
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000002"


def run_cli(run_dir, *overrides) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "keye_train.cli", *ARGS, f"run_dir={run_dir}", *overrides],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def resume_from(source_run, step: int, run_dir) -> None:
    """A run directory whose latest checkpoint is source_run's at `step`."""
    import shutil

    name = f"step_{step:08d}"
    shutil.copytree(source_run / "checkpoints" / name, run_dir / "checkpoints" / name)


@pytest.fixture(scope="module")
def tp2_ep2_run(tmp_path_factory):
    """The uninterrupted TP 2 x EP 2 run (4 ranks, DP 2, experts split over EP, distributed optimizer over DP: each
    rank holds half of its fp32 main weights and Adam moments) that the cross-layout resumes start from."""
    straight = tmp_path_factory.mktemp("tp2_ep2") / "straight"
    run_cli(straight, *TP2_EP2, *FIVE)
    return straight


def test_a_resume_under_another_dp_size_continues_with_the_same_losses(tp2_ep2_run, tmp_path):
    """The DP 2 checkpoint at step 2 resumes on one rank (DP 1, no TP or EP): steps 3-5 see the same global
    batches with the same state (the DP shards of the optimizer joined), so their losses are the uninterrupted
    run's up to fp32 summation order. Without a rank's optimizer index the cross-layout load refuses, naming
    checkpoint.init_from (the CLI run surfaces the same error before its first step)."""
    assert (tp2_ep2_run / "checkpoints" / "step_00000002" / "rank_00001.optim.json").is_file()
    resumed = tmp_path / "resumed"
    resume_from(tp2_ep2_run, 2, resumed)
    run_cli(resumed, "parallel.nproc=1", *FIVE)
    expected, got = logged_losses(tp2_ep2_run), logged_losses(resumed)
    assert sorted(got) == [3, 4, 5]
    for step in (3, 4, 5):
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])
    old_format = tmp_path / "old_format"
    resume_from(tp2_ep2_run, 2, old_format)
    written = old_format / "checkpoints" / "step_00000002"
    (written / "rank_00001.optim.json").unlink()
    one_rank = check_layout(ParallelConfig(), tiny().lm, tiny().vit, 1).record()
    with pytest.raises(RuntimeError, match="lacks rank_00001.optim.json.*checkpoint.init_from"):
        checkpoint.load(written, SimpleNamespace(lm=None), None, one_rank)  # refused before any array is read


def test_a_tp2_ep2_checkpoint_resumes_under_pp2_cp2_and_back_with_the_same_losses(tp2_ep2_run, tmp_path):
    """PP 2 x CP 2 (DP 1) resumes the TP 2 x EP 2 checkpoint at step 2 for steps 3-5 (checkpointing at 4); TP 2 x
    EP 2 resumes that for step 5. Each resumed step sees the uninterrupted TP 2 x EP 2 run's batch and state: the
    same loss up to fp32 summation order (measured: <= 8e-8 relative under PP 2 x CP 2, bit-equal back under TP 2
    x EP 2). train.steps is 5 in every run: the LR schedule decays to it."""
    second = ["parallel.nproc=4", "parallel.pp=2", "parallel.cp=2"]
    there, back = tmp_path / "there", tmp_path / "back"
    resume_from(tp2_ep2_run, 2, there)
    run_cli(there, *second, *FIVE)
    resume_from(there, 4, back)
    run_cli(back, *TP2_EP2, *FIVE)
    expected = logged_losses(tp2_ep2_run)
    for got in (logged_losses(there), logged_losses(back)):
        assert sorted(got) in ([3, 4, 5], [5])
        for step, loss in got.items():
            assert abs(loss - expected[step]) <= LAYOUT_TOL * abs(expected[step]), (step, loss, expected[step])
