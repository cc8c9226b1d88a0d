"""`keye-train eval <recipe> --checkpoint DIR [--grounding FILE] [--mcq FILE] [--out DIR] [overrides...]`: run the
temporal-grounding and multiple-choice evaluators (keye_train/posttrain/evaluation) with the rollout engine on a
checkpoint's weights as their `generate` (greedy, the recipe's media budget). Starts the checkpoint's layout's
ranks like training does; every rank decodes every request in lockstep and rank 0 writes
`<out>/<task>_metrics.json` and `<out>/<task>_responses.jsonl` and prints the metrics."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="keye-train eval")
    parser.add_argument("recipe")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run directory (latest)")
    parser.add_argument("--grounding", type=Path, help="temporal-grounding JSONL (training_recipe.md §8)")
    parser.add_argument("--mcq", type=Path, help="multiple-choice JSONL")
    parser.add_argument("--out", type=Path, help="where the metrics go (default: <checkpoint>/eval)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args, overrides = parser.parse_known_args(argv)
    if args.grounding is None and args.mcq is None:
        raise ValueError("keye-train eval: give --grounding and/or --mcq")
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        raise ValueError(f"keye-train eval: unknown options {unknown}")
    return args, overrides


def rollout_generate(cfg, parts, tokenizer, max_new_tokens: int, base: Path):
    """The evaluators' `generate`: greedy rollouts of each request's prompt (its video resolved against `base`)."""
    from data_pipeline.loader import media_budget
    from keye_train.posttrain.prompts import chat_prompt
    from keye_train.posttrain.rollout import Rollout, SamplingParams

    rollout = Rollout(
        parts,
        cfg.model,
        tokenizer.ids,
        slots=cfg.rollout.slots,
        capacity=cfg.rollout.capacity,
        prefill_tokens=cfg.rollout.prefill_tokens,
    )
    stops = (tokenizer.ids.im_end, tokenizer.ids.pad)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=stops)
    budget = media_budget(cfg.data)

    def generate(requests) -> list[str]:
        prompts = [
            chat_prompt(tokenizer, r.prompt, budget, None if r.video is None else base / r.video) for r in requests
        ]
        out = rollout.generate(prompts, params, 1)
        rollout.release()
        texts = []
        for sample in out.samples:
            tokens = sample.tokens[:-1] if sample.tokens and sample.tokens[-1] in stops else sample.tokens
            texts.append(tokenizer.decode(tokens))
        return texts

    return generate


def evaluate(cfg, args) -> dict:
    import torch.distributed as dist

    from data_pipeline.tokenizer import KeyeTokenizer
    from keye_train import checkpoint
    from keye_train.model.builder import build_model, initialize_weights
    from keye_train.posttrain.evaluation import grounding, mcq
    from keye_train.posttrain.evaluation.jsonl import write_jsonl
    from keye_train.training.setup import start_rank

    ctx = start_rank(cfg)
    tokenizer = KeyeTokenizer(cfg.data.tokenizer)
    cfg.model.tokens = tokenizer.ids
    parts = build_model(cfg.model, cfg.parallel, ctx.dtype, ctx.device.type == "cuda", ctx.placement)
    initialize_weights(parts, cfg.model, cfg.train.seed)
    checkpoint.load_weights(args.checkpoint, parts, ctx.layout)
    out = args.out or Path(args.checkpoint) / "eval"
    results = {}
    for task, path in (("grounding", args.grounding), ("mcq", args.mcq)):
        if path is None:
            continue
        generate = rollout_generate(cfg, parts, tokenizer, args.max_new_tokens, path.parent)
        settings = {
            "fps": cfg.data.video_fps,
            "frame_max_tokens": cfg.data.frame_max_tokens,
            "video_total_tokens": cfg.data.video_total_tokens,
            "max_new_tokens": args.max_new_tokens,
        }
        if task == "grounding":
            metrics, records = grounding.evaluate_grounding(grounding.read_grounding(path), generate, settings)
        else:
            metrics, records = mcq.evaluate_mcq(mcq.read_mcq(path), generate, settings=settings)
        results[task] = metrics
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{task}_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            write_jsonl(out / f"{task}_responses.jsonl", records)
    if dist.get_rank() == 0:
        print(json.dumps(results, indent=2, sort_keys=True), flush=True)
    return results


def run(argv: list[str]) -> int:
    from keye_train.cli.spawn import needs_spawn, single_process_env, spawn_local
    from keye_train.config.compose import load_checked_config
    from parallel.layout import destroy_process_groups

    args, overrides = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", 0)) or None
    cfg, _ = load_checked_config([f"recipe={args.recipe}", *overrides], world, check_data=False)
    if cfg.parallel.pp != 1:
        raise ValueError(f"parallel.pp={cfg.parallel.pp}: keye-train eval runs the rollout engine, which needs pp=1")
    if needs_spawn(cfg.parallel.nproc):
        return spawn_local(cfg.parallel.nproc, argv, command="eval")
    single_process_env()
    evaluate(cfg, args)
    destroy_process_groups()
    return 0
