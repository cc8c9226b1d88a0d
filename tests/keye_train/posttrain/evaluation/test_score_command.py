"""`python -m keye_train.posttrain.evaluation` scores a predictions file against references."""

import json

from keye_train.posttrain.evaluation.__main__ import main
from keye_train.posttrain.evaluation.jsonl import write_jsonl


def test_grounding_and_mcq_predictions_are_scored(tmp_path, capsys):
    refs, preds, out = tmp_path / "refs.jsonl", tmp_path / "preds.jsonl", tmp_path / "m.json"
    write_jsonl(
        refs, [{"qid": 1, "query": "q", "relevant_windows": [[0, 10]]}, {"qid": 2, "query": "r", "span": [[5, 9]]}]
    )
    write_jsonl(preds, [{"id": 1, "response": "The event happens in 0 - 5 seconds"}, {"id": 2, "response": "5 to 9"}])
    assert main(["grounding", str(refs), str(preds), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    assert metrics["mIoU"] == 75.0 and metrics["R1@0.5"] == 100.0 and metrics["R1@0.7"] == 50.0
    write_jsonl(refs, [{"id": "a", "question": "q", "options": ["x", "y"], "answer": "B", "duration": "short"}])
    write_jsonl(preds, [{"id": "a", "response": "Answer: B"}])
    assert main(["mcq", str(refs), str(preds), "--by", "duration", "--extract", "video_mme_v2"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy/duration=short"] == 100.0


def test_a_missing_prediction_is_an_error_not_a_zero(tmp_path, capsys):
    refs, preds = tmp_path / "refs.jsonl", tmp_path / "preds.jsonl"
    write_jsonl(refs, [{"qid": 1, "query": "q", "relevant_windows": [[0, 10]]}])
    write_jsonl(preds, [{"id": 7, "response": "0 - 5"}])
    assert main(["grounding", str(refs), str(preds)]) == 2
    assert "no prediction for 1 of 1" in capsys.readouterr().err
