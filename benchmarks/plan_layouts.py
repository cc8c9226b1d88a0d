"""Planned memory per rank (keye_train/planning/memory.py, no device) of a recipe over layouts with context
parallelism: every TP x CP x PP x DP = world layout with EP / expert-TP / recompute from the grid below that passes
the layout and batch checks (and the stage's config checks: RL stages refuse PP and CP), sorted by the heaviest
column (pipeline stages; RL stages also the rollout). Prints a table and writes
benchmarks/results/plan_layouts_<recipe>.json.

    python benchmarks/plan_layouts.py [--recipe stage3_longcontext] [--world 128] [--limit 120] [overrides...]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, git_state, write_result  # noqa: E402
from keye_train.config.compose import load_config  # noqa: E402
from keye_train.planning.memory import GIB, plan_memory  # noqa: E402
from parallel.layout import LayoutError, check_batch, check_layout  # noqa: E402

GRID = {
    "tp": (1, 2, 4),
    "cp": (1, 2, 4, 8, 16),
    "pp": (1, 2, 4),
    "ep": (8, 16, 32),
    "etp": (None, 1),  # None: expert TP = TP
    "recompute": ("selective", "full"),
}


def plan(recipe: str, world: int, point: dict, overrides: list[str]):
    keys = [f"parallel.{k}={'null' if v is None else v}" for k, v in point.items()]
    try:
        cfg = load_config([f"recipe={recipe}", *overrides, *keys])
    except ValueError:  # a layout the stage refuses (RL: no PP or CP); the recipe itself composed in main
        return None
    try:
        sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, world)
        check_batch(cfg.train, sizes)
    except LayoutError:
        return None
    memory = plan_memory(cfg, sizes)
    row = dict(point, dp=sizes.dp, expert_dp=sizes.expert_dp, etp=sizes.etp)
    for stage, items in memory.items():
        for item in ("params", "grads", "optimizer", "activations", "teacher", "total"):
            if item in items:
                row[f"{stage}_{item}_gib"] = round(items[item] / GIB, 2)
    row["worst_gib"] = max(items["total"] for items in memory.values()) / GIB
    row["worst_gib"] = round(row["worst_gib"], 2)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="stage3_longcontext")
    parser.add_argument("--world", type=int, default=128)
    parser.add_argument("--limit", type=float, default=120.0, help="GiB per rank to fit")
    parser.add_argument("--show", type=int, default=30)
    args, overrides = parser.parse_known_args(argv)
    load_config([f"recipe={args.recipe}", *overrides])  # a recipe that does not compose fails here, by its key
    rows, seen = [], set()
    for values in itertools.product(*GRID.values()):
        row = plan(args.recipe, args.world, dict(zip(GRID, values)), overrides)
        key = row and tuple(row[k] for k in ("tp", "cp", "pp", "ep", "etp", "recompute"))
        if row is not None and key not in seen:  # etp unset and etp = tp are one layout
            seen.add(key)
            rows.append(row)
    rows.sort(key=lambda r: (r["worst_gib"], r["cp"] * r["tp"]))
    header = f"{'tp':>3}{'cp':>4}{'pp':>4}{'dp':>4}{'ep':>4}{'etp':>4}  {'recompute':<10}"
    header += f"{'act 1st':>9}{'total 1st':>10}{'total last':>11}{'worst':>8}"
    print(f"{args.recipe} on {args.world} ranks, planned GiB per rank (limit {args.limit}):\n{header}")
    for r in rows[: args.show]:
        print(
            f"{r['tp']:>3}{r['cp']:>4}{r['pp']:>4}{r['dp']:>4}{r['ep']:>4}{r['etp']:>4}  {r['recompute']:<10}"
            f"{r['first_stage_activations_gib']:>9.1f}{r['first_stage_total_gib']:>10.1f}"
            f"{r['last_stage_total_gib']:>11.1f}{r['worst_gib']:>8.1f}"
            f"{'  fits' if r['worst_gib'] <= args.limit else ''}"
        )
    result = {
        "benchmark": "plan_layouts",
        "device": "none: planned memory from keye_train/planning/memory.py, not a measurement",
        **git_state(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "recipe": args.recipe,
        "world": args.world,
        "overrides": overrides,
        "limit_gib": args.limit,
        "grid": {k: list(v) for k, v in GRID.items()},
        "rows": rows,
    }
    write_result(REPO / "benchmarks" / "results" / f"plan_layouts_{args.recipe}.json", result)


if __name__ == "__main__":
    main()
