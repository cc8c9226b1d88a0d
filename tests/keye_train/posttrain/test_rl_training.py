"""An RL stage end to end on the tiny model (1 rank, CPU): rollouts on the policy, rewards, dynamic sampling,
GSPO through the trainer's schedule. The loss and the reward are finite and the weights move; stopping at a
checkpoint and resuming gives the uninterrupted run's steps exactly."""

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import QUIET, cli_env, ensure_test_data, finished, start_process

STEPS = 4


def overrides(run_dir, prompts):
    return [
        *QUIET,
        "parallel.nproc=1",
        "rl.enabled=true",
        f"rl.prompts={prompts}",
        "rl.group_size=4",
        "rl.prompts_per_step=2",
        "rollout.sampling.max_new_tokens=5",
        "rollout.slots=8",
        "rollout.capacity=64",
        f"train.steps={STEPS}",
        "train.global_batch=1",
        "train.seq_length=128",
        "optim.warmup_steps=0",
        "optim.lr=1e-2",
        "optim.min_lr=1e-2",
        "checkpoint.interval=0",
        f"run_dir={run_dir}",
    ]


def start_worker(tmp_path, name, stop_at, run_dir, prompts) -> tuple[subprocess.Popen, object]:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "tests.keye_train.posttrain.rl_train_worker", str(out), str(stop_at)]
    return start_process(cmd + overrides(run_dir, prompts)), out


def report(started) -> dict:
    process, out = started
    done = finished(process)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data_pipeline.rl_demo import write_counting_prompts

    ensure_test_data()
    tmp = tmp_path_factory.mktemp("rl")
    prompts = write_counting_prompts(tmp / "prompts.jsonl", count=16)
    straight = start_worker(tmp, "straight", STEPS, tmp / "straight", prompts)  # beside the interrupted pair
    first = report(start_worker(tmp, "first", 2, tmp / "resumed", prompts))
    second = report(start_worker(tmp, "second", STEPS, tmp / "resumed", prompts))
    return report(straight), first, second


def test_an_rl_run_trains_with_finite_loss_and_reward(runs):
    straight, _, _ = runs
    rows = straight["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["update_skipped"] == 0.0
        assert r["data/rl_rewards_scored"] >= 2 * 4  # at least one round of 2 prompts x G
        reward = r["data/rl_reward_sum"] / r["data/rl_rewards_scored"]
        assert 0.0 <= reward <= 1.0
        assert r["rl/responses"] == 8  # two informative groups of 4 after dynamic sampling
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        # the rollout samples at T=1: its log-probs are the trainer's recompute of pi_old (fp32)
        assert r["data/rl_logp_gap_sum"] / r["data/rl_response_tokens"] < 1e-5
    assert straight["moved"] > 1e-4  # the policy moves


def test_resume_mid_rl_reproduces_the_uninterrupted_run(runs):
    straight, first, second = runs
    assert first["start"] == 0 and second["start"] == 2
    assert first["rows"] + second["rows"] == straight["rows"]  # exact floats: rollouts, rewards, losses
    assert second["digest"] == straight["digest"]


def test_video_prompts_roll_out_and_train_on_their_clips(tmp_path):
    """Prompts with a demo clip: the engine's T=1 log-probs equal the trainer's recompute with the ViT in the
    forward, and the step trains."""
    data = ensure_test_data()
    prompts = data / "rl_clip_grounding.jsonl"
    args = [a for a in overrides(tmp_path / "run", prompts) if not a.startswith("train.steps")]
    out = tmp_path / "video.json"
    cmd = [sys.executable, "-m", "tests.keye_train.posttrain.rl_train_worker", str(out), "1"]
    cmd += [*args, "train.steps=1", "rollout.capacity=256", "train.seq_length=256"]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert math.isfinite(row["loss"]) and row["update_skipped"] == 0.0 and row["rl/responses"] == 8
    assert row["data/rl_logp_gap_sum"] / row["data/rl_response_tokens"] < 1e-5


def test_context_resampling_under_data_parallel_2(tmp_path):
    """ContextRL re-sampling at DP 2 (gloo, one counting prompt per rank, rl_train_worker.ReportingJudge): every
    rank joins each re-sampling round (collective generate, a rank without requests too), the counters summed over
    the ranks add up, and the step trains on the re-sampled groups with the rollout's log-probs."""
    from data_pipeline.rl_demo import write_counting_prompts

    ensure_test_data()
    prompts = write_counting_prompts(tmp_path / "prompts.jsonl", count=8)
    swap = {"parallel.nproc=1": "parallel.nproc=2", "train.global_batch=1": "train.global_batch=2"}
    args = [swap.get(a, a) for a in overrides(tmp_path / "run", prompts) if not a.startswith("train.steps")]
    args += [
        "train.steps=1",
        "train.seq_length=256",  # the conditioned prompt (prompt, failed answer, report turn) is ~180 tokens
        "rollout.capacity=256",
        "rl.oversample_factor=1",
        "rl.recovered_samples=conditioned",
        "rl.judge=tests.keye_train.posttrain.rl_train_worker:reporting_judge",
        "rl.positive_threshold=1.0",  # even_fraction: a group is all-negative unless a response is all even ids
    ]
    out = tmp_path / "dp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "tests.keye_train.posttrain.rl_train_worker", str(out), "1", *args]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["data/rl_groups_all_negative"] >= 2  # both ranks' first groups (a response of all even ids is rare)
    assert row["data/rl_groups_all_negative"] == (
        row["data/rl_resample_reports_unusable"] + row["data/rl_resample_too_long"] + row["data/rl_groups_resampled"]
    )
    assert row["data/rl_groups_resampled"] >= 1 and row["data/rl_recovered_kept"] >= 1
    assert row["data/rl_recovered_responses"] == 4 * row["data/rl_groups_resampled"]
    assert math.isfinite(row["loss"]) and row["update_skipped"] == 0.0 and row["rl/responses"] >= 4
    assert row["data/rl_logp_gap_sum"] / row["data/rl_response_tokens"] < 1e-5
