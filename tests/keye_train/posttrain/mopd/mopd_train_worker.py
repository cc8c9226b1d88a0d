"""One process of a MOPD run, for test_mopd_training.py: `save` writes the freshly initialised weights of a config
as a step-0 checkpoint (a teacher); `train` trains a MOPD stage for its steps and writes the per-step metrics,
which teacher each response was routed to (with its task tag) and how far the weights moved, as JSON.

    python -m tests.keye_train.posttrain.mopd.mopd_train_worker save|train OUT.json override...
"""

import json
import sys
from pathlib import Path

import torch


def params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parts.lm.parameters()]


def main(action: str, out: str, overrides: list[str]) -> None:
    from keye_train.cli.spawn import single_process_env
    from keye_train.config.compose import load_checked_config
    from keye_train.training import build_trainer
    from parallel.layout import destroy_process_groups

    single_process_env()
    cfg, _ = load_checked_config(overrides)
    trainer = build_trainer(cfg)
    if action == "save":
        trainer.save()
        Path(out).write_text("{}")
        destroy_process_groups()
        return
    routed = []
    score = trainer.data._score

    def recording(items, metrics, counter):
        routed.extend([item.group.prompt.reference.get("task", ""), item.teacher] for item in items)
        return score(items, metrics, counter)

    trainer.data._score = recording
    before, rows = params(trainer), []
    while trainer.step < cfg.train.steps:
        metrics = trainer.train_step()
        rows.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    moved = max(float((a - b).abs().max()) for a, b in zip(params(trainer), before))
    Path(out).write_text(json.dumps({"rows": rows, "routed": routed, "moved": moved}))
    destroy_process_groups()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
