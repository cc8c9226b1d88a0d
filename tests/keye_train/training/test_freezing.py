"""Stage 0 (projector only): ViT and LM weights never change and get no optimizer state."""

import numpy as np

from tests.helpers import QUIET, keye_train, logged_losses


def test_stage0_changes_only_the_projector(tmp_path):
    done = keye_train(
        *QUIET,
        "parallel.nproc=1",
        "train.steps=2",
        "train.global_batch=2",
        "train.seq_length=128",
        "checkpoint.interval=1",
        "stage.trainable=[projector]",
        "optim.warmup_steps=0",
        f"run_dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    with (
        np.load(ckpt / "step_00000001" / "rank_00000.npz") as a,
        np.load(ckpt / "step_00000002" / "rank_00000.npz") as b,
    ):
        model_keys = [k for k in a.files if k.startswith("model.")]
        changed = {k for k in model_keys if not np.array_equal(a[k], b[k])}
        projector = {k for k in model_keys if k.startswith("model.vision.projector.")}
        assert projector and changed == projector
        optim_numel = sum(a[k].size for k in a.files if k.startswith("optim.") and k.endswith(".param"))
        assert optim_numel == sum(a[k].size for k in projector)


def run_projector_only(tmp_path, shape: list[str], layout: list[str]):
    """Three projector-only steps on one rank and on two ranks with `layout`; returns both run dirs."""
    args = [
        *QUIET,
        "train.steps=3",
        *shape,
        "stage.trainable=[projector]",
        "optim.warmup_steps=0",
        "optim.lr=1e-2",
        "checkpoint.interval=3",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    for run_dir, extra in ((one, ["parallel.nproc=1"]), (two, ["parallel.nproc=2", *layout])):
        done = keye_train(*args, *extra, f"run_dir={run_dir}")
        assert done.returncode == 0, done.stderr[-3000:]
    return one, two


def test_stage0_with_a_frozen_pipeline_stage_matches_one_rank(tmp_path):
    """With PP=2 the last stage has nothing to train; it must still join the optimizer and match one rank."""
    one, two = run_projector_only(tmp_path, ["train.global_batch=2", "train.seq_length=128"], ["parallel.pp=2"])
    expected, got = list(logged_losses(one).values()), list(logged_losses(two).values())
    assert len(expected) == len(got) == 3
    assert expected[2] != expected[0]  # the projector really trains
    np.testing.assert_allclose(got, expected, rtol=2e-6)
    ckpt = two / "checkpoints" / "step_00000003"
    with np.load(ckpt / "rank_00001.npz") as last_stage:
        assert not any(k.startswith("optim.") and k.endswith(".param") for k in last_stage.files)


def test_stage0_under_expert_parallelism_with_text_only_packs_matches_one_rank(tmp_path):
    """A DP rank whose pack has no picture has nothing trainable upstream of the LM; its backward must still
    join the EP collectives of the other rank (it used to leave them waiting: a collective mismatch)."""
    one, two = run_projector_only(tmp_path, ["train.global_batch=4", "train.seq_length=256"], ["parallel.ep=2"])
    np.testing.assert_allclose(list(logged_losses(two).values()), list(logged_losses(one).values()), rtol=2e-6)
