"""`keye-train plan`: parameter counts match the released checkpoint and a real build; memory shrinks with sharding."""

import dataclasses
import subprocess
import sys
import time

import pytest
import torch

from keye_train.config import ParallelConfig, TrainConfig, keye_vl2_30b_a3b, tiny
from keye_train.planning.memory import memory_per_rank
from keye_train.planning.parameters import count_parameters, single_rank_megatron
from parallel.layout import LayoutSizes
from tests.helpers import cli_env

# the released Keye-VL-2.0-30B-A3B checkpoint's tensors, counted by part
FULL_LM = 30_532_122_624
FULL_VIT = 412_987_248  # without the unused 32768 x 1152 packing table
FULL_PROJECTOR = 30_686_720


def test_full_size_counts_match_the_released_checkpoint():
    counts = count_parameters(keye_vl2_30b_a3b())
    assert counts["lm"] == FULL_LM
    assert counts["vit"] == FULL_VIT
    assert counts["projector"] == FULL_PROJECTOR
    assert counts["total"] == FULL_LM + FULL_VIT + FULL_PROJECTOR
    assert sum(counts["lm_parts"].values()) == FULL_LM
    assert counts["lm_parts"]["embedding"] == counts["lm_parts"]["output_head"] == 151_936 * 2048
    assert 3.3e9 < counts["active"] < 3.4e9  # Qwen3-30B-A3B: about 3.3B active per token


def test_the_dsa_indexers_reproduce_the_released_checkpoint_total():
    model = keye_vl2_30b_a3b()
    model.lm.dsa.mode = "sparse"  # default 16 x 64 indexers
    counts = count_parameters(model)
    assert counts["lm_parts"]["indexer"] == 48 * 2_261_184
    assert counts["total"] + 37_748_736 == 31_122_082_160  # plus the unused ViT packing table


def test_tiny_meta_counts_equal_a_real_build():
    from megatron.core.process_groups_config import ProcessGroupCollection

    from keye_train.model.lm import build_lm, lm_transformer_config
    from keye_train.model.vision import VisionTower, vit_transformer_config

    model = tiny()
    counts = count_parameters(model)
    with single_rank_megatron():
        lm = build_lm(
            model.lm,
            lm_transformer_config(model.lm, ParallelConfig(), torch.float32, on_gpu=False),
            pre_process=True,
            post_process=True,
        )
        vision = VisionTower(
            model,
            vit_transformer_config(model.vit, torch.float32, on_gpu=False),
            ProcessGroupCollection.use_mpu_process_groups(),
        )
    assert all(p.device.type == "cpu" for p in lm.parameters())
    assert counts["lm"] == sum(p.numel() for p in lm.parameters())
    assert counts["vit"] == sum(p.numel() for p in vision.encoder.parameters())
    assert counts["projector"] == sum(p.numel() for p in vision.projector.parameters())


def _sizes(tp: int, pp: int = 2, ep: int = 8, world: int = 64) -> LayoutSizes:
    return LayoutSizes(
        world=world, tp=tp, pp=pp, ep=ep, etp=tp, dp=world // (tp * pp), expert_dp=world // (tp * ep * pp)
    )


def test_tensor_parallelism_shrinks_the_sharded_parts():
    model, train = keye_vl2_30b_a3b(), TrainConfig(global_batch=64, seq_length=4096)
    one = memory_per_rank(model, ParallelConfig(tp=1, pp=2, ep=8), train, _sizes(1))
    two = memory_per_rank(model, ParallelConfig(tp=2, pp=2, ep=8), train, _sizes(2))
    for stage in ("first_stage", "last_stage"):
        assert two[stage]["dense_params"] < one[stage]["dense_params"]
        assert two[stage]["expert_params"] == one[stage]["expert_params"] / 2  # etp follows tp
        for item in ("params", "grads", "activations"):
            assert two[stage][item] < one[stage][item]


