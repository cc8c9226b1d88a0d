"""The `mopd` section and its config group: every option composes, its routing table builds, and bad values are
refused naming their key."""

import pytest

from keye_train.config.compose import load_checked_config, load_config
from keye_train.posttrain.mopd.teachers import RoutingTable, SampleTags, TeacherPool
from tests.helpers import QUIET


@pytest.mark.parametrize("option", ["none", "demo", "keye_vl2"])
def test_every_mopd_option_composes(option):
    cfg = load_config([f"mopd={option}"])
    assert str(cfg.mopd.mode) == ("sampled_token" if option == "demo" else "overlap")
    assert cfg.mopd.on_support == (option != "demo")  # loss=auto: the support form for a support-set mode
    if option == "none":
        assert cfg.mopd.teachers == []
        return
    table = RoutingTable(cfg.mopd.routes, cfg.mopd.default_teacher)
    names = {t.name for t in cfg.mopd.teachers}
    assert table.teacher_for(SampleTags("video", "caption")) in names
    assert table.teacher_for(SampleTags("text", "chat")) == cfg.mopd.default_teacher


def test_the_keye_table_shares_the_perception_instance():
    cfg = load_config(["mopd=keye_vl2"])
    loads = []
    pool = TeacherPool(cfg.mopd.teachers, lambda t: loads.append(t.checkpoint), resident=2)
    table = RoutingTable(cfg.mopd.routes, cfg.mopd.default_teacher)
    tags = [SampleTags("image", "ocr"), SampleTags("image", "grounding"), SampleTags("text", "math")]
    assert table.assign(tags) == ["ocr", "grounding", "text_math"]
    pool.score(table.assign(tags), lambda *a: None)
    assert loads == ["runs/teachers/perception", "runs/teachers/text_math"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("mopd.mode=kl", "mopd.mode"),
        ("mopd.top_k=0", "mopd.top_k=0 must be >= 1"),
        ("mopd.repetition.penalty=-1", "mopd.repetition.penalty=-1"),
        ("mopd.repetition.min_repeats=1", "mopd.repetition.min_repeats=1"),
        ("mopd.placement=off_rank", "mopd.placement=off_rank: only in_process is built"),
        ("+mopd.category_weights.style=1", "mopd.category_weights.style is not a category"),
        ("mopd.perception_pattern='(a'", r"mopd.perception_pattern='\(a' is not a regular expression"),
        ("mopd.loss=support", "mopd.loss=support needs a support-set mopd.mode"),
        ("mopd.enabled=true", "mopd.enabled=true needs rl.enabled=true"),
    ],
)
def test_a_bad_mopd_value_is_refused_naming_its_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_checked_config([*QUIET, "mopd=demo", override], world=1, check_data=False)
