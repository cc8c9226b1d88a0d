"""TP / CP / PP / EP / DP layouts compute what one rank computes: losses, gradients and one optimizer step; so do
the grouped-GEMM experts and the chunked LM head + CE (the reference runs megatron's per-expert loop and its
logits + cross-entropy).

Each layout runs on gloo under torchrun with the tiny model, identical layout-invariant initial weights and
the same global batch of packs from the generated test shards (dealt to DP ranks by the planner); the layouts of
one world size share one torchrun world, one after another.

The split run also writes its state after the update as a step-1 checkpoint; runs of other placements resume it
and start from its weights, and see the 1-rank reference's next losses. It then runs one more step in which a
ViT-only rank's gradients are poisoned: every rank, ViT and LM, must skip that update together.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import DATA, finished, start_process

WORKER = Path(__file__).with_name("layout_worker.py")
LOAD_WORKER = Path(__file__).with_name("placement_load_worker.py")
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
    # CP 4 beside EP 4: megatron's expert-parallel group spans dp x cp, so the four CP ranks hold two experts each
    "cp4_ep4": (4, ["parallel.cp=4", "parallel.ep=4"]),
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
    # split with the ViT tensor- and data-parallel: ranks 0-1 and 2-3 are two ViT groups (TP 2, heads and MLP
    # split; DP 2 across them), both serving the one LM replica (ranks 4-5, LM TP 2): each group gets one visual
    # micro-batch, both its ranks encode it and get its gradient, its first rank sends the embeddings to both LM
    # TP ranks; the ViT grads reduce over ranks 0+2 and 1+3 (split under LM PP 2: split_pp2)
    "split_vit_tp2_dp2": (
        6,
        ["parallel.placement=split", "parallel.vision.ranks=4", "parallel.vision.tp=2", "parallel.tp=2"],
    ),
    # spread: both pipeline stages encode; stage 1 sends its embeddings to stage 0, the ViT grads reduce over both
    "spread_pp2": (2, ["parallel.placement=spread", "parallel.pp=2"]),
}
# where the split run's checkpoint continues: the ViT on the LM's only stage (pp0, one rank), and on both stages
LOAD_TARGETS = {
    "colocated": (1, []),
    "spread_pp2": PLACEMENTS["spread_pp2"],
}
LOSS_TOL = 2e-6  # relative, fp32
GRAD_TOL = 1e-4  # relative L2 error of a gradient or updated weight, fp32 with a different reduction order


def start_torchrun(nproc: int, worker: Path, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(worker)]
    return start_process([*cmd, *args], env)


def torchrun_finished(*runs: subprocess.Popen) -> None:
    for done in [finished(run) for run in runs]:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def torchrun(nproc: int, worker: Path, args: list[str]) -> None:
    torchrun_finished(start_torchrun(nproc, worker, args))


def run_layout(nproc: int, overrides, out: Path) -> list[dict]:
    torchrun(nproc, WORKER, [str(out), *BASE, *overrides])
    return [json.loads((out / f"report_{nproc}_{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The 1-rank references, (out dir, report) each: the layouts' and, with --next-steps on the visual step, the
    ViT placements'; the two run side by side."""
    out, visual_out = tmp_path_factory.mktemp("layouts"), tmp_path_factory.mktemp("placements")
    runs = {out: [], visual_out: ["--next-steps", *VISUAL_STEP]}
    torchrun_finished(*[start_torchrun(1, WORKER, [str(where), *BASE, *extra]) for where, extra in runs.items()])
    return [(where, json.loads((where / "report_1_0.json").read_text())) for where in runs]


@pytest.fixture(scope="module")
def reference(references):
    return references[0]


@pytest.fixture(scope="module")
def layout_reports(reference):
    """layout -> its ranks' reports. The layouts of one world size run one after another in one torchrun world
    (layout_worker.py --layouts): one start-up (interpreter, megatron import, gloo rendezvous) per world size
    instead of one per layout. The worlds of all sizes run side by side, once, when the first report is asked
    for (their ranks spend much of a step waiting on each other)."""
    out, _ = reference
    runs = {}

    def reports(layout: str) -> list[dict]:
        if not runs:
            groups = {nproc: {} for nproc, _ in LAYOUTS.values()}
            for name, (nproc, overrides) in LAYOUTS.items():
                groups[nproc][name] = [*BASE, *overrides]
            started = []
            for nproc, group in groups.items():
                spec = out / f"layouts_{nproc}.json"
                spec.write_text(json.dumps(group))
                started.append(start_torchrun(nproc, WORKER, [str(out), f"--layouts={spec}"]))
            torchrun_finished(*started)
            for nproc, group in groups.items():
                for name in group:
                    runs[name] = [json.loads((out / f"report_{name}_{r}.json").read_text()) for r in range(nproc)]
        return runs[layout]

    return reports


@pytest.fixture(scope="module")
def visual_reference(references):
    return references[1]


@pytest.fixture(scope="module")
def split_run(visual_reference):
    """The split_pp2 comparison, its state after the update written as a step-1 checkpoint: (reports, run dir)."""
    run_dir = visual_reference[0] / "split_run"
    nproc, overrides = PLACEMENTS["split_pp2"]
    save = [f"--save-checkpoint={run_dir}", "--skip-drill", "train.inject_nonfinite_at_step=1", *VISUAL_STEP]
    save += overrides
    return compare_to_reference(*visual_reference, "split_pp2", nproc, save), run_dir


