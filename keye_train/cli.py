"""`keye-train [train|plan|chain|launch|report|convert] [hydra overrides...]`: validate, then train (spawning
ranks when asked), plan, run a stage chain, launch on torchrun / SLURM (launch/cli.py), plot a run (report.py),
or convert HF checkpoints (convert_cli.py)."""

from __future__ import annotations

import os
import sys

from omegaconf import OmegaConf


def _die(message: str) -> None:
    print(f"keye-train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _spawn(nproc: int, argv: list[str], command: str = "train") -> int:
    """Start the ranks under torchrun on this machine, forwarding preemption signals (keye_train.operations)."""
    from keye_train.config import LaunchConfig
    from keye_train.operations import run_forwarding_signals
    from launch.torchrun import torchrun_command

    return run_forwarding_signals(torchrun_command(LaunchConfig(gpus_per_node=nproc), argv, rdzv_id="local",
                                                   command=command))


def _single_process_env() -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "plan", "chain", "launch", "report", "convert")
    command = argv.pop(0) if argv and argv[0] in commands else "train"
    if command == "convert":
        from keye_train.convert_cli import run

        try:
            return run(argv)
        except (ValueError, FileNotFoundError, KeyError) as err:
            _die(str(err))
    if command == "report":
        if len(argv) != 1 or "=" in argv[0]:
            _die("usage: keye-train report <run_dir or chain run_root>")
        from keye_train.report import write_report

        try:
            for path in write_report(argv[0]):
                print(path)
        except ValueError as err:
            _die(str(err))
        return 0
    if command == "launch":
        from launch.cli import main as launch_main

        try:
            return launch_main(argv)
        except ValueError as err:
            _die(str(err))
    if command == "chain":
        if not argv or "=" in argv[0]:
            _die("usage: keye-train chain <name or path.yaml> [overrides for every stage...]")
        from keye_train.chain import run_chain

        try:
            return run_chain(argv[0], argv[1:])
        except ValueError as err:
            _die(str(err))
    if command == "plan" and argv[:1] == ["chain"]:
        if len(argv) < 2 or "=" in argv[1]:
            _die("usage: keye-train plan chain <name or path.yaml> [overrides for every stage...]")
        from keye_train.chain import check_chain, load_chain
        from keye_train.plan import print_chain_budget

        try:
            chain = load_chain(argv[1])
            configs = check_chain(chain, argv[2:], check_data=False, world="auto")
        except ValueError as err:
            _die(str(err))
        print_chain_budget([s.name for s in chain.stages], configs)
        return 0
    from keye_train.configure import load_checked_config

    try:
        world = int(os.environ.get("WORLD_SIZE", 0)) or (None if command == "train" else "auto")
        cfg, sizes = load_checked_config(argv, world, check_data=command == "train")
    except ValueError as err:
        _die(str(err))
    if command == "train":
        from parallel.layout import require_colocated

        try:
            require_colocated(cfg.parallel)
        except ValueError as err:
            _die(str(err))
    if command == "plan":
        from keye_train.plan import print_plan

        print_plan(cfg, sizes)
        return 0
    if "RANK" not in os.environ and cfg.parallel.nproc > 1:
        return _spawn(cfg.parallel.nproc, argv)
    _single_process_env()
    from keye_train.trainer import Trainer

    trainer = Trainer(cfg)
    if trainer.is_metrics_owner():
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), flush=True)
    history = trainer.fit()
    if trainer.is_metrics_owner() and history:
        print(f"done: step {trainer.step}, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}, "
              f"checkpoints in {trainer.run_dir / 'checkpoints'}", flush=True)
    from parallel.layout import destroy_process_groups

    destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
