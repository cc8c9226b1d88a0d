"""`keye-train launch`: torchrun commands run for real on the CPU (two c10d nodes on one host), sbatch scripts
rendered for 1, 2 and 16 nodes, and a rendered script run end to end under stand-in srun / scontrol / sbatch:
SIGUSR1 to the batch shell checkpoints, requeues, and the rerun resumes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from keye_train.cli.launch import run as launch_main
from keye_train.config.compose import load_checked_config
from parallel.layout import require_trainable
from tests.helpers import QUIET, cli_env, ensure_test_data

TINY = [*QUIET, "train.global_batch=4", "train.seq_length=128", "optim.warmup_steps=0", "parallel.ep=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_rows(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(
    "nodes, args",
    [
        (1, [*TINY, "launch.gpus_per_node=2"]),
        (2, [*TINY, "launch.nodes=2", "launch.gpus_per_node=2"]),
        (
            16,
            [
                "recipe=stage1_pretrain",
                "launch.nodes=16",
                "launch.slurm.partition=h200",
                "launch.slurm.account=vl",
                "+launch.env.NCCL_DEBUG=WARN",
                "launch.slurm.setup=[source /opt/venv/bin/activate]",
            ],
        ),
    ],
)
def test_sbatch_scripts_for_1_2_and_16_nodes(nodes, args, tmp_path, capsys):
    run_dir = tmp_path / "job"
    assert launch_main(["slurm", "--dry-run", *args, f"run_dir={run_dir}"]) == 0
    printed = capsys.readouterr().out
    script = printed.split("\n# each node's step")[0]
    options = re.findall(r"^#SBATCH (\S+)$", script, re.M)
    gpus = 8 if nodes == 16 else 2
    for want in (
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={gpus}",
        "--signal=B:USR1@300",
        "--requeue",
        f"--output={run_dir}/logs/%x-%j.out",
        "--job-name=job",
    ):
        assert want in options, (want, options)
    step = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"--output={run_dir}/logs/%x-%j-node%n.out" in step
    assert "-m keye_train.cli launch slurm-node " in step and f"run_dir={run_dir}" in step
    assert f"REQUEST={run_dir / '.preempt_request'}" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    node = printed.split("\n# each node's step")[1]
    assert f"--nnodes={nodes} --nproc-per-node={gpus}" in node and "--rdzv-backend=c10d" in node
    if nodes == 16:
        assert "--partition=h200" in options and "--account=vl" in options
        assert "export NCCL_DEBUG=WARN" in script and "source /opt/venv/bin/activate" in script
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_a_layout_that_does_not_fit_the_nodes_is_refused_before_rendering(capsys):
    with pytest.raises(ValueError, match="parallel"):
        launch_main(["slurm", "--dry-run", "recipe=stage1_pretrain", "launch.nodes=1"])  # tp4 x pp4 > 8 GPUs


def test_torchrun_two_nodes_rendezvous_over_c10d_and_train(tmp_path):
    ensure_test_data()
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "keye_train.cli",
        "launch",
        "torchrun",
        *TINY,
        "train.steps=2",
        "launch.nodes=2",
        "launch.gpus_per_node=1",
        "launch.master_addr=127.0.0.1",
        f"launch.master_port={free_port()}",
        f"run_dir={run_dir}",
    ]
    nodes = [
        subprocess.Popen(args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    printed = "".join(out for out, _ in outs)
    assert "--nnodes=2 --nproc-per-node=1" in printed and "--rdzv-endpoint=127.0.0.1:" in printed
    assert "done: step 2" in printed
    assert [row["step"] for row in metric_rows(run_dir)] == [1, 2]


def fake_slurm(bin_dir, log):
    bin_dir.mkdir()
    stubs = {
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"',
        "scontrol": f'echo "scontrol $*" >> {log}',
        "sbatch": f'echo "sbatch $*" >> {log}',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


def test_slurm_job_checkpoints_on_usr1_requeues_and_resumes(tmp_path):
    ensure_test_data()
    log = tmp_path / "slurm.log"
    fake_slurm(tmp_path / "bin", log)
    run_dir = tmp_path / "run"
    env = dict(
        cli_env(),
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        SLURM_JOB_ID="42",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NODEID="0",
        SLURM_JOB_NUM_NODES="1",
    )
    submit = subprocess.run(
        [
            sys.executable,
            "-m",
            "keye_train.cli",
            "launch",
            "slurm",
            *TINY,
            "train.steps=400",
            "launch.gpus_per_node=2",
            f"launch.master_port={free_port()}",
            f"run_dir={run_dir}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stderr[-3000:]
    script = run_dir / "launch" / "run.sbatch"
    assert log.read_text() == f"sbatch {script}\n"

    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(metric_rows(run_dir)) < 2 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell signal_lead_s before the time limit
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    stopped_at = metric_rows(run_dir)[-1]["step"]
    assert "SIGUSR1: asking every rank to checkpoint" in out and "requeueing 42" in out
    assert f"checkpoint {run_dir / 'checkpoints'}" in out and 2 <= stopped_at < 400
    assert log.read_text().splitlines()[-1] == "scontrol requeue 42"

    # the requeued job: the same script (here shortened to two more steps) resumes and ends without requeue
    script.write_text(script.read_text().replace("train.steps=400", f"train.steps={stopped_at + 2}"))
    rerun = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in rerun.stdout and "requeueing" not in rerun.stdout
    assert [row["step"] for row in metric_rows(run_dir)][-2:] == [stopped_at + 1, stopped_at + 2]
    assert log.read_text().count("requeue") == 1


def test_a_split_placement_script_lists_the_rank_roles_of_a_job_that_trains(tmp_path, capsys):
    args = [
        "recipe=stage1_pretrain",
        "launch.nodes=18",
        "parallel.placement=split",
        "parallel.vision.ranks=16",
        f"run_dir={tmp_path}",
    ]
    assert launch_main(["slurm", "--dry-run", *args]) == 0
    script = capsys.readouterr().out
    assert "#   ranks 0-15: ViT + projector (tp 1 x dp 16)" in script
    assert "#   ranks 16-143: LM (tp 4 x pp 4 x dp 8, ep 8)" in script
    cfg, _ = load_checked_config(args, world="launch", check_data=False)
    require_trainable(cfg.parallel, cfg.rl.enabled)  # the trainer runs the split schedule (no refusal left)
