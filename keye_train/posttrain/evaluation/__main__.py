"""Score a predictions file offline:

    python -m keye_train.posttrain.evaluation grounding REFERENCES.jsonl PREDICTIONS.jsonl [--out metrics.json]
    python -m keye_train.posttrain.evaluation mcq REFERENCES.jsonl PREDICTIONS.jsonl [--by duration] \\
        [--extract video_mme_v2] [--nonlin]

Predictions are `{"id": ..., "response": ...}` lines. Prints the metrics as JSON (and writes them with --out).
Running a model over the references (the rollout engine's `generate`) is `evaluate_grounding` / `evaluate_mcq`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keye_train.posttrain.evaluation import grounding, mcq
from keye_train.posttrain.evaluation.jsonl import read_predictions


def _responses(predictions: dict[str, str], items) -> list[str]:
    missing = [item.id for item in items if item.id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} of {len(items)} references, e.g. {missing[:3]}")
    return [predictions[item.id] for item in items]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keye_train.posttrain.evaluation")
    parser.add_argument("task", choices=["grounding", "mcq"])
    parser.add_argument("references", type=Path)
    parser.add_argument("predictions", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--by", action="append", default=[], help="mcq: break the accuracy down by this field")
    parser.add_argument("--extract", choices=["keye", "video_mme_v2"], default="keye", help="mcq letter extraction")
    parser.add_argument("--nonlin", action="store_true", help="mcq: add Video-MME-v2 Non-Lin (groups of 4)")
    args = parser.parse_args(argv)
    try:
        predictions = read_predictions(args.predictions)
        if args.task == "grounding":
            items = grounding.read_grounding(args.references)
            metrics = grounding.grounding_metrics(_responses(predictions, items), items)
        else:
            items = mcq.read_mcq(args.references)
            extract = mcq.video_mme_v2_letter if args.extract == "video_mme_v2" else mcq.chosen_letter
            responses = _responses(predictions, items)
            metrics = mcq.mcq_metrics(responses, items, args.by, extract)
            if args.nonlin:
                metrics.update(mcq.video_mme_v2_nonlin(responses, items, extract))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
