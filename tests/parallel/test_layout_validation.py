"""Invalid layouts fail before any rank starts, and the message names the config key."""

import pytest

from keye_train.config import ParallelConfig, TrainConfig, VisionParallelConfig, tiny
from parallel.layout import LayoutError, check_batch, check_layout, rank_roles
from tests.helpers import QUIET, keye_train

MODEL = tiny()


@pytest.mark.parametrize(
    "par,world,key",
    [
        (ParallelConfig(tp=2), 3, "parallel.tp"),
        (ParallelConfig(tp=3), 3, "parallel.tp"),  # 4 heads not divisible by 3
        (ParallelConfig(ep=3), 3, "parallel.ep"),  # 8 experts not divisible by 3
        (ParallelConfig(pp=3), 3, "parallel.pp"),  # 4 layers not divisible by 3
        (ParallelConfig(cp=3), 4, "parallel.cp"),  # world 4 not divisible by tp*cp*pp = 3
        (ParallelConfig(tp=2, cp=2), 6, "parallel.cp"),
        (ParallelConfig(cp=2, placement="split", vision=VisionParallelConfig(ranks=2)), 6, "parallel.cp"),
        (ParallelConfig(tp=2, etp=1), 2, "parallel.etp"),  # ETP != TP needs EP > 1
        (ParallelConfig(tp=2, sequence_parallel=False), 2, "parallel.sequence_parallel"),
        (ParallelConfig(vision=VisionParallelConfig(ranks=2)), 4, "parallel.placement=split"),  # colocated
        (ParallelConfig(placement="mpmd"), 4, "parallel.placement"),
        (ParallelConfig(placement="split"), 4, "parallel.vision.ranks"),  # split needs ViT ranks
        (ParallelConfig(placement="split", vision=VisionParallelConfig(ranks=4)), 4, "parallel.vision.ranks"),
        (ParallelConfig(placement="split", vision=VisionParallelConfig(tp=3, ranks=3)), 6, "parallel.vision.tp"),
        (ParallelConfig(placement="split", tp=2, vision=VisionParallelConfig(ranks=1)), 4, "LM ranks"),  # 3 LM ranks
    ],
)
def test_check_layout_names_the_key(par, world, key):
    with pytest.raises(LayoutError, match=key.replace(".", r"\.")):
        check_layout(par, MODEL.lm, MODEL.vit, world)


def test_context_parallel_sizes():
    sizes = check_layout(ParallelConfig(tp=2, cp=2, ep=4), MODEL.lm, MODEL.vit, 16)
    assert (sizes.cp, sizes.dp, sizes.expert_dp) == (2, 4, 2)  # EP 4 within dp x cp = 8
    with pytest.raises(LayoutError, match=r"tp\*cp\*pp"):
        check_batch(TrainConfig(global_batch=6), sizes)
    with pytest.raises(ValueError, match=r"parallel\.cp=0"):
        ParallelConfig(cp=0)


def test_valid_layout_sizes():
    sizes = check_layout(ParallelConfig(tp=2, pp=2, ep=2), MODEL.lm, MODEL.vit, 8)
    assert (sizes.dp, sizes.etp, sizes.expert_dp) == (2, 2, 1)
    with pytest.raises(LayoutError, match=r"train\.global_batch"):
        check_batch(TrainConfig(global_batch=3), sizes)


def test_the_checkpoint_layout_records_the_placement():
    """Colocated and spread PP 2 on two ranks have the same sizes but hold the ViT (and its optimizer) on
    different ranks: their records differ, so a checkpoint of one loads into the other through the shard indexes.
    Colocated records no placement, as checkpoints written before the placements did."""
    records = {
        placement: check_layout(ParallelConfig(placement=placement, pp=2), MODEL.lm, MODEL.vit, 2).record()
        for placement in ("colocated", "spread")
    }
    assert "placement" not in records["colocated"] and records["spread"]["placement"] == "spread"
    assert {k: v for k, v in records["spread"].items() if k != "placement"} == records["colocated"]


def test_the_checkpoint_layout_records_the_vit_tp_of_a_split_layout():
    """Split with the ViT on 2 ranks, unsharded or as one TP 2 group: the ViT's shards differ, so do the records
    (TP 1 records none, as split checkpoints written before ViT TP did)."""
    records = [
        check_layout(
            ParallelConfig(placement="split", vision=VisionParallelConfig(tp=tp, ranks=2)), MODEL.lm, MODEL.vit, 4
        ).record()
        for tp in (1, 2)
    ]
    assert "vision_tp" not in records[0] and records[1]["vision_tp"] == 2
    assert {k: v for k, v in records[1].items() if k != "vision_tp"} == records[0]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("parallel.tp=3", "parallel.tp"),
        ("parallel.tensor=2", "tensor"),
        ("train.steps=many", "train.steps"),
    ],
)
def test_cli_rejects_before_starting_ranks(tmp_path, override, needle):
    done = keye_train(*QUIET, "parallel.nproc=3", f"run_dir={tmp_path}", override, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert needle in done.stderr and "error" in done.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_split_placement_gives_the_vit_the_first_ranks_and_the_lm_the_rest():
    par = ParallelConfig(placement="split", tp=2, ep=2, vision=VisionParallelConfig(tp=2, ranks=4))
    sizes = check_layout(par, MODEL.lm, MODEL.vit, 12)
    assert (sizes.world, sizes.vision_ranks, sizes.dp, sizes.expert_dp) == (12, 4, 4, 2)
    assert rank_roles(par, sizes) == [
        "ranks 0-3: ViT + projector (tp 2 x dp 2)",
        "ranks 4-11: LM (tp 2 x pp 1 x dp 4, ep 2)",
    ]


def test_a_split_vit_tp_that_does_not_divide_the_vit_heads_is_refused_before_any_rank_starts(tmp_path):
    done = keye_train(
        *QUIET,
        "parallel.placement=split",
        "parallel.vision.ranks=3",
        "parallel.vision.tp=3",  # the tiny ViT has 4 heads
        "parallel.nproc=4",
        f"run_dir={tmp_path}",
    )
    assert done.returncode == 2 and "parallel.vision.tp=3" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()
