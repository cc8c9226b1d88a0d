"""The DSA recipe tree: the warm-up stage and the `attention` group compose into valid typed configs (composing
checks every section, see test_choices.py)."""

import pytest
from hydra.errors import HydraException

from keye_train.config.compose import load_config
from parallel.layout import check_batch, check_layout


def test_the_warmup_stage_trains_only_the_indexers_of_the_full_model_with_dense_attention():
    cfg = load_config(["recipe=dsa_warmup"])
    assert cfg.model.name == "keye_vl2_30b_a3b" and cfg.model.lm.num_layers == 48
    assert cfg.model.lm.dsa.mode == "warmup" and cfg.stage.trainable == ["indexer"]
    assert (cfg.model.lm.dsa.index_heads, cfg.model.lm.dsa.index_head_dim, cfg.model.lm.dsa.topk) == (16, 64, 2048)
    check_batch(cfg.train, check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, 128))


@pytest.mark.parametrize("recipe", ["demo", "dsa_warmup"])
def test_sparse_attention_is_one_override_on_any_recipe(recipe):
    cfg = load_config([f"recipe={recipe}", "attention=sparse"])
    assert cfg.model.lm.dsa.mode == "sparse"


def test_an_unknown_attention_kind_is_rejected_by_name():
    with pytest.raises(HydraException, match="attention"):
        load_config(["attention=blocky"])


def test_stage3_uses_context_parallelism_and_plans_within_120_gib_on_16_nodes():
    from keye_train.planning.memory import GIB, memory_per_rank

    cfg = load_config(["recipe=stage3_longcontext"])
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, cfg.launch.nodes * cfg.launch.gpus_per_node)
    check_batch(cfg.train, sizes)
    assert (sizes.world, sizes.cp, cfg.train.seq_length, cfg.train.global_batch) == (128, 8, 262144, 128)
    memory = memory_per_rank(cfg.model, cfg.parallel, cfg.train, sizes)
    assert max(stage["total"] for stage in memory.values()) / GIB <= 120
