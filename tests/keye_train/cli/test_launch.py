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


# a step with visual input in two of its eight packs (the placement tests' step), an LR that moves the weights
SPLIT_STEPS = [*QUIET, "train.seq_length=128", "train.global_batch=8", "train.seed=2", "train.steps=2"]
SPLIT_STEPS += ["optim.warmup_steps=0", "optim.lr=1e-3", "optim.clip_grad=1.0", "checkpoint.interval=0"]
LOSS_TOL = 1e-6  # relative loss difference per step against one rank: fp32 with another reduction order
GRAD_NORM_TOL = 1e-4  # relative, the global grad norm over both modules


def start_cli(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "keye_train.cli", *args]
    return subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_split_job_on_two_c10d_nodes_trains_like_one_rank(tmp_path):
    """`keye-train launch torchrun` run twice on this host, two "nodes" of 2 processes each joining one c10d
    rendezvous through the launcher's own command. parallel.placement=split: the first node to arrive holds ranks
    0-1 (ViT + projector, DP 2), the other ranks 2-3 (the LM, PP 2), so the patches, the embeddings and their
    gradients cross between the nodes (gloo over TCP). Both steps' losses and grad norms (one norm over the ViT
    and the LM) are one colocated rank's (run alongside, through the plain CLI) up to fp32 summation order."""
    ensure_test_data()
    split, single = tmp_path / "split", tmp_path / "single"
    nodes = [
        "launch.nodes=2",
        "launch.gpus_per_node=2",
        "launch.master_addr=127.0.0.1",
        f"launch.master_port={free_port()}",
    ]
    placement = ["parallel.placement=split", "parallel.vision.ranks=2", "parallel.pp=2"]
    agents = [start_cli("launch", "torchrun", *SPLIT_STEPS, *placement, *nodes, f"run_dir={split}") for _ in range(2)]
    one_rank = start_cli(*SPLIT_STEPS, "parallel.nproc=1", f"run_dir={single}")
    outs = [process.communicate(timeout=500) for process in (*agents, one_rank)]
    for process, (_, err) in zip((*agents, one_rank), outs):
        assert process.returncode == 0, err[-3000:]
    printed = "".join(out for out, _ in outs[:2])
    assert "--nnodes=2 --nproc-per-node=2" in printed and "--rdzv-backend=c10d" in printed
    assert "--rdzv-endpoint=127.0.0.1:" in printed and "done: step 2" in printed
    got, expected = metric_rows(split), metric_rows(single)
    assert [row["step"] for row in got] == [row["step"] for row in expected] == [1, 2]
    assert got[0]["data/visual_frames"] == expected[0]["data/visual_frames"] > 0  # step 1 has images or video
    for row, ref in zip(got, expected):
        assert abs(row["loss"] - ref["loss"]) <= LOSS_TOL * abs(ref["loss"]), (row, ref)
        assert abs(row["grad_norm"] - ref["grad_norm"]) <= GRAD_NORM_TOL * ref["grad_norm"], (row, ref)


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
