"""TP 2 and EP 2 rollouts (gloo, tiny model) give one rank's greedy tokens, log-probs and routes, and so does TP 2
with sparse DSA (the indexer and its key cache replicated over TP); under EP the DP peers get different work and
the one that finishes first keeps stepping until the other is done."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("rollout_worker.py")
REPO = Path(__file__).resolve().parents[4]


def run(out: Path, nproc: int, tp: int, ep: int, attention: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run(
        [*cmd, str(WORKER), str(out), str(tp), str(ep), attention], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((out / f"rollout_{nproc}_{tp}_{ep}_{attention}_{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One rank's samples per attention mode, run once each."""
    runs = {}

    def get(attention):
        if attention not in runs:
            (report,) = run(tmp_path_factory.mktemp("rollout"), 1, 1, 1, attention)
            runs[attention] = report["samples"]
        return runs[attention]

    return get


@pytest.mark.parametrize("tp,ep,attention", [(2, 1, "dense"), (1, 2, "dense"), (2, 1, "sparse")])
def test_parallel_rollouts_give_one_ranks_tokens(reference, tmp_path, tp, ep, attention):
    reference = reference(attention)
    reports = run(tmp_path, 2, tp, ep, attention)
    merged = {}
    for report in reports:
        merged.update(report["samples"])
    assert sorted(merged) == sorted(reference)
    for key, want in reference.items():
        got = merged[key]
        assert got["tokens"] == want["tokens"] and got["reason"] == want["reason"], key
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) < 1e-4, key
        assert got["routes"] == want["routes"], key
    if tp > 1:  # every TP rank emitted the same tokens
        assert reports[0]["samples"] == reports[1]["samples"]
    else:  # the DP peers stepped in lockstep although rank 1 had far less work
        assert reports[0]["steps"] == reports[1]["steps"]
