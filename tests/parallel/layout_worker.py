"""One rank of a layout-equivalence run (started by torchrun from test_layouts.py).

Phase A: megatron DDP without the distributed optimizer; records the loss and the gradients of sampled
parameters. Phase B: a fresh model with the distributed optimizer; records the loss and the sampled weights
after one optimizer step. The 1-rank run saves full tensors; a parallel run cuts its own shard out of them
and compares locally, so no gathering is needed.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from parallel import cpu_compat

cpu_compat.install()

from megatron.core import parallel_state  # noqa: E402

from data_pipeline.loader import ShardLoader  # noqa: E402
from data_pipeline.tokenizer import KeyeTokenizer  # noqa: E402
from keye_train.config.compose import load_config  # noqa: E402
from keye_train.model.builder import build_model, initialize_weights, parameter_shards  # noqa: E402
from keye_train.training.objectives.next_token import NextTokenObjective  # noqa: E402
from keye_train.training.optim import finalize_grads, optimizer_step  # noqa: E402
from keye_train.training.schedules import schedule_for  # noqa: E402
from keye_train.training.schedules.split import VisionFeed  # noqa: E402
from keye_train.training.setup import wrap_parts  # noqa: E402
from parallel import context  # noqa: E402
from parallel.layout import check_batch, check_layout, init_process_groups  # noqa: E402
from parallel.placement import placement_for  # noqa: E402

SAMPLED = (
    "layers.0.self_attention.linear_qkv.weight",
    "layers.3.self_attention.linear_proj.weight",
    "layers.1.self_attention.q_layernorm.weight",
    "layers.2.mlp.router.weight",
    "layers.0.mlp.experts.expert_1.linear_fc1.weight",
    "layers.3.mlp.experts.expert_6.linear_fc2.weight",
    "layers.2.input_layernorm.weight",
    "final_layernorm.weight",
    "output_layer.weight",
    "embedding.word_embeddings.weight",
    "vision.encoder.blocks.layers.1.self_attention.linear_qkv.weight",
    "vision.encoder.pos_table",
    "vision.projector.linear_2.weight",
)


def sampled(name: str) -> bool:
    return name.endswith(SAMPLED)


def replica_batch(cfg, dp_rank: int, dp: int):
    """An LM DP replica's share of the first global batch, read the way the trainer reads it."""
    loader = ShardLoader(cfg.data, cfg.train.seq_length, cfg.train.global_batch, cfg.train.seed, dp_rank, dp)
    cfg.model.tokens = loader.tokenizer.ids
    batches = loader.next_step()
    loader.close()
    return batches


def rank_batches(cfg, placement, dp: int):
    """A callable giving this rank's micro-batches of the step: its replica's packs, or on a split ViT rank the
    patches the LM's first stage sends it when the step runs (the trainer's data source there)."""
    if placement.hosts_lm():
        mine = replica_batch(cfg, parallel_state.get_data_parallel_rank(), dp)
        return lambda: mine
    cfg.model.tokens = KeyeTokenizer(cfg.data.tokenizer).ids
    return VisionFeed(placement, torch.device("cpu")).next_step


def run_phase(cfg, next_step, placement, distributed_optimizer: bool):
    """One forward-backward of the batch through the trainer's own schedule and objective."""
    parts = build_model(cfg.model, cfg.parallel, torch.float32, False, placement)
    initialize_weights(parts, cfg.model, cfg.train.seed)
    model = wrap_parts(parts, cfg.optim, torch.float32, distributed_optimizer, placement)
    mine = next_step()
    objective = NextTokenObjective(placement, torch.device("cpu"))
    objective.begin_step(mine)
    schedule = schedule_for(cfg, model, placement)
    outputs = schedule.run(mine, objective)
    result = objective.end_step(outputs)
    loss = result.loss if placement.is_last_stage() else None
    return parts, model.ddp_chunks, model.optimizer, loss, getattr(schedule, "encoded", None)


def main(out_dir: str, overrides: list[str]):
    cfg = load_config(overrides)
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, int(os.environ["WORLD_SIZE"]))
    check_batch(cfg.train, sizes)
    init_process_groups(cfg.parallel, sizes, "gloo")
    placement = placement_for(cfg.parallel, sizes)
    torch.manual_seed(0)
    next_step = rank_batches(cfg, placement, sizes.dp)
    rank, out = dist.get_rank(), Path(out_dir)
    reference = out / "reference.npz"
    is_reference = dist.get_world_size() == 1

    parts, chunks, _, loss_a, encoded = run_phase(cfg, next_step, placement, distributed_optimizer=False)
    finalize_grads(chunks)
    grads = {info.name: p.main_grad.detach().clone() for p, info in parameter_shards(parts) if sampled(info.name)}
    shards = {info.name: info for p, info in parameter_shards(parts) if sampled(info.name)}

    parts, chunks, optimizer, loss_b, _ = run_phase(cfg, next_step, placement, distributed_optimizer=True)
    updated, grad_norm = optimizer_step(optimizer, chunks)
    weights = {info.name: p.detach().clone() for p, info in parameter_shards(parts) if sampled(info.name)}

    report = {
        "rank": rank,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "grad_norm": grad_norm,
        "updated": updated,
        "encoded": encoded,  # split / spread: the micro-batches this rank ran through the ViT (None: not counted)
        "cp": context.size(),  # > 1: the schedule sliced every pack and the attention gathered K/V
        "grad_rel_err": {},
        "weight_rel_err": {},
    }
    if is_reference:
        np.savez(
            reference,
            **{f"grad/{k}": v.numpy() for k, v in grads.items()},
            **{f"weight/{k}": v.numpy() for k, v in weights.items()},
        )
    else:
        with np.load(reference, allow_pickle=False) as ref:
            for kind, tensors, field in (("grad", grads, "grad_rel_err"), ("weight", weights, "weight_rel_err")):
                for name, local in tensors.items():
                    expected = shards[name].cut(torch.from_numpy(ref[f"{kind}/{name}"]))
                    err = (local - expected).norm() / expected.norm().clamp_min(1e-30)
                    report[field][name] = float(err)
    (out / f"report_{dist.get_world_size()}_{rank}.json").write_text(json.dumps(report))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
