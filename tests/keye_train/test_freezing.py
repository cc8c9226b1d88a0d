"""Stage 0 (projector only): ViT and LM weights never change and get no optimizer state."""

import numpy as np
from tests.helpers import QUIET, keye_train


def test_stage0_changes_only_the_projector(tmp_path):
    done = keye_train(*QUIET, "parallel.nproc=1", "train.steps=2", "train.global_batch=2", "train.seq_length=128",
                      "checkpoint.interval=1", "stage.trainable=[projector]", "optim.warmup_steps=0",
                      f"run_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    with np.load(ckpt / "step_00000001" / "rank_00000.npz") as a, np.load(ckpt / "step_00000002" / "rank_00000.npz") as b:
        model_keys = [k for k in a.files if k.startswith("model.")]
        changed = {k for k in model_keys if not np.array_equal(a[k], b[k])}
        projector = {k for k in model_keys if k.startswith("model.vision.projector.")}
        assert projector and changed == projector
        optim_numel = sum(a[k].size for k in a.files if k.startswith("optim.") and k.endswith(".param"))
        assert optim_numel == sum(a[k].size for k in projector)
