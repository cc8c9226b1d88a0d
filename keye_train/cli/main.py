"""`keye-train [train|plan|chain|launch|report|convert|eval] [hydra overrides...]`: check the config, then train
(starting the ranks when asked), plan, run a stage chain, launch on torchrun / SLURM, plot a run, convert HF
checkpoints, or evaluate one. Each subcommand lives in its own module; a bad config stops here, before any rank
starts."""

from __future__ import annotations

import os
import sys

from keye_train.third_party_warnings import silence_known_warnings

COMMANDS = ("train", "plan", "chain", "launch", "report", "convert", "eval")


def _die(message: str) -> int:
    print(f"keye-train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _run(command: str, argv: list[str]) -> int:
    if command == "convert":
        from keye_train.cli import convert

        return convert.run(argv)
    if command == "report":
        from keye_train.cli import report

        return report.run(argv)
    if command == "launch":
        from keye_train.cli import launch

        return launch.run(argv)
    if command == "chain":
        from keye_train.cli import chain

        return chain.run(argv)
    if command == "eval":
        from keye_train.cli import eval as evaluate

        return evaluate.run(argv)
    if command == "plan" and argv[:1] == ["chain"]:
        from keye_train.cli import chain

        return chain.plan(argv[1:])
    from keye_train.config.compose import load_checked_config

    world = int(os.environ.get("WORLD_SIZE", 0)) or (None if command == "train" else "auto")
    if command == "plan":
        from keye_train.cli import plan

        return plan.run(argv, world)
    cfg, sizes = load_checked_config(argv, world, check_data=command == "train")
    from keye_train.cli import train

    return train.run(cfg, argv)


def main(argv: list[str] | None = None) -> int:
    silence_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    try:
        return _run(command, argv)
    except (ValueError, FileNotFoundError, KeyError) as err:
        return _die(str(err).strip("'\""))


if __name__ == "__main__":
    sys.exit(main())
