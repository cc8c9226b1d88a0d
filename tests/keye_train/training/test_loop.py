"""The trainer end to end: the same recipe gives the same losses on any layout (fp32, CPU)."""

import numpy as np
import pytest

from tests.helpers import QUIET, keye_train, logged_losses

ARGS = [
    *QUIET,
    "train.steps=3",
    "train.global_batch=4",
    "train.seq_length=128",
    "optim.warmup_steps=0",
    "optim.lr=5e-3",
    "checkpoint.interval=3",
]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trainer") / "one"
    done = keye_train(*ARGS, "parallel.nproc=1", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return logged_losses(run_dir)


@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.tp=2"]], ids=["dp2_ep2", "tp2"])
def test_losses_do_not_depend_on_the_layout(one_rank, layout, tmp_path):
    done = keye_train(*ARGS, "parallel.nproc=2", *layout, f"run_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    got = logged_losses(tmp_path)
    assert sorted(got) == sorted(one_rank) == [1, 2, 3]
    assert one_rank[3] < one_rank[1]  # it trains
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [one_rank[s] for s in (1, 2, 3)], rtol=2e-6)


def test_checkpoint_interval_zero_writes_no_checkpoint(tmp_path):
    done = keye_train(*ARGS, "train.steps=1", "checkpoint.interval=0", "parallel.nproc=1", f"run_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(logged_losses(tmp_path)) == [1]
    assert not list(tmp_path.glob("checkpoints/step_*"))
