"""CP ranks with the real gloo all-gather / reduce-scatter compute what one rank computes on the unpadded
sequence, row for row in float64: dense attention, the DSA warm-up and the sparse stage (the same selected sets,
the same indexer KL, outputs and every gradient, pad rows without gradient). See context_worker.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("context_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_context_parallel_attention_matches_one_rank(tmp_path, cp):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}"]
    done = subprocess.run([*cmd, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for rank in range(cp):
        report = json.loads((tmp_path / f"report_{rank}.json").read_text())
        assert report["warmup"]["kl"] < 1e-10 and report["sparse"]["kl"] < 1e-10
        assert report["sparse_same_indices"]
        for mode in ("dense", "warmup", "sparse"):
            assert max(report[mode].values()) < 1e-10, (mode, report[mode])
        print(cp, rank, {mode: f"{max(report[mode].values()):.1e}" for mode in ("dense", "warmup", "sparse")})
