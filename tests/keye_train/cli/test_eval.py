"""`keye-train eval`: the grounding and multiple-choice evaluators run with the rollout engine on a checkpoint
(tiny model, one rank, a demo clip); each writes its metrics and one response per item, and the metrics are
those of the written responses scored again offline."""

import json

import pytest

from keye_train.posttrain.evaluation import grounding, mcq
from keye_train.posttrain.evaluation.jsonl import read_jsonl
from tests.helpers import QUIET, ensure_test_data, keye_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = ensure_test_data()
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    args = ["parallel.nproc=1", "train.steps=1", "train.global_batch=1", "train.seq_length=128"]
    done = keye_train(*QUIET, *args, "checkpoint.interval=1", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    clip = sorted((data / "media").glob("*.mp4"))[0]
    return run_dir, clip


def test_eval_runs_both_evaluators_on_a_checkpoint(trained, tmp_path):
    run_dir, clip = trained
    (tmp_path / clip.name).symlink_to(clip)
    ground = tmp_path / "grounding.jsonl"
    ground.write_text(
        json.dumps({"id": "g0", "query": "the circle moves", "video": clip.name, "relevant_windows": [[0.0, 1.0]]})
        + "\n"
        + json.dumps({"id": "g1", "query": "a square", "video": clip.name, "start": 0.5, "end": 2.0})
        + "\n"
    )
    choices = tmp_path / "mcq.jsonl"
    choices.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"q{k}",
                    "question": "what moves ?",
                    "options": ["circle", "square", "star"],
                    "answer": "ABC"[k],
                    "video": clip.name,
                }
            )
            + "\n"
            for k in range(3)
        )
    )
    out = tmp_path / "out"
    done = keye_train(
        "eval",
        "demo",
        f"--checkpoint={run_dir}",
        f"--grounding={ground}",
        f"--mcq={choices}",
        f"--out={out}",
        "--max-new-tokens=6",
        *QUIET,
        "parallel.nproc=1",
        "rollout.slots=2",
        "rollout.capacity=512",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for task, reader, metrics_of in (
        ("grounding", grounding.read_grounding(ground), grounding.grounding_metrics),
        ("mcq", mcq.read_mcq(choices), mcq.mcq_metrics),
    ):
        metrics = json.loads((out / f"{task}_metrics.json").read_text())
        responses = [r["response"] for _, r in read_jsonl(out / f"{task}_responses.jsonl")]
        assert len(responses) == len(reader)
        again = metrics_of(responses, reader)
        assert {k: metrics[k] for k in again} == again
        assert metrics["settings"]["max_new_tokens"] == 6


def test_eval_needs_a_task():
    done = keye_train("eval", "demo", "--checkpoint=nowhere", *QUIET)
    assert done.returncode == 2 and "--grounding and/or --mcq" in done.stderr
