"""Training: one loop (`loop.py`) given a data source, an objective (`objectives/`) and a schedule
(`schedules/`), with the rank's setup, optimizer, bad-step policy, preemption and metrics beside it.

`train(cfg)` runs a stage on this rank (called on every rank, under torchrun or alone); a caller may pass its
own objective or schedule factory, as Megatron-Bridge's `pretrain(config, forward_step_func)` takes its step.
"""

from __future__ import annotations


def build_trainer(cfg, objective_factory=None, schedule_factory=None):
    """This rank's Trainer for the stage described by `cfg`; each factory takes (cfg, placement, device) for the
    objective and (cfg, model, placement) for the schedule."""
    import torch.distributed as dist

    from data_pipeline.loader import ShardLoader
    from keye_train.training.loop import Trainer
    from keye_train.training.objectives import objective_for
    from keye_train.training.schedules import schedule_for
    from keye_train.training.setup import build_rl_data, build_train_model, start_rank

    ctx = start_rank(cfg)
    if cfg.rl.enabled:  # an RL or MOPD stage: prompts rolled out on the model itself (posttrain/rl_data.py)
        data, model = build_rl_data(cfg, ctx)
    elif not ctx.placement.hosts_lm():  # placement=split's ViT ranks: patches come from the LM's first stage
        from data_pipeline.tokenizer import KeyeTokenizer
        from keye_train.training.schedules.split import VisionFeed

        cfg.model.tokens = KeyeTokenizer(cfg.data.tokenizer).ids
        data, model = VisionFeed(ctx.placement, ctx.device), build_train_model(cfg, ctx)
    else:
        group = ctx.placement.data_parallel_group()
        data = ShardLoader(
            cfg.data,
            cfg.train.seq_length,
            cfg.train.global_batch,
            cfg.train.seed,
            dist.get_rank(group),
            dist.get_world_size(group),
            log=lambda line: print(f"[rank {dist.get_rank()}] {line}", flush=True),
            exchange=ctx.placement.gather_over_data_parallel,
        )  # rejects and spare samples, per step
        cfg.model.tokens = data.tokenizer.ids  # the data's special ids drive the visual-token scatter
        model = build_train_model(cfg, ctx)
    objective = (objective_factory or objective_for)(cfg, ctx.placement, ctx.device)
    schedule = (schedule_factory or schedule_for)(cfg, model, ctx.placement)
    return Trainer(cfg, ctx, model, data, objective, schedule)


def train(cfg, objective_factory=None, schedule_factory=None):
    """Run the stage described by `cfg` on this rank; returns (trainer, per-step metrics)."""
    from omegaconf import OmegaConf

    trainer = build_trainer(cfg, objective_factory, schedule_factory)
    if trainer.is_metrics_owner():
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), flush=True)
    return trainer, trainer.fit()
