"""One rank of a rollout-layout run (started by torchrun from test_layouts.py): greedy rollouts of fixed prompts
on the tiny model under `tp` / `ep` (dense or DSA attention), written as JSON per rank. Under EP the two ranks
are DP peers that get different prompts and budgets, so one finishes early and must keep stepping with the
other."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import cpu_compat

cpu_compat.install()

from keye_train.config import ParallelConfig, tiny  # noqa: E402
from keye_train.model.builder import build_model, initialize_weights  # noqa: E402
from keye_train.posttrain.rollout import RolloutEngine, SamplingParams  # noqa: E402
from parallel.layout import check_layout, init_process_groups  # noqa: E402
from parallel.placement import ColocatedPlacement  # noqa: E402
from tests.keye_train.posttrain.rollout.common import TOKENS, image_prompt, text_prompt  # noqa: E402

PROMPTS = [("text", 9, 1), ("image", 0, 2), ("text", 4, 3)]
MAX_NEW = [6, 5, 2]


def prompts_and_budgets(share):
    built = [image_prompt([[4, 4]], seed) if kind == "image" else text_prompt(n, seed) for kind, n, seed in PROMPTS]
    return [built[i] for i in share], [SamplingParams(temperature=0, max_new_tokens=MAX_NEW[i]) for i in share]


def main(out: Path, tp: int, ep: int, attention: str):
    model = tiny()
    if attention != "dense":  # DSA with a top-8 selection: the contexts here reach 20+ rows
        model.lm.dsa.mode, model.lm.dsa.topk = attention, 8
    par = ParallelConfig(tp=tp, ep=ep)
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    init_process_groups(par, check_layout(par, model.lm, model.vit, world), "gloo")
    parts = build_model(model, par, torch.float32, False, ColocatedPlacement())
    initialize_weights(parts, model, seed=7)
    rank = dist.get_rank()
    share = list(range(len(PROMPTS)))
    if ep > 1:  # DP peers with their own requests: rank 0 the first two prompts, rank 1 the short last one
        share = [0, 1] if rank == 0 else [2]
    prompts, params = prompts_and_budgets(share)
    engine = RolloutEngine(parts, model, TOKENS, slots=2, capacity=64, prefill_tokens=8, record_routes=True)
    samples = engine.generate(prompts, params)
    report = {
        str(i): {"tokens": s.tokens, "logprobs": s.logprobs, "routes": s.routes.tolist(), "reason": s.finish_reason}
        for i, s in zip(share, samples)
    }
    (out / f"rollout_{world}_{tp}_{ep}_{attention}_{rank}.json").write_text(
        json.dumps({"samples": report, "steps": engine.times.steps})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