@pytest.fixture(scope="module")
def placement_reports(visual_reference):
    """placement -> its ranks' reports, for the placements other than split_pp2 (split_run): their worlds run side
    by side."""
    out, _ = visual_reference
    others = {name: PLACEMENTS[name] for name in PLACEMENTS if name != "split_pp2"}
    assert len({nproc for nproc, _ in others.values()}) == len(others)  # report_NPROC_RANK.json apart
    started = [start_torchrun(n, WORKER, [str(out), *BASE, *VISUAL_STEP, *over]) for n, over in others.values()]
    torchrun_finished(*started)
    return {
        name: [json.loads((out / f"report_{n}_{r}.json").read_text()) for r in range(n)]
        for name, (n, _) in others.items()
    }


@pytest.fixture(scope="module")
def loaded(split_run, tmp_path_factory):
    """target -> the load worker's report: the split run's checkpoint (a copy each) resumed and started from under
    every target placement, the targets' worlds side by side."""
    started, work_dirs = [], {}
    for target, (nproc, overrides) in LOAD_TARGETS.items():
        work = work_dirs[target] = tmp_path_factory.mktemp(f"load_{target}")
        shutil.copytree(split_run[1], work / "resumed")
        args = [str(work), str(work / "resumed"), *BASE, *VISUAL_STEP, *overrides]
        started.append(start_torchrun(nproc, LOAD_WORKER, args))
    torchrun_finished(*started)
    return {target: json.loads((work / "load_report.json").read_text()) for target, work in work_dirs.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(reference, layout_reports, layout):
    check_against_reference(*reference, layout, LAYOUTS[layout][1], layout_reports(layout))


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_vit_placement_matches_single_rank(visual_reference, placement, request):
    if placement == "split_pp2":
        reports, _ = request.getfixturevalue("split_run")
    else:
        reports = request.getfixturevalue("placement_reports")[placement]
        check_against_reference(*visual_reference, placement, [*VISUAL_STEP, *PLACEMENTS[placement][1]], reports)
    vit_tp = placement == "split_vit_tp2_dp2"
    encoders = reports[: 4 if vit_tp else 2] if placement.startswith("split") else reports  # spread: every rank
    # each ViT group (both its TP ranks) or rank encodes one of the two visual micro-batches
    assert [r["encoded"] for r in encoders] == [1] * len(encoders), (placement, [r["encoded"] for r in reports])
    if vit_tp:  # the ViT ranks hold halves of the column- and row-parallel weights
        vit_linears = {
            f"vision.encoder.blocks.layers.{n}.weight" for n in ("1.self_attention.linear_qkv", "0.mlp.linear_fc2")
        }
        for r in encoders:
            assert vit_linears <= set(r["tp_split"]), r["tp_split"]


def test_split_skips_a_nonfinite_step_on_every_rank(split_run):
    """One non-finite decision across both modules: a NaN in a ViT rank's gradients (rank 0, ViT only) skips the
    update on the LM ranks too (fault policy, train.nonfinite_policy=skip); no sampled weight moves anywhere."""
    reports, _ = split_run
    verdicts = [(r["drill_skip_reason"], r["drill_streak"], r["drill_weights_unchanged"]) for r in reports]
    assert verdicts == [("non-finite gradients or loss", 1, True)] * len(reports), verdicts


@pytest.mark.parametrize("target", list(LOAD_TARGETS))
def test_vit_placement_checkpoint_continues_in_another_placement(visual_reference, loaded, target):
    """The split run's step-1 checkpoint (2 ViT ranks + LM PP 2, distributed optimizer) resumed by the trainer
    under another placement (checkpoint.resume: weights, Adam moments and the data position, re-cut by the shard
    indexes) gives the 1-rank reference's losses of steps 2 and 3 and its step-2 grad norm; started from with
    checkpoint.init_from, the first batch's loss after the reference's update."""
    _, ref = visual_reference
    got = loaded[target]
    assert (got["resumed_at"], got["init_from_at"]) == (1, 0), got
    pairs = [
        ("step 2 (resumed)", got["resumed_losses"][0], ref["step2_loss"]),
        ("step 3 (resumed)", got["resumed_losses"][1], ref["step3_loss"]),
        ("step 1 again (init_from)", got["init_from_loss"], ref["same_batch_loss"]),
    ]
    for what, loss, expected in pairs:
        assert abs(loss - expected) <= LOSS_TOL * abs(expected), (target, what, loss, expected)
    norm, expected_norm = got["resumed_grad_norms"][0], ref["step2_grad_norm"]
    assert abs(norm - expected_norm) <= 1e-4 * expected_norm, (target, norm, expected_norm)
    worst = max(abs(loss - expected) / abs(expected) for _, loss, expected in pairs)
    print(f"split -> {target}: worst loss rel diff {worst:.1e}, losses {[round(p[1], 9) for p in pairs]}")


def compare_to_reference(out: Path, ref: dict, layout: str, nproc: int, overrides: list[str]) -> list[dict]:
    return check_against_reference(out, ref, layout, overrides, run_layout(nproc, overrides, out))


def check_against_reference(out: Path, ref: dict, layout: str, overrides: list[str], reports: list[dict]) -> list[dict]:
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
