"""Invalid layouts fail before any rank starts, and the message names the config key."""

import pytest
from tests.helpers import QUIET, keye_train

from keye_train.config import ParallelConfig, TrainConfig, tiny
from parallel.layout import LayoutError, check_batch, check_layout

MODEL = tiny()


@pytest.mark.parametrize("par,world,key", [
    (ParallelConfig(tp=2), 3, "parallel.tp"),
    (ParallelConfig(tp=3), 3, "parallel.tp"),  # 4 heads not divisible by 3
    (ParallelConfig(ep=3), 3, "parallel.ep"),  # 8 experts not divisible by 3
    (ParallelConfig(pp=3), 3, "parallel.pp"),  # 4 layers not divisible by 3
    (ParallelConfig(tp=2, etp=1), 2, "parallel.etp"),  # ETP != TP needs EP > 1
    (ParallelConfig(tp=2, sequence_parallel=False), 2, "parallel.sequence_parallel"),
])
def test_check_layout_names_the_key(par, world, key):
    with pytest.raises(LayoutError, match=key.replace(".", r"\.")):
        check_layout(par, MODEL.lm, MODEL.vit, world)


def test_valid_layout_sizes():
    sizes = check_layout(ParallelConfig(tp=2, pp=2, ep=2), MODEL.lm, MODEL.vit, 8)
    assert (sizes.dp, sizes.etp, sizes.expert_dp) == (2, 2, 1)
    with pytest.raises(LayoutError, match=r"train\.global_batch"):
        check_batch(TrainConfig(global_batch=3), sizes)


@pytest.mark.parametrize("override,needle", [
    ("parallel.tp=3", "parallel.tp"),
    ("parallel.tensor=2", "tensor"),
    ("train.steps=many", "train.steps"),
])
def test_cli_rejects_before_starting_ranks(tmp_path, override, needle):
    done = keye_train(*QUIET, "parallel.nproc=3", f"run_dir={tmp_path}", override, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert needle in done.stderr and "error" in done.stderr
    assert not (tmp_path / "checkpoints").exists()
