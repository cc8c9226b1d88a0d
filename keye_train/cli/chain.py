"""Stage chains: `keye-train chain <name> [overrides...]` runs the stages of `recipes/chain/<name>.yaml` in order.

Each stage is a recipe plus overrides, run in `<run_root>/<stage name>`. A stage starts from the previous
stage's final weights (`checkpoint.init_from`: weights only, fresh optimizer and data state); an interrupted
stage resumes its own full state; a finished stage (its last checkpoint is at train.steps) is skipped, so
re-running the command continues the chain. Every stage's config is composed and checked before the first
one starts. Each stage runs in its own process tree (`keye-train ...`), W&B-grouped by the chain.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from keye_train.config.compose import RECIPES_DIR
from launch.processes import run_forwarding_signals


@dataclass
class ChainStage:
    name: str = "???"
    recipe: str = "???"
    overrides: List[str] = field(default_factory=list)


@dataclass
class ChainConfig:
    run_root: str = "runs/chain"
    common: List[str] = field(default_factory=list)  # overrides for every stage
    stages: List[ChainStage] = field(default_factory=list)


def load_chain(name: str) -> ChainConfig:
    path = Path(name) if name.endswith(".yaml") else RECIPES_DIR / "chain" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (RECIPES_DIR / "chain").glob("*.yaml"))
        raise ValueError(f"chain {name!r} not found (no {path}); known chains: {', '.join(known)}")
    chain = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ChainConfig), OmegaConf.load(path)))
    names = [s.name for s in chain.stages]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"chain {name!r}: stages need distinct names, got {names}")
    return chain


def stage_arguments(chain: ChainConfig, index: int, extra: list[str]) -> list[str]:
    stage = chain.stages[index]
    args = [
        f"recipe={stage.recipe}",
        *chain.common,
        *stage.overrides,
        *extra,
        f"run_dir={Path(chain.run_root) / stage.name}",
        f"logging.wandb_group={Path(chain.run_root).name}",
    ]
    if index > 0:
        args.append(f"checkpoint.init_from={Path(chain.run_root) / chain.stages[index - 1].name}")
    return args


def check_chain(chain: ChainConfig, extra: list[str], check_data: bool = True, world: str | None = None) -> list:
    """Compose and validate every stage; a failure names the stage and the key."""
    from keye_train.config.compose import load_checked_config

    configs = []
    for index, stage in enumerate(chain.stages):
        try:
            cfg, _ = load_checked_config(stage_arguments(chain, index, extra), world, check_data)
        except ValueError as err:
            raise ValueError(f"chain stage {stage.name!r} (recipe {stage.recipe}): {err}") from err
        configs.append(cfg)
    return configs


def finished(cfg) -> bool:
    from keye_train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(Path(cfg.run_dir))
    return latest is not None and int(latest.name.split("_")[1]) >= cfg.train.steps


def run(argv: list[str]) -> int:
    """`keye-train chain <name or path.yaml> [overrides for every stage...]`."""
    if not argv or "=" in argv[0]:
        raise ValueError("usage: keye-train chain <name or path.yaml> [overrides for every stage...]")
    name, extra = argv[0], argv[1:]
    chain = load_chain(name)
    configs = check_chain(chain, extra)
    for index, (stage, cfg) in enumerate(zip(chain.stages, configs)):
        if finished(cfg):
            print(f"chain {name}: stage {stage.name} already finished ({cfg.run_dir}), skipped", flush=True)
            continue
        print(
            f"chain {name}: stage {index + 1}/{len(chain.stages)} {stage.name} ({stage.recipe}) in {cfg.run_dir}",
            flush=True,
        )
        code = run_forwarding_signals([sys.executable, "-m", "keye_train.cli", *stage_arguments(chain, index, extra)])
        if code != 0 or not finished(cfg):
            print(
                f"chain {name}: stage {stage.name} stopped (exit code {code}); run the same command to continue",
                flush=True,
            )
            return code or 1
    print(f"chain {name}: all {len(chain.stages)} stages finished under {chain.run_root}", flush=True)
    return 0


def plan(argv: list[str]) -> int:
    """`keye-train plan chain <name or path.yaml> [overrides...]`: the token budget of every stage."""
    from keye_train.cli.plan import print_chain_budget

    if not argv or "=" in argv[0]:
        raise ValueError("usage: keye-train plan chain <name or path.yaml> [overrides for every stage...]")
    chain = load_chain(argv[0])
    configs = check_chain(chain, argv[1:], check_data=False, world="auto")
    print_chain_budget([s.name for s in chain.stages], configs)
    return 0
