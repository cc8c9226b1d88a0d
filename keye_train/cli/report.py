"""`keye-train report <run_dir>`: PNG plots of a run's (or a chain's) logged metrics, for offline users.

Reads <run_dir>/metrics.jsonl; a chain root (stage folders each with metrics.jsonl) is drawn as one timeline
with the stages in the order they ran, separated by dashed lines. A step logged twice (a run resumed from an
earlier checkpoint) keeps its last row. Writes <run_dir>/report/<panel>.png and overview.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PANELS = {  # file name -> (title, metric keys or key prefixes ending in "/")
    "loss": ("loss", ["loss"]),
    "lr": ("learning rate", ["lr"]),
    "grad_norm": ("gradient norm", ["grad_norm"]),
    "tokens_per_s": ("throughput (tokens/s)", ["tokens_per_s"]),
    "moe": ("MoE balance", ["moe/"]),
    "dsa": ("DSA indexer", ["dsa/"]),
}


def read_rows(path: Path) -> list[dict]:
    """Rows by step, ascending; the last row of a repeated step wins."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def stage_runs(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """[(stage name, rows)]: the run itself, or a chain's stages in the order they last wrote metrics."""
    own = run_dir / "metrics.jsonl"
    if own.is_file():
        return [(run_dir.name, read_rows(own))]
    stages = sorted((p for p in run_dir.glob("*/metrics.jsonl")), key=lambda p: p.stat().st_mtime)
    if not stages:
        raise ValueError(f"{run_dir}: no metrics.jsonl here or in its stage folders; is it a run_dir?")
    return [(p.parent.name, read_rows(p)) for p in stages]


def stage_starts(stages: list[tuple[str, list[dict]]]) -> list[int]:
    """The x offset of each stage: the steps of the stages before it."""
    starts, offset = [], 0
    for _, rows in stages:
        starts.append(offset)
        offset += max((int(r["step"]) for r in rows), default=0)
    return starts


def series(stages: list[tuple[str, list[dict]]], keys: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (global x, values) over all stages, x continuing across stage boundaries."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for (_, rows), offset in zip(stages, stage_starts(stages)):
        for row in rows:
            for name, value in row.items():
                wanted = any(name == k or (k.endswith("/") and name.startswith(k)) for k in keys)
                if wanted and isinstance(value, (int, float)) and math.isfinite(value):
                    xs, ys = out.setdefault(name, ([], []))
                    xs.append(offset + int(row["step"]))
                    ys.append(float(value))
    return out


def _draw(ax, stages, title: str, keys: list[str]) -> bool:
    data = series(stages, keys)
    for name, (xs, ys) in sorted(data.items()):
        ax.plot(xs, ys, label=name, linewidth=1.2)
    for index, ((name, _), offset) in enumerate(zip(stages, stage_starts(stages)) if len(stages) > 1 else []):
        if index:
            ax.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(
            name,
            (offset, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            fontsize=6,
            va="top",
            color="grey",
        )
    ax.set_title(title)
    ax.set_xlabel("step")
    if len(data) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return bool(data)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    stages = stage_runs(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    drawn = []
    for name, (title, keys) in PANELS.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if _draw(ax, stages, title, keys):
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=110)
            written.append(out / f"{name}.png")
            drawn.append(name)
        plt.close(fig)
    cols = 2
    fig, axes = plt.subplots(
        math.ceil(len(drawn) / cols), cols, figsize=(13, 3.6 * math.ceil(len(drawn) / cols)), squeeze=False
    )
    for ax, name in zip(axes.flat, drawn):
        _draw(ax, stages, *PANELS[name])
    for ax in list(axes.flat)[len(drawn) :]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: " + " -> ".join(n for n, _ in stages))
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=110)
    plt.close(fig)
    return written + [out / "overview.png"]


def run(argv: list[str]) -> int:
    """`keye-train report <run_dir or chain run_root>`."""
    if len(argv) != 1 or "=" in argv[0]:
        raise ValueError("usage: keye-train report <run_dir or chain run_root>")
    for path in write_report(argv[0]):
        print(path)
    return 0
