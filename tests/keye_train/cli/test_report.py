"""`keye-train report`: plots from metrics.jsonl, last row of a repeated step wins, chains drawn in stage order."""

import json
import os
import time

from keye_train.cli.report import read_rows, series, stage_runs
from tests.helpers import keye_train


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(step, loss, **more):
    return {
        "step": step,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 100.0 + step,
        "moe/max_over_mean_load": 1.5,
        **more,
    }


def test_a_resumed_step_keeps_its_last_row_and_every_panel_is_written(tmp_path):
    run = tmp_path / "run"
    write_metrics(
        run,
        [
            row(1, 5.0),
            row(2, 4.0),
            row(3, 9.9),
            row(2, 4.5),
            row(3, 3.5),  # resumed from step 1
            row(4, float("nan"), **{"dsa/kl": 0.2}),
        ],
    )
    assert [(r["step"], r["loss"]) for r in read_rows(run / "metrics.jsonl")][:3] == [(1, 5.0), (2, 4.5), (3, 3.5)]
    xs, ys = series(stage_runs(run), ["loss"])["loss"]
    assert (xs, ys) == ([1, 2, 3], [5.0, 4.5, 3.5])  # the non-finite loss is left out of the plot
    done = keye_train("report", str(run))
    assert done.returncode == 0, done.stderr
    names = {p.name for p in (run / "report").iterdir()}
    assert names == {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "moe.png", "dsa.png", "overview.png"}
    for name in names:
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_chain_is_one_timeline_in_the_order_its_stages_ran(tmp_path):
    write_metrics(tmp_path / "chain" / "b_second", [row(1, 3.0), row(2, 2.0)])
    write_metrics(tmp_path / "chain" / "a_first", [row(1, 6.0), row(2, 5.0), row(3, 4.0)])
    now = time.time()
    os.utime(tmp_path / "chain" / "a_first" / "metrics.jsonl", (now - 60, now - 60))  # ran first
    stages = stage_runs(tmp_path / "chain")
    assert [name for name, _ in stages] == ["a_first", "b_second"]
    assert series(stages, ["loss"])["loss"] == ([1, 2, 3, 4, 5], [6.0, 5.0, 4.0, 3.0, 2.0])
    assert series(stages, ["moe/"]).keys() == {"moe/max_over_mean_load"}


def test_a_folder_without_metrics_is_named_in_the_error(tmp_path):
    done = keye_train("report", str(tmp_path))
    assert done.returncode == 2 and f"{tmp_path}: no metrics.jsonl" in done.stderr
