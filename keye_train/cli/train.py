"""`keye-train [train] [overrides...]`: check the config, start the ranks (if not under torchrun), train."""

from __future__ import annotations

from keye_train.cli.spawn import needs_spawn, single_process_env, spawn_local


def check_backend(cfg) -> None:
    """parallel.backend=nccl needs GPUs on this machine (checked before any rank starts)."""
    import torch

    if cfg.parallel.backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend=nccl: no CUDA device on this machine; use auto or gloo")


def run(cfg, argv: list[str]) -> int:
    from parallel.layout import require_trainable

    require_trainable(cfg.parallel, cfg.rl.enabled)
    check_backend(cfg)
    if needs_spawn(cfg.parallel.nproc):
        return spawn_local(cfg.parallel.nproc, argv)
    single_process_env()
    from keye_train.training import train
    from parallel.layout import destroy_process_groups

    trainer, history = train(cfg)
    if trainer.is_metrics_owner() and history:
        print(
            f"done: step {trainer.step}, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}, "
            f"checkpoints in {trainer.run_dir / 'checkpoints'}",
            flush=True,
        )
    destroy_process_groups()
    return 0