def test_plan_cli_prints_totals_quickly_without_allocating_the_model():
    args = [
        "plan",
        "model=keye_vl2_30b_a3b",
        "parallel.tp=2",
        "parallel.pp=4",
        "parallel.ep=8",
        "parallel.nproc=64",
        "train.global_batch=64",
    ]  # the demo recipe's batch of 4 does not split over DP 8
    # VmHWM is the peak of this process's own memory map. ru_maxrss is not: Linux carries the parent's
    # (pytest's) peak across exec into it.
    script = (
        "import sys; from keye_train.cli.main import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
        "print('maxrss_kb', hwm.split()[1]); sys.exit(rc)"
    )
    env = cli_env()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{FULL_LM:,}" in proc.stdout and f"{FULL_VIT:,}" in proc.stdout and f"{FULL_PROJECTOR:,}" in proc.stdout
    assert "first_stage" in proc.stdout and "last_stage" in proc.stdout
    maxrss_kb = int(proc.stdout.split("maxrss_kb")[-1].split()[0])
    assert maxrss_kb < 2 * 1024 * 1024, f"peak RSS {maxrss_kb} KB: the model was allocated"
    assert elapsed < 60


def test_plan_chain_prints_each_stages_token_budget():
    from tests.helpers import keye_train

    done = keye_train("plan", "chain", "keye_vl2")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    expected = {
        "stage0_projector": (8192, 1000, 512),
        "stage1_pretrain": (32768, 30000, 1024),
        "stage2_multitask": (65536, 60000, 512),
        "dsa_warmup": (65536, 1000, 32),
        "stage3_longcontext": (262144, 15000, 128),
        "sft": (65536, 4000, 256),
    }
    for stage, (seq, steps, batch) in expected.items():
        assert [int(x.replace(",", "")) for x in rows[stage][1:5]] == [seq, steps, batch, seq * steps * batch]
    assert int(rows["total"][1].replace(",", "")) == sum(s * n * b for s, n, b in expected.values())
    assert rows["stage1_pretrain"][5] == "1.01T"  # the paper's ~1T tokens for Stage 1


def test_full_recompute_keeps_layer_inputs_only():
    """At 32K one all-visual pack keeps ~300 GiB of activations (mostly the ViT's) without recomputation;
    parallel.recompute=full keeps each layer's input plus one layer's working set."""
    model, train = keye_vl2_30b_a3b(), TrainConfig(global_batch=64, seq_length=32768)
    sizes = _sizes(1, pp=1, world=8)
    plain = memory_per_rank(model, ParallelConfig(ep=8), train, sizes)["first_stage"]
    full = memory_per_rank(model, ParallelConfig(ep=8, recompute="full"), train, sizes)["first_stage"]
    assert plain["activations"] > 250 * 2**30 and full["activations"] < plain["activations"] / 5
    assert full["total"] < 141e9  # one H200 (the recipes/parallel/ep8_node.yaml layout)
    for item in ("params", "grads", "optimizer"):
        assert full[item] == plain[item]


def test_selective_recompute_and_the_chunked_head_in_the_plan():
    """Selective recompute keeps less than none and more than full; the ViT may recompute on its own; the chunked
    head drops the last stage's 6 bytes per token per vocabulary entry of logits."""
    from keye_train.config import VisionParallelConfig

    model, train = keye_vl2_30b_a3b(), TrainConfig(global_batch=64, seq_length=32768)
    sizes = _sizes(1, pp=1, world=8)

    def activations(**parallel):
        return memory_per_rank(model, ParallelConfig(ep=8, **parallel), train, sizes)["first_stage"]["activations"]

    none, full = activations(), activations(recompute="full")
    selective = activations(recompute="selective", vision=VisionParallelConfig(recompute="full"))
    assert full < selective < none
    assert activations(recompute="selective") > selective  # a ViT that keeps everything costs more
    megatron_head = memory_per_rank(
        dataclasses.replace(model, lm=dataclasses.replace(model.lm, loss_impl="megatron")),
        ParallelConfig(ep=8, recompute="full"),
        train,
        sizes,
    )["first_stage"]
    saved = megatron_head["activations"] - full
    assert 0.9 * 6 * 32768 * 151936 < saved < 6 * 32768 * 151936


