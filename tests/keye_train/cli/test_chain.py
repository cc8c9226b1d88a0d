"""Stage chains: validation of every stage before the first runs, init_from between stages, skip and resume."""

import json
import signal
import subprocess
import sys
import time

import yaml

from tests.helpers import DATA, cli_env, ensure_test_data, finished, keye_train, start_keye_train

COMMON = [
    "model=tiny",
    "logging.wandb_mode=disabled",
    "logging.progress_bar=false",
    *DATA,
    "parallel.nproc=1",
    "parallel.tp=1",
    "parallel.pp=1",
    "parallel.ep=1",
    "train.global_batch=2",
    "train.seq_length=128",
    "optim.warmup_steps=0",
    "checkpoint.interval=1000",
]


def write_chain(path, run_root, second_steps: int, second_extra=()) -> str:
    chain = {
        "run_root": str(run_root),
        "common": COMMON,
        "stages": [
            {"name": "first", "recipe": "stage0_projector", "overrides": ["train.steps=2"]},
            {
                "name": "second",
                "recipe": "stage1_pretrain",
                "overrides": [f"train.steps={second_steps}", *second_extra],
            },
        ],
    }
    path.write_text(yaml.safe_dump(chain))
    return str(path)


def rows(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_stage_is_checked_before_the_first_runs_and_errors_name_stage_and_key(tmp_path):
    ensure_test_data()
    chains = [
        write_chain(tmp_path / "bad.yaml", tmp_path / "runs", 2, ["train.stepz=3"]),
        write_chain(tmp_path / "nodata.yaml", tmp_path / "runs", 2, [f"data.shards={tmp_path / 'missing'}"]),
        "no_such_chain",
    ]
    bad, nodata, unknown = [start_keye_train("chain", chain) for chain in chains]  # side by side
    done = finished(bad)
    assert done.returncode == 2
    assert "chain stage 'second' (recipe stage1_pretrain)" in done.stderr and "stepz" in done.stderr
    done = finished(nodata)
    assert done.returncode == 2 and "chain stage 'second'" in done.stderr and "data.shards" in done.stderr
    assert not (tmp_path / "runs").exists()  # the valid first stages did not start
    done = finished(unknown)
    assert done.returncode == 2 and "known chains: demo, dsa_locality_cpu, keye_vl2" in done.stderr


def test_a_chain_inits_each_stage_from_the_last_survives_preemption_and_continues(tmp_path):
    ensure_test_data()
    runs = tmp_path / "runs"
    chain = write_chain(tmp_path / "chain.yaml", runs, 500)
    run = subprocess.Popen(
        [sys.executable, "-m", "keye_train.cli", "chain", chain],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 400
    while len(rows(runs / "second")) < 2 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)  # the chain forwards it to the running stage
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode != 0, stderr[-3000:]
    assert f"initialised from {runs / 'first'}" in stdout
    assert "preempted" in stdout and "chain demo" not in stdout
    assert "stage second stopped" in stdout
    assert len(rows(runs / "first")) == 2
    last = rows(runs / "second")[-1]["step"]
    assert (runs / "second" / "checkpoints" / f"step_{last:08d}" / "meta.json").is_file()

    chain = write_chain(tmp_path / "chain.yaml", runs, last + 2)  # the user shortens the stage, then re-runs
    done = keye_train("chain", chain)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage first already finished" in done.stdout
    assert f"resumed from {runs / 'second' / 'checkpoints' / f'step_{last:08d}'}" in done.stdout
    assert rows(runs / "second")[-1]["step"] == last + 2
    assert "all 2 stages finished" in done.stdout
    again = keye_train("chain", chain)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2
