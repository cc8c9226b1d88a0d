"""One rank of a layout-equivalence run (started by torchrun from test_layouts.py).

Phase A: megatron DDP without the distributed optimizer; records the loss and the gradients of sampled
parameters. Phase B: a fresh model with the distributed optimizer; records the loss and the sampled weights
after one optimizer step. The 1-rank run saves full tensors; a parallel run cuts its own shard out of them
and compares locally, so no gathering is needed.

Options before the overrides: `--save-checkpoint=RUN_DIR` writes the state after phase B's step as the trainer's
step-1 checkpoint (checkpoint/store.py, with the data position after the first batch); `--next-steps` (the 1-rank
reference) continues phase B's model: the loss of the first batch again, one trainer step on the second batch,
the loss of the third (what a run resumed or started from that checkpoint must see). `--skip-drill` (with
train.inject_nonfinite_at_step=1) then runs the trainer's step 1 on the next batch as loop.py does: rank 0 (a ViT
rank under split) poisons its gradients, the fault policy judges on every rank, and the update is skipped or not.

`--layouts=SPEC.json` (a {name: [overrides]} map) runs several layouts of this world size one after another in
this one torchrun world, megatron's groups torn down and rebuilt between them, each from fresh weights and the
same seeds; layout NAME writes report_NAME_RANK.json (a single run: report_WORLD_RANK.json).
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
from keye_train import checkpoint  # noqa: E402
from keye_train.config.compose import load_config  # noqa: E402
from keye_train.model.builder import build_model, initialize_weights, parameter_shards  # noqa: E402
from keye_train.training.fault_policy import BadStepPolicy  # noqa: E402
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
    "vision.encoder.blocks.layers.0.mlp.linear_fc2.weight",
    "vision.encoder.pos_table",
    "vision.projector.linear_2.weight",
)


def sampled(name: str) -> bool:
    return name.endswith(SAMPLED)


def rank_batches(cfg, placement, dp: int):
    """(a callable giving this rank's micro-batches of the first step, the data source): its replica's packs, read
    the way the trainer reads them, or on a split ViT rank the patches the LM's first stage sends it when the step
    runs (the trainer's data source there)."""
    if placement.hosts_lm():
        dp_rank = parallel_state.get_data_parallel_rank()
        loader = ShardLoader(cfg.data, cfg.train.seq_length, cfg.train.global_batch, cfg.train.seed, dp_rank, dp)
        cfg.model.tokens = loader.tokenizer.ids
        mine = loader.next_step()
        return (lambda: mine), loader
    cfg.model.tokens = KeyeTokenizer(cfg.data.tokenizer).ids
    feed = VisionFeed(placement, torch.device("cpu"))
    return feed.next_step, feed


def step_loss(cfg, model, placement, mine: list, forward_only: bool = False):
    """The step's loss (None off the last stage) through the trainer's own schedule and objective; also the
    schedule (it counts the micro-batches a rank encoded)."""
    objective = NextTokenObjective(placement, torch.device("cpu"))
    objective.begin_step(mine)
    schedule = schedule_for(cfg, model, placement)
    result = objective.end_step(schedule.run(mine, objective, forward_only))
    return (result.loss if placement.is_last_stage() else None), schedule


def run_phase(cfg, next_step, placement, distributed_optimizer: bool):
    """One forward-backward of the batch from fresh weights."""
    parts = build_model(cfg.model, cfg.parallel, torch.float32, False, placement)
    initialize_weights(parts, cfg.model, cfg.train.seed)
    model = wrap_parts(parts, cfg.optim, torch.float32, distributed_optimizer, placement)
    loss, schedule = step_loss(cfg, model, placement, next_step())
    return model, loss, getattr(schedule, "encoded", None)


def next_steps(cfg, model, placement, data, first: list) -> dict:
    """From the model after one update: the first batch's loss again, a trainer step on the second batch (loss,
    norm), the third batch's loss after it."""
    same, _ = step_loss(cfg, model, placement, first, forward_only=True)
    model.zero_grad()
    second, _ = step_loss(cfg, model, placement, data.next_step())
    _, norm = optimizer_step(model.optimizer, model.ddp_chunks)
    third, _ = step_loss(cfg, model, placement, data.next_step(), forward_only=True)
    return {"same_batch_loss": same, "step2_loss": second, "step2_grad_norm": norm, "step3_loss": third}


def save_step_one(run_dir: str, cfg, model, data, updated: bool, sizes) -> None:
    """The state after the first update as the trainer checkpoints it (loop.py Trainer.save)."""
    policy = BadStepPolicy(cfg.train, torch.device("cpu"), log=print)
    extra = {"data": data.state_dict(), "run_id": "layouts", "updates": int(updated), **policy.state_dict()}
    checkpoint.save(Path(run_dir), 1, model.parts, model.optimizer, extra, sizes.record(), keep_last=1)


def skip_drill(cfg, model, placement, data, parts) -> dict:
    """loop.py's step: forward-backward, the drill, the policy's collective judgement, the update only if it
    allows one. Returns this rank's verdict and whether its sampled weights stayed put."""
    before = {info.name: p.detach().clone() for p, info in parameter_shards(parts) if sampled(info.name)}
    policy = BadStepPolicy(cfg.train, torch.device("cpu"), log=print)
    objective = NextTokenObjective(placement, torch.device("cpu"))
    microbatches = data.next_step()
    model.zero_grad()
    objective.begin_step(microbatches)
    outputs = schedule_for(cfg, model, placement).run(microbatches, objective)
    policy.drill(1, model.ddp_chunks)
    reason = policy.judge(1, objective.end_step(outputs), model.ddp_chunks)
    if reason is None:
        optimizer_step(model.optimizer, model.ddp_chunks)
    after = {info.name: p.detach() for p, info in parameter_shards(parts) if sampled(info.name)}
    unchanged = bool(before) and all(torch.equal(before[k], after[k]) for k in before)
    return {"drill_skip_reason": reason, "drill_streak": policy.streak, "drill_weights_unchanged": unchanged}


def main(out_dir: str, args: list[str], report_name: str | None = None):
    options = [a for a in args if a.startswith("--")]
    save_to = next((a.split("=", 1)[1] for a in options if a.startswith("--save-checkpoint=")), None)
    cfg = load_config([a for a in args if not a.startswith("--")])
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, int(os.environ["WORLD_SIZE"]))
    check_batch(cfg.train, sizes)
    init_process_groups(cfg.parallel, sizes, "gloo")
    placement = placement_for(cfg.parallel, sizes)
    torch.manual_seed(0)
    next_step, data = rank_batches(cfg, placement, sizes.dp)
    rank, out = dist.get_rank(), Path(out_dir)
    reference = out / "reference.npz"
    is_reference = dist.get_world_size() == 1

    model, loss_a, encoded = run_phase(cfg, next_step, placement, distributed_optimizer=False)
    parts = model.parts
    finalize_grads(model.ddp_chunks)
    grads = {info.name: p.main_grad.detach().clone() for p, info in parameter_shards(parts) if sampled(info.name)}
    shards = {info.name: info for p, info in parameter_shards(parts) if sampled(info.name)}

    model, loss_b, _ = run_phase(cfg, next_step, placement, distributed_optimizer=True)
    parts = model.parts
    updated, grad_norm = optimizer_step(model.optimizer, model.ddp_chunks)
    weights = {info.name: p.detach().clone() for p, info in parameter_shards(parts) if sampled(info.name)}
    if save_to is not None:
        save_step_one(save_to, cfg, model, data, updated, sizes)
    after = next_steps(cfg, model, placement, data, next_step()) if "--next-steps" in options else {}
    if "--skip-drill" in options:
        after.update(skip_drill(cfg, model, placement, data, parts))
    data.close()

    report = {
        "rank": rank,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "grad_norm": grad_norm,
        "updated": updated,
        "encoded": encoded,  # split / spread: the micro-batches this rank ran through the ViT (None: not counted)
        "cp": context.size(),  # > 1: the schedule sliced every pack and the attention gathered K/V
        "tp_split": sorted(name for name, info in shards.items() if info.split),  # sampled tensors this rank cut
        "grad_rel_err": {},
        "weight_rel_err": {},
        **after,
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
    (out / f"report_{report_name or dist.get_world_size()}_{rank}.json").write_text(json.dumps(report))
    context.teardown()
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    if sys.argv[2].startswith("--layouts="):
        for name, layout_args in json.loads(Path(sys.argv[2].split("=", 1)[1]).read_text()).items():
            main(sys.argv[1], layout_args, name)
    else:
        main(sys.argv[1], sys.argv[2:])
    dist.destroy_process_group()
