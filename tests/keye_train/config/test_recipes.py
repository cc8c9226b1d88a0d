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


FULL_SIZE = [  # Stage 3: the test above
    "stage0_projector",
    "stage1_pretrain",
    "stage2_multitask",
    "dsa_warmup",
    "sft",
    "rl_general",
    "rl_video",
    "mopd",
    "rl_context",
]


@pytest.mark.parametrize("recipe", FULL_SIZE)
def test_every_full_size_recipe_plans_within_120_gib_per_rank_on_its_cluster(recipe):
    """`keye-train plan recipe=<stage>`'s memory table (RL stages with their rollout column: the training state
    beside the KV cache) on the recipe's launch shape, with the recipe's global batch."""
    from keye_train.planning.memory import GIB, plan_memory

    judge = ["rl.judge=keye_train.posttrain.toy_judge:counting_judge"] if recipe == "rl_context" else []
    cfg = load_config([f"recipe={recipe}", *judge])
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, cfg.launch.nodes * cfg.launch.gpus_per_node)
    check_batch(cfg.train, sizes)
    assert cfg.model.lm.num_layers == 48 and sizes.world == 128
    memory = plan_memory(cfg, sizes)
    assert ("rollout" in memory) == cfg.rl.enabled
    assert max(column["total"] for column in memory.values()) / GIB <= 120
