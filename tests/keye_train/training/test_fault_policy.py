"""Operations on real runs: preemption by signal, non-finite gradients, the hang watchdog."""

import json
import signal
import subprocess
import sys
import time

from tests.helpers import QUIET, cli_env, keye_train

FAST = [*QUIET, "train.global_batch=2", "train.seq_length=128", "optim.warmup_steps=0"]


def logged_steps(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes(tmp_path):
    args = [*FAST, "parallel.nproc=2", "parallel.ep=2", "checkpoint.interval=1000", f"run_dir={tmp_path}"]
    run = subprocess.Popen([sys.executable, "-m", "keye_train.cli", *args, "train.steps=500"], env=cli_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(logged_steps(tmp_path)) < 2 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)  # what a scheduler sends before preempting the job
    stdout, stderr = run.communicate(timeout=300)
    assert "preempted" in stdout, stderr[-3000:]
    last = logged_steps(tmp_path)[-1]["step"]
    assert (tmp_path / "checkpoints" / f"step_{last:08d}" / "meta.json").is_file()
    done = keye_train(*args, f"train.steps={last + 2}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{last:08d}'}" in done.stdout
    assert logged_steps(tmp_path)[-1]["step"] == last + 2


def test_a_nonfinite_gradient_skips_the_update_or_aborts_by_policy(tmp_path):
    args = [*FAST, "parallel.nproc=1", "train.steps=3", "train.inject_nonfinite_at_step=1"]
    done = keye_train(*args, f"run_dir={tmp_path / 'skip'}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = logged_steps(tmp_path / "skip")
    assert [r["update_skipped"] for r in rows] == [0.0, 1.0, 0.0]
    assert "step 2: non-finite gradients or loss, update skipped" in done.stdout
    assert all(r["loss"] == r["loss"] for r in rows)  # the poisoned update never reached the weights
    done = keye_train(*args, "train.nonfinite_policy=abort", f"run_dir={tmp_path / 'abort'}")
    assert done.returncode != 0
    assert "non-finite gradients or loss at step 2" in done.stderr


def test_a_slow_step_prints_the_stacks_and_bad_policies_are_named(tmp_path):
    done = keye_train(*FAST, "parallel.nproc=1", "train.steps=1", "train.hang_timeout_s=0.01", f"run_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "most recent call first" in done.stderr and "train_step" in done.stderr
    done = keye_train(*FAST, "train.nonfinite_policy=ignore", f"run_dir={tmp_path}")
    assert done.returncode == 2 and "train.nonfinite_policy='ignore'" in done.stderr


def test_the_spike_guard_judges_against_the_mean_of_accepted_losses():
    from keye_train.training.fault_policy import LossSpikeGuard

    guard = LossSpikeGuard(factor=2.0, window=3)
    assert [guard.is_spike(x) for x in (4.0, 3.0, 2.0)] == [False, False, False]  # filling the window
    assert guard.is_spike(6.1) and list(guard.recent) == [4.0, 3.0, 2.0]  # 6.1 > 2 x 3.0: rejected, not remembered
    assert not guard.is_spike(5.9) and list(guard.recent) == [3.0, 2.0, 5.9]
    assert not guard.is_spike(float("nan"))  # non-finite losses are the non-finite policy's business
    assert not LossSpikeGuard(factor=0.0, window=1).is_spike(1e9)  # off


def test_a_loss_spike_skips_the_update_then_aborts_after_the_allowed_streak(tmp_path):
    # factor 0.01: once two steps fill the window every later loss counts as a spike
    args = [*FAST, "parallel.nproc=1", "train.steps=6", "train.loss_spike_factor=0.01", "train.loss_spike_window=2",
            "train.max_nonfinite_skips=1", f"run_dir={tmp_path}"]
    done = keye_train(*args)
    assert done.returncode != 0
    assert [r["update_skipped"] for r in logged_steps(tmp_path)] == [0.0, 0.0, 1.0]
    assert "step 3: loss spike (" in done.stdout and "update skipped (1 in a row)" in done.stdout
    assert "loss spike (" in done.stderr and "at step 4 (2 bad steps in a row" in done.stderr
    done = keye_train(*FAST, "train.loss_spike_window=0", f"run_dir={tmp_path}")
    assert done.returncode == 2 and "train.loss_spike_window=0" in done.stderr


def test_a_resumed_run_continues_the_same_offline_wandb_run(tmp_path):
    args = [*FAST, "parallel.nproc=1", "logging.wandb_mode=offline", "logging.wandb_group=chain_x",
            f"run_dir={tmp_path}"]
    first = keye_train(*args, "train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = keye_train(*args, "train.steps=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    ids = {path.name.rsplit("-", 1)[1] for path in runs}
    assert len(runs) == 2 and len(ids) == 1, runs  # two sessions, one W&B run id
    saved = json.loads((tmp_path / "checkpoints" / "step_00000003" / "rank_00000.json").read_text())
    assert ids == {saved["run_id"]}
