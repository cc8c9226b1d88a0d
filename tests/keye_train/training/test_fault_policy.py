"""Operations on real runs: preemption by signal, bad steps (non-finite, spikes, empty batches), the hang watchdog."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import QUIET, cli_env, finished, keye_train, start_keye_train

FAST = [*QUIET, "train.global_batch=2", "train.seq_length=128", "optim.warmup_steps=0"]


def logged_steps(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes(tmp_path):
    args = [*FAST, "parallel.nproc=2", "parallel.ep=2", "checkpoint.interval=1000", f"run_dir={tmp_path}"]
    run = subprocess.Popen(
        [sys.executable, "-m", "keye_train.cli", *args, "train.steps=500"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    skip = start_keye_train(*args, f"run_dir={tmp_path / 'skip'}")  # the two policies' runs side by side
    abort = start_keye_train(*args, "train.nonfinite_policy=abort", f"run_dir={tmp_path / 'abort'}")
    done = finished(skip)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = logged_steps(tmp_path / "skip")
    assert [r["update_skipped"] for r in rows] == [0.0, 1.0, 0.0]
    assert "step 2: non-finite gradients or loss, update skipped" in done.stdout
    assert all(r["loss"] == r["loss"] for r in rows)  # the poisoned update never reached the weights
    done = finished(abort)
    assert done.returncode != 0
    assert "non-finite gradients or loss at step 2" in done.stderr


def test_a_slow_step_prints_the_stacks_and_bad_policies_are_named(tmp_path):
    slow = start_keye_train(
        *FAST, "parallel.nproc=1", "train.steps=1", "train.hang_timeout_s=0.01", f"run_dir={tmp_path}"
    )
    refused = start_keye_train(*FAST, "train.nonfinite_policy=ignore", f"run_dir={tmp_path / 'refused'}")
    done = finished(slow)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "most recent call first" in done.stderr and "train_step" in done.stderr
    done = finished(refused)
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
    args = [
        *FAST,
        "parallel.nproc=1",
        "train.steps=6",
        "train.loss_spike_factor=0.01",
        "train.loss_spike_window=2",
        "train.max_nonfinite_skips=1",
        f"run_dir={tmp_path}",
    ]
    refused = start_keye_train(*FAST, "train.loss_spike_window=0", f"run_dir={tmp_path / 'refused'}")
    done = keye_train(*args)
    assert done.returncode != 0
    assert [r["update_skipped"] for r in logged_steps(tmp_path)] == [0.0, 0.0, 1.0]
    assert "step 3: loss spike (" in done.stdout and "update skipped (1 in a row)" in done.stdout
    assert "loss spike (" in done.stderr and "at step 4 (2 bad steps in a row" in done.stderr
    done = finished(refused)
    assert done.returncode == 2 and "train.loss_spike_window=0" in done.stderr


def test_a_resumed_run_continues_the_same_offline_wandb_run(tmp_path):
    args = [
        *FAST,
        "parallel.nproc=1",
        "logging.wandb_mode=offline",
        "logging.wandb_group=chain_x",
        f"run_dir={tmp_path}",
    ]
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


def test_an_empty_global_batch_never_updates_and_counts_under_the_bad_step_policy():
    from types import SimpleNamespace

    from keye_train.training.fault_policy import BadStepPolicy

    train = SimpleNamespace(
        loss_spike_factor=0.0,
        loss_spike_window=4,
        nonfinite_policy="skip",
        max_nonfinite_skips=2,
        inject_nonfinite_at_step=-1,
    )
    lines = []
    policy = BadStepPolicy(train, device=None, log=lines.append)
    assert "no supervised tokens" in policy.empty(0) and "no supervised tokens" in policy.empty(1)
    assert policy.empty_steps == 2 and policy.streak == 2 and lines[-1].startswith("step 2: no supervised tokens")
    resumed = BadStepPolicy(train, device=None, log=lines.append)
    resumed.load_state_dict(policy.state_dict())  # a checkpoint carries the count and the streak
    assert (resumed.empty_steps, resumed.streak) == (2, 2)
    with pytest.raises(RuntimeError, match="at step 3 \\(3 bad steps in a row"):
        resumed.empty(2)
    train.nonfinite_policy = "abort"
    with pytest.raises(RuntimeError, match="no supervised tokens in the global batch"):
        BadStepPolicy(train, device=None, log=lines.append).empty(0)


def test_a_run_on_nothing_but_rejected_samples_never_updates_the_weights(tmp_path):
    import numpy as np

    from tests.helpers import TEST_DATA, corrupt_copy

    corrupt_copy(TEST_DATA / "shards", tmp_path / "shards", per_shard=1000)  # every video and every record
    args = [
        *FAST,
        "parallel.nproc=1",
        f"data.shards={tmp_path / 'shards'}",
        "train.max_nonfinite_skips=10",
        f"run_dir={tmp_path / 'run'}",
        "checkpoint.interval=1",
    ]
    # the default streak limit of 3, in a run of its own beside the two below
    streak = start_keye_train(
        *[a for a in args if "max_nonfinite" not in a], "train.steps=8", f"run_dir={tmp_path / 'abort'}"
    )
    done = keye_train(*args, "train.steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    done = keye_train(*args, "train.steps=3")  # resumed: the count and the LR schedule carry on
    assert done.returncode == 0, done.stderr[-3000:]
    rows = logged_steps(tmp_path / "run")
    assert [r["train/empty_steps"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["update_skipped"] == 1.0 and r["supervised_tokens"] == 0.0 for r in rows)
    assert len({r["lr"] for r in rows}) == 1  # the schedule follows applied updates: none
    assert "no supervised tokens in the global batch" in done.stdout
    ckpt = tmp_path / "run" / "checkpoints"
    with (
        np.load(ckpt / "step_00000002" / "rank_00000.npz") as a,
        np.load(ckpt / "step_00000003" / "rank_00000.npz") as b,
    ):
        assert all(np.array_equal(a[k], b[k]) for k in a.files if k.startswith("model."))
    done = finished(streak)
    assert done.returncode != 0 and "at step 4 (4 bad steps in a row" in done.stderr
