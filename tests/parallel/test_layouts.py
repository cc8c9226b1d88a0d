"""TP / CP / PP / EP / DP layouts compute what one rank computes: losses, gradients and one optimizer step; so do
the grouped-GEMM experts and the chunked LM head + CE (the reference runs megatron's per-expert loop and its
logits + cross-entropy).

Each layout runs on gloo under torchrun with the tiny model, identical layout-invariant initial weights and
the same global batch of packs from the generated test shards (dealt to DP ranks by the planner).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import DATA

WORKER = Path(__file__).with_name("layout_worker.py")
BASE = [
    "~recipe",
    "model=tiny",
    *DATA,
    "train.seq_length=128",
    "train.global_batch=4",
    "train.seed=7",
    "optim.lr=1e-3",
    "optim.clip_grad=1.0",
    "model.lm.loss_impl=megatron",
]  # today's logits + CE, the reference of tp2_grouped_chunked
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    "ep4": (4, ["parallel.ep=4"]),
    "dp2": (2, []),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp2_ep2_etp1": (2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
    # context parallelism: every document cut into 2*cp chunks, padded, K/V all-gathered per layer; beside PP (the
    # stages exchange the slices' shapes) and TP (sequence parallelism splits each slice)
    "cp2_pp2": (4, ["parallel.cp=2", "parallel.pp=2"]),
    "cp2_tp2": (4, ["parallel.cp=2", "parallel.tp=2"]),
    # grouped-GEMM experts against the 1-rank SequentialMLP reference
    "ep2_grouped": (2, ["parallel.ep=2", "model.lm.experts_impl=grouped"]),
    # the chunked vocab-parallel head + CE (chunks of 48, 48, 32 tokens) against megatron's on one rank, with
    # grouped experts split over expert TP = 2
    "tp2_grouped_chunked": (
        2,
        [
            "parallel.tp=2",
            "model.lm.experts_impl=grouped",
            "model.lm.loss_impl=chunked",
            "model.lm.loss_chunk_tokens=48",
        ],
    ),
}
# The ViT's placements, on a step with two packs holding images or video (seed 2: micro-batches 0 and 7 of 8),
# so that each of two encoders gets one (dealt by cost) and the embeddings and their gradients cross ranks.
VISUAL_STEP = ["train.seed=2", "train.global_batch=8"]
PLACEMENTS = {
    # split: ranks 0-1 run the ViT + projector (DP 2) and send the embeddings to the LM's stage 0 (ranks 2-3 run
    # the LM with PP 2); the gradients come back and the ViT ranks reduce them among themselves
    "split_pp2": (4, ["parallel.placement=split", "parallel.vision.ranks=2", "parallel.pp=2"]),
    # spread: both pipeline stages encode; stage 1 sends its embeddings to stage 0, the ViT grads reduce over both
    "spread_pp2": (2, ["parallel.placement=spread", "parallel.pp=2"]),
}
LOSS_TOL = 2e-6  # relative, fp32
GRAD_TOL = 1e-4  # relative L2 error of a gradient or updated weight, fp32 with a different reduction order


def run_layout(nproc: int, overrides, out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        str(out),
        *BASE,
        *overrides,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((out / f"report_{nproc}_{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    (report,) = run_layout(1, [], out)
    return out, report


@pytest.fixture(scope="module")
def visual_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("placements")
    (report,) = run_layout(1, VISUAL_STEP, out)
    return out, report


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(reference, layout):
    nproc, overrides = LAYOUTS[layout]
    compare_to_reference(*reference, layout, nproc, overrides)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_vit_placement_matches_single_rank(visual_reference, placement):
    nproc, overrides = PLACEMENTS[placement]
    reports = compare_to_reference(*visual_reference, placement, nproc, [*VISUAL_STEP, *overrides])
    encoders = reports[:2] if placement.startswith("split") else reports  # split: the ViT ranks; spread: all
    assert [r["encoded"] for r in encoders] == [1, 1], (placement, [r["encoded"] for r in reports])


def compare_to_reference(out: Path, ref: dict, layout: str, nproc: int, overrides: list[str]) -> list[dict]:
    reports = run_layout(nproc, overrides, out)
    losses = [r["loss_a"] for r in reports if r["loss_a"] is not None]
    assert losses, "no rank reported a loss"
    cp = next((int(o.split("=")[1]) for o in overrides if o.startswith("parallel.cp=")), 1)
    for r in reports:
        assert r["cp"] == cp, (layout, r["cp"])
        for key in ("loss_a", "loss_b"):
            if r[key] is not None:
                assert abs(r[key] - ref[key]) <= LOSS_TOL * abs(ref[key]), (layout, key, r[key], ref[key])
        assert abs(r["grad_norm"] - ref["grad_norm"]) <= 1e-4 * ref["grad_norm"], (layout, r["grad_norm"])
    compared, worst = set(), {"grad_rel_err": 0.0, "weight_rel_err": 0.0}
    for r in reports:
        for field in ("grad_rel_err", "weight_rel_err"):
            for name, err in r[field].items():
                assert err <= GRAD_TOL, (layout, field, name, err)
                compared.add(name)
                worst[field] = max(worst[field], err)
    loss_diff = max(abs(r[k] - ref[k]) / abs(ref[k]) for r in reports for k in ("loss_a", "loss_b") if r[k] is not None)
    print(
        f"{layout}: loss rel diff {loss_diff:.1e}, worst grad rel err {worst['grad_rel_err']:.1e}, "
        f"worst updated-weight rel err {worst['weight_rel_err']:.1e}"
    )
    # every sampled parameter of the reference was held and checked by some rank
    with np.load(out / "reference.npz") as ref_arrays:
        expected = {key.split("/", 1)[1] for key in ref_arrays.files}
    assert compared == expected and len(expected) >= 13, sorted(expected ^ compared)
    return reports