def test_the_full_model_fits_one_node_at_32k_with_its_recipe():
    """The 48-layer model at 32K on 8 H200s (parallel=ep8_node): at most 120 GiB per rank."""
    from keye_train.config.compose import load_checked_config

    cfg, sizes = load_checked_config(
        ["recipe=stage1_pretrain", "parallel=ep8_node", "launch.nodes=1"], world="launch", check_data=False
    )
    assert cfg.model.lm.num_layers == 48 and cfg.train.seq_length == 32768
    total = memory_per_rank(cfg.model, cfg.parallel, cfg.train, sizes)["first_stage"]["total"]
    assert total <= 120 * 2**30, total / 2**30


def test_context_parallelism_divides_the_lm_activations_and_adds_the_gathered_kv():
    from keye_train.config import VisionParallelConfig
    from keye_train.planning.memory import activation_bytes, context_parallel_layer_bytes, lm_layer_bytes

    model, train = keye_vl2_30b_a3b(), TrainConfig(global_batch=64, seq_length=262144)
    model.lm.dsa.mode = "sparse"
    par = ParallelConfig(tp=4, ep=8, recompute="selective", vision=VisionParallelConfig(recompute="full"))
    base = dict(world=64, tp=4, pp=1, ep=8, etp=4, expert_dp=2)
    one = LayoutSizes(**base, dp=16)
    four = LayoutSizes(**base, dp=4, cp=4)
    # the LM alone (a middle stage: no ViT, no head) keeps a quarter of its local rows, plus the gathered K/V:
    # 2 (K, V) x 2 bytes x 1 KV head per TP rank x 128 x 256K tokens, and the fp32 indexer keys (64 wide)
    lm_one = activation_bytes(model, train, one, first=False, last=False, parallel=par)
    lm_four = activation_bytes(model, train, four, first=False, last=False, parallel=par)
    gathered = context_parallel_layer_bytes(model.lm, train.seq_length, four)
    assert gathered == 2 * 2 * 1 * 128 * 262144 + 4 * 64 * 262144
    assert lm_four == pytest.approx(lm_one / 4 + 48 * gathered)
    # the ViT runs on the whole pack on every CP rank: its share does not shrink (its recomputing layer's working
    # set, larger than the LM's here, replaces the LM's in the first stage's peak)
    lm_working = lm_layer_bytes(model.lm, "selective", par.recompute_modules)[1] * train.seq_length / 4
    vit_one = activation_bytes(model, train, one, first=True, last=False, parallel=par) - lm_one + lm_working
    vit_four = activation_bytes(model, train, four, first=True, last=False, parallel=par) - lm_four + lm_working / 4
    assert vit_four == pytest.approx(vit_one) and vit_one > 60 * 2**30
    # optimizer state of dense parameters is sharded over DP x CP
    m_one = memory_per_rank(model, par, train, one)["first_stage"]
    m_four = memory_per_rank(model, par, train, four)["first_stage"]
    assert m_four["optimizer"] == pytest.approx(m_one["optimizer"])  # dp x cp = 16 in both


def test_frozen_parts_hold_weights_but_no_grads_or_optimizer_state():
    """stage.trainable: only trained parameters get fp32 main grads and Adam state (megatron's DDP buffers and
    distributed optimizer skip frozen ones); every part's bf16 weights stay."""
    model, train = keye_vl2_30b_a3b(), TrainConfig(global_batch=64, seq_length=8192)
    model.lm.dsa.mode = "warmup"
    par, sizes = ParallelConfig(tp=4, pp=4, ep=8), LayoutSizes(world=128, tp=4, pp=4, ep=8, etp=4, dp=8, expert_dp=1)
    everything = memory_per_rank(model, par, train, sizes)
    indexers = memory_per_rank(model, par, train, sizes, trainable=["indexer"])
    projector = memory_per_rank(model, par, train, sizes, trainable=["projector"])
    counts = count_parameters(model)
    stage_indexers = counts["lm_parts"]["indexer"] / 4  # 12 of 48 layers, replicated over TP
    for stage in ("first_stage", "last_stage"):
        assert indexers[stage]["params"] == everything[stage]["params"]
        assert indexers[stage]["grads"] == pytest.approx(4 * stage_indexers)
        assert indexers[stage]["optimizer"] == pytest.approx(12 * stage_indexers / 8)  # sharded over DP
    assert projector["first_stage"]["grads"] == pytest.approx(4 * counts["projector"])
    assert projector["last_stage"]["grads"] == 0
