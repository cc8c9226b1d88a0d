"""One process of a MOPD run, for test_mopd_training.py: `save` writes the freshly initialised weights of a config
as a step-0 checkpoint (a teacher); `train` trains a MOPD stage for its steps and writes the per-step metrics,
which teacher each response was routed to (with its task tag) and how far the weights moved, as JSON. `exact`
trains too and also checks the first step against an independent float64 reference on the responses of that step:
the gradient the pipeline (rollout, routing, SPRR, scoring, packs, schedule, objective) gives against autograd of
the exact mean reverse KL(pi_S || pi_T) over the response positions, and that KL before and after the run.

`dp` (under torchrun, parallel.nproc=2) checks the first step's DP-averaged gradient against that reference over
every rank's responses (the global batch), computed on each rank.

    python -m tests.keye_train.posttrain.mopd.mopd_train_worker save|train|exact|dp OUT.json override...
"""

import json
import sys
from pathlib import Path

import torch


def params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parts.lm.parameters()]


def grads(params) -> torch.Tensor:
    return torch.cat([p.main_grad.detach().double().flatten() for p in params])


class ExactReverseKL:
    """KL(pi_S || pi_T) per response position, from the plain [prompt | response] ids (text prompts) through the
    student and the teacher (float64 log-softmax over the whole vocab), averaged per response, then over the
    responses: the quantity whose gradient the MOPD loss with Omega = the whole vocab must give."""

    def __init__(self, trainer, teacher_parts, items):
        from keye_train.posttrain.rollout import Prompt, Sample, sample_batch

        self.trainer, self.teacher, self.docs = trainer, teacher_parts, []
        tokens = trainer.data.tokens
        for item in items:
            prompt = Prompt(torch.tensor(item.group.prompt.ids, dtype=torch.long))
            batch = sample_batch(prompt, Sample(0, 0, prompt.input_ids, tokens=list(item.response)), tokens)
            first = int(prompt.input_ids.numel())
            self.docs.append((batch, slice(first - 1, first - 1 + len(item.response))))
        with torch.no_grad():
            self.teacher.lm.eval()
            self.teacher_logp = [self._logp(self.teacher, b)[at] for b, at in self.docs]

    def _logp(self, parts, batch) -> torch.Tensor:
        from keye_train.posttrain.mopd.teachers import forward_logits

        logits = forward_logits(parts, batch, self.trainer.data.tokens, False)
        return logits.double().log_softmax(-1)

    def __call__(self) -> torch.Tensor:
        per_response = []
        for (batch, at), teacher in zip(self.docs, self.teacher_logp):
            student = self._logp(self.trainer.model.parts, batch)[at]
            per_response.append((student.exp() * (student - teacher)).sum(-1).mean())
        return torch.stack(per_response).mean()


def all_items(items) -> list:
    """Every DP rank's scored responses (the prompt ids and the response ids, all a reference needs)."""
    import torch.distributed as dist

    from keye_train.posttrain.mopd.data import Scored
    from keye_train.posttrain.rl_data import Group, PromptRecord

    mine = [(list(it.group.prompt.ids), list(it.response)) for it in items]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    out = []
    for rank_items in every:
        for ids, response in rank_items:
            record = PromptRecord(id="", ids=ids, reference={})
            out.append(Scored(Group(record, [], []), response, [], 0.0, ""))
    return out


def check_first_step(trainer, teacher: str, result: dict, global_batch: bool = False) -> None:
    """Wraps the schedule so that the first step, between its backward and the optimizer, records the pipeline's
    gradient, the reference gradient and the reference KL (the main grads are put back before the update)."""
    run, items, score = trainer.schedule.run, [], trainer.data._score

    def recording(batch_items, metrics, counter):
        items.extend(batch_items)
        return score(batch_items, metrics, counter)

    def first_run(microbatches, objective):
        outputs = run(microbatches, objective)
        trainer.schedule.run, trainer.data._score = run, score
        params = [p for p in trainer.model.parts.lm.parameters() if p.requires_grad]
        ours = grads(params)
        local = ours.clone()
        if global_batch:  # DDP's average over the DP ranks; each rank's own main grads stay for the update
            import torch.distributed as dist

            dist.all_reduce(ours)
            ours /= dist.get_world_size()
        batch = all_items(items) if global_batch else items
        result["reference"] = ExactReverseKL(trainer, trainer.data.pool.instance(teacher).parts, batch)
        result["responses"] = len(batch)
        trainer.model.zero_grad()
        kl = result["reference"]()
        kl.backward()
        reference = grads(params)
        offset = 0
        for p in params:
            p.main_grad.copy_(local[offset : offset + p.numel()].view_as(p.main_grad))
            offset += p.numel()
        result.update(
            kl_before=float(kl),
            grad_error=float((ours - reference).norm() / reference.norm()),
            grad_norm=float(reference.norm()),
        )
        return outputs

    trainer.schedule.run, trainer.data._score = first_run, recording


def main(action: str, out: str, overrides: list[str]) -> None:
    from keye_train.cli.spawn import single_process_env
    from keye_train.config.compose import load_checked_config
    from keye_train.training import build_trainer
    from parallel.layout import destroy_process_groups

    if action != "dp":  # dp: torchrun's environment
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
    exact = {}
    if action in ("exact", "dp"):
        check_first_step(trainer, cfg.mopd.default_teacher, exact, global_batch=action == "dp")
    before, rows = params(trainer), []
    while trainer.step < cfg.train.steps:
        metrics = trainer.train_step()
        rows.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    moved = max(float((a - b).abs().max()) for a, b in zip(params(trainer), before))
    result = {"rows": rows, "routed": routed, "moved": moved}
    if exact:
        with torch.no_grad():
            exact["kl_after"] = float(exact.pop("reference")())
        result["exact"] = exact
    if action == "dp":
        import torch.distributed as dist

        out = f"{out}.rank{dist.get_rank()}"
    Path(out).write_text(json.dumps(result))
    destroy_process_groups()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
