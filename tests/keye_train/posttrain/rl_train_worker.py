"""One process of an RL run, for test_rl_training.py: build the trainer from overrides, swap in a token-level
reward (the fraction of even response ids: a random tiny model's responses mostly decode to nothing), train up to
a step, checkpoint, and write the per-step metrics and a parameter digest as JSON.

    python -m tests.keye_train.posttrain.rl_train_worker OUT.json STOP_AT override...

Under torchrun every rank trains and rank 0 writes the JSON.
"""

import json
import os
import sys

import torch


def even_fraction(response: str, reference) -> float:
    ids = [int(t) for t in response.split()]
    return sum(1 for t in ids if t % 2 == 0) / len(ids) if ids else 0.0


class ReportingJudge:
    """A deterministic in-process ContextRL judge: scores 0 and, when asked, reports a mistake without the
    answer, except for answers of 1, where its report gives the answer away (an unusable report)."""

    def __call__(self, request):
        from keye_train.posttrain.rewards.context_rl import JudgeVerdict

        if not request.want_report:
            return JudgeVerdict(0.0)
        leak = request.reference_solution.endswith("gives 1")
        return JudgeVerdict(0.0, "the answer is 1 ." if leak else "count the marks one by one .")


def reporting_judge() -> ReportingJudge:
    return ReportingJudge()


def params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parts.lm.parameters()]


def main(out: str, stop_at: int, overrides: list[str]) -> None:
    from keye_train.cli.spawn import single_process_env
    from keye_train.config.compose import load_checked_config
    from keye_train.training import build_trainer
    from parallel.layout import destroy_process_groups

    single_process_env()
    cfg, _ = load_checked_config(overrides)
    trainer = build_trainer(cfg)
    trainer.data.reward = even_fraction
    trainer.data.decode = lambda ids: " ".join(str(t) for t in ids)
    start, before, rows = trainer.step, params(trainer), []
    while trainer.step < stop_at:
        metrics = trainer.train_step()
        rows.append(
            {
                "step": trainer.step,
                **{k: v for k, v in metrics.items() if not k.startswith(("step_time", "tokens_per_s"))},
            }
        )
    trainer.save()
    after = params(trainer)
    moved = max(float((a - b).abs().max()) for a, b in zip(after, before))
    digest = float(sum(p.double().sum() for p in after))
    Path = __import__("pathlib").Path
    if int(os.environ["RANK"]) == 0:  # under torchrun too: the logged metrics are reduced over the ranks
        Path(out).write_text(json.dumps({"start": start, "rows": rows, "moved": moved, "digest": digest}))
    destroy_process_groups()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
