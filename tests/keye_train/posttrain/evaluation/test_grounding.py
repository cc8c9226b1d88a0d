"""The TimeLens-style grounding evaluator: the official prompt, the three JSONL formats, R1@{0.3,0.5,0.7} and
mIoU on hand-computed cases, the runner, and the QVHighlights sample from ../shared when present."""

import json

import pytest

from keye_train.posttrain.evaluation.grounding import (
    evaluate_grounding,
    grounding_metrics,
    metrics_from_predictions,
    normalize_query,
    read_grounding,
    timelens_prompt,
)
from keye_train.posttrain.evaluation.jsonl import read_predictions, write_jsonl
from tests.helpers import SHARED, needs_shared_reason

QVH = SHARED / "annotations" / "qvhighlights_val_first12.jsonl"

# (reference window, response, hand-computed tIoU or None when nothing parses)
CASES = [
    ((10, 20), "The event happens in 10 - 20 seconds", 1.0),
    ((0, 10), "The event happens in 5 - 15 seconds", 5 / 15),
    ((30, 40), "It is from 00:30 to 00:35.", 5 / 10),
    ((0, 4), "I cannot tell.", None),
    ((2, 8), "The event happens in 8 - 2 seconds", 0.0),
]


def write_formats(tmp_path):
    """The same five queries as QVHighlights, TimeLens and keye-train manifest lines."""
    qvh = [
        {"qid": k, "query": f"q{k}.", "duration": 60, "vid": f"v{k}", "relevant_windows": [list(w)]}
        for k, (w, _, _) in enumerate(CASES)
    ]
    timelens = [{"video_path": f"v{k}.mp4", "query": f"q{k}", "span": [list(w)]} for k, (w, _, _) in enumerate(CASES)]
    manifest = [
        {"id": str(k), "kind": "grounding", "video": f"v{k}.mp4", "query": f"q{k}", "start": w[0], "end": w[1]}
        for k, (w, _, _) in enumerate(CASES)
    ]
    paths = {}
    for name, rows in (("qvh", qvh), ("timelens", timelens), ("manifest", manifest)):
        paths[name] = tmp_path / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return paths


def test_the_prompt_is_the_official_sentence_around_the_normalised_query():
    assert normalize_query("  A girl  and her\tmother cooked. ") == "A girl and her mother cooked"
    assert timelens_prompt("Woman holds up a green bottle.") == (
        "Please find the visual event described by the sentence 'Woman holds up a green bottle', determining its "
        "starting and ending times. The format should be: 'The event happens in <start time> - <end time> seconds'."
    )


@pytest.mark.parametrize("fmt", ["qvh", "timelens", "manifest"])
def test_the_metrics_match_a_hand_computation_in_every_input_format(tmp_path, fmt):
    items = read_grounding(write_formats(tmp_path)[fmt])
    assert [item.windows[0] for item in items] == [tuple(map(float, w)) for w, _, _ in CASES]
    metrics = grounding_metrics([response for _, response, _ in CASES], items)
    assert metrics["R1@0.3"] == pytest.approx(60.0)  # 1, 1/3, 1/2
    assert metrics["R1@0.5"] == pytest.approx(40.0)  # 1, 1/2
    assert metrics["R1@0.7"] == pytest.approx(20.0)
    assert metrics["mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 2) / 5)
    assert (metrics["queries"], metrics["unparsed"]) == (5.0, 1.0)


def test_the_timelens_ids_are_line_numbers_and_predictions_join_by_id(tmp_path):
    items = read_grounding(write_formats(tmp_path)["timelens"])
    assert [item.id for item in items] == ["1", "2", "3", "4", "5"] and items[0].video == "v0.mp4"
    predictions = tmp_path / "pred.jsonl"
    write_jsonl(predictions, [{"id": item.id, "response": r} for item, (_, r, _) in zip(items, CASES)])
    assert metrics_from_predictions(read_predictions(predictions), items)["mIoU"] == pytest.approx(
        100 * (1 + 1 / 3 + 1 / 2) / 5
    )
    with pytest.raises(ValueError, match="no prediction for 1 queries"):
        metrics_from_predictions({item.id: "1 - 2" for item in items[1:]}, items)


def test_bad_lines_are_refused_naming_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "q", "span": [[5, 2]]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: span.*0 <= start <= end"):
        read_grounding(path)
    path.write_text(json.dumps({"query": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: none of relevant_windows, span, start/end"):
        read_grounding(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        read_grounding(path)
    with pytest.raises(ValueError, match="2 responses for 5 queries"):
        grounding_metrics(["a", "b"], read_grounding(write_formats(tmp_path)["qvh"]))


def test_the_runner_asks_generate_with_the_prompt_video_and_settings(tmp_path):
    items = read_grounding(write_formats(tmp_path)["qvh"])
    seen = []

    def generate(requests):
        seen.extend(requests)
        return [CASES[int(r.id)][1] for r in requests]

    settings = {"fps": 4.0, "max_frames": 256}
    metrics, records = evaluate_grounding(items, generate, settings)
    assert metrics["R1@0.5"] == pytest.approx(40.0) and metrics["settings"] == settings
    assert seen[0].prompt == timelens_prompt("q0") and seen[0].video == "v0" and seen[0].settings == settings
    assert [r["iou"] for r in records] == pytest.approx([c[2] or 0.0 for c in CASES])


@pytest.mark.skipif(not QVH.is_file(), reason=needs_shared_reason)
def test_the_qvhighlights_sample_reads_and_scores():
    items = read_grounding(QVH)
    assert len(items) == 12
    by_id = {item.id: item for item in items}
    assert by_id["2579"].windows == ((82.0, 150.0),) and by_id["2579"].video == "NUsG9BgSes0_210.0_360.0"
    assert by_id["2638"].windows == ((0.0, 74.0), (76.0, 142.0), (144.0, 150.0))
    assert by_id["8737"].duration == 126.0 and by_id["8737"].windows == ((0.0, 16.0),)
    perfect = [f"The event happens in {i.windows[0][0]:g} - {i.windows[0][1]:g} seconds" for i in items]
    metrics = grounding_metrics(perfect, items)
    assert (metrics["R1@0.7"], metrics["mIoU"], metrics["unparsed"]) == (100.0, 100.0, 0.0)
    # half of each first window, starting at its start: tIoU exactly 0.5
    halves = [f"{i.windows[0][0]:g} - {(i.windows[0][0] + i.windows[0][1]) / 2:g}" for i in items]
    metrics = grounding_metrics(halves, items)
    assert (metrics["R1@0.5"], metrics["R1@0.7"]) == (100.0, 0.0) and metrics["mIoU"] == pytest.approx(50.0)
    assert timelens_prompt(by_id["2579"].query).startswith(
        "Please find the visual event described by the sentence 'A girl and her mother cooked while talking with "
        "each other on facetime', "
    )
