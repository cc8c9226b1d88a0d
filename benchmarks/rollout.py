"""Rollout decode speed: tokens/s and a per-step breakdown of the rollout engine (keye_train/posttrain/rollout).

    python benchmarks/rollout.py                                   # tiny model on this CPU
    KEYE_COMMIT=<sha> python3 benchmarks/rollout.py --model keye_vl2_30b_a3b --batch 64 128 --context 4096

One process, one rank, random weights (layout-invariant init), text prompts of `--context - --new-tokens`
random tokens, every batch row its own request (all slots admitted at once, so prefill comes first and the
rest of the run is pure decode), sampling at temperature 1 (top-p 1, top-k 0: the RL setting). For each batch:
- `decode_tokens_per_s`: decode tokens / wall time of the pure-decode steps (no prefill rows in the pack);
  `prefill_tokens_per_s` likewise for the steps with prompt chunks. The rows prefilled first also decode in
  the prefill steps, so they finish first and the last pure-decode steps run fewer rows at the same cost (the
  static step always runs every slot); `decode_tokens_per_s_full_batch` counts only the steps where all `batch`
  rows decode: the rate at that batch size.
- `--decode-ahead on off`: graphed rows with the steps queued ahead of the host's bookkeeping
  (rollout/ahead.py) or step by step.
- `breakdown_ms_per_decode_step`: a second run of `--profile-steps` new tokens with CUDA synchronisation
  between the parts, averaged over its pure-decode steps: the decoder forward split into core attention (with
  the cache writes), the MoE layers (router, dispatch, experts) and the rest (projections, norms, RoPE), the
  embedding and pack assembly, the output layer on the sampled rows, the sampler, and host bookkeeping. The
  synchronisation makes this run slower than the first.
- `logprob_gap`: |rollout log-prob - trainer recompute| (mean, p99) over the first `--recompute` samples, the
  recompute being the training forward over [prompt | response] at the same dtype.
Writes benchmarks/results/rollout_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_description, git_state, peak_rss_mib, write_result  # noqa: E402
from benchmarks.profiling import profiled  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "keye_vl2_30b_a3b"])
    parser.add_argument("--lm-layers", type=int, default=None, help="LM depth (default: the preset's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--context", type=int, default=256, help="prompt + response tokens per row")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=8192, help="prompt tokens per step")
    parser.add_argument("--profile-steps", type=int, default=8, help="decode steps of the synchronised run")
    parser.add_argument("--recompute", type=int, default=4, help="samples whose log-probs are recomputed")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA")
    parser.add_argument("--attention", default="dense", choices=["dense", "warmup", "sparse"])
    parser.add_argument("--experts", default="auto", choices=["auto", "grouped", "sequential"])
    parser.add_argument(
        "--decode-graph",
        nargs="+",
        default=["auto", "off"],
        choices=["auto", "static", "off"],
        help="engine modes to time side by side (auto: CUDA-graph decode where eligible)",
    )
    parser.add_argument(
        "--decode-ahead",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="graphed rows: queue each decode step before the last one is booked (rollout/ahead.py), or not",
    )
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def setup(args):
    from keye_train.config import ParallelConfig, keye_vl2_30b_a3b, tiny
    from parallel import cpu_compat
    from parallel.layout import check_layout, init_process_groups

    on_gpu = torch.cuda.is_available()
    cpu_compat.install_if_needed()
    model = tiny() if args.model == "tiny" else keye_vl2_30b_a3b()
    if args.lm_layers:
        model.lm.num_layers = args.lm_layers
    model.lm.dsa.mode = args.attention
    model.lm.experts_impl = args.experts
    par = ParallelConfig()
    init_process_groups(par, check_layout(par, model.lm, model.vit, 1), "nccl" if on_gpu else "gloo")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if on_gpu else "fp32")]
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    parts = build_model(model, par, dtype, on_gpu, ColocatedPlacement())
    initialize_weights(parts, model, seed=0)
    return model, parts, dtype, on_gpu


class PartTimer:
    """Synchronised wall time inside modules of one kind (forward pre/post hooks)."""

    def __init__(self, modules, sync):
        self.calls, self.sync, self.handles = [], sync, []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._start))
            self.handles.append(m.register_forward_hook(self._stop))

    def _start(self, *_):
        self.sync()
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.sync()
        self.calls.append((self._t, time.perf_counter() - self._t))

    def within(self, steps) -> float:
        """Seconds of the calls that started inside the given engine steps (their step_log entries)."""
        windows = [(e["start"], e["start"] + e["seconds"]) for e in steps]
        return sum(d for t, d in self.calls if any(a <= t < b for a, b in windows))

    def remove(self):
        for h in self.handles:
            h.remove()


def prompts_for(batch, length, vocab, seed):
    from keye_train.posttrain.rollout import Prompt

    g = torch.Generator().manual_seed(seed)
    return [Prompt(torch.randint(0, min(vocab, 150000), (length,), generator=g)) for _ in range(batch)]


def run_batch(args, model, parts, dtype, batch, mode, ahead=True):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from keye_train.model.attention import VarlenCoreAttention
    from keye_train.posttrain.rollout import RolloutEngine, SamplingParams, sample_batch

    on_gpu = parts.lm.output_layer.weight.is_cuda
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    prompt_len = args.context - args.new_tokens
    engine = RolloutEngine(
        parts,
        model,
        slots=batch,
        capacity=args.context,
        prefill_tokens=args.prefill_tokens,
        keep_logits=False,
        decode_graph=mode,
        decode_ahead=ahead,
    )
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=1)
    prompts = prompts_for(batch, prompt_len, model.lm.vocab_size, seed=batch)
    engine.generate(prompts[: min(batch, 2)], SamplingParams(temperature=1.0, max_new_tokens=2))  # warm-up
    engine.times = type(engine.times)()
    sync()
    started = time.perf_counter()
    samples = engine.generate(prompts, params)
    sync()
    wall = time.perf_counter() - started
    log = engine.times.step_log
    decode_steps = [(e["seconds"], e["decode"]) for e in log if e["prefill"] == 0 and e["decode"] > 0]
    prefill_steps = [(e["seconds"], e["prefill"]) for e in log if e["prefill"] > 0]
    decode_time = sum(t for t, _ in decode_steps)
    decode_tokens = sum(d for _, d in decode_steps)
    full = [t for t, d in decode_steps if d == batch]
    row = {
        "batch": batch,
        "decode_graph": mode,
        "decode_ahead": ahead if mode != "off" else None,
        "graph_off_reason": engine.graph_off_reason,
        "graph_steps": engine.times.graph_steps,
        "prompt_tokens": prompt_len,
        "new_tokens": args.new_tokens,
        "wall_s": wall,
        "steps": engine.times.steps,
        "decode_steps": len(decode_steps),
        "decode_tokens_per_s": decode_tokens / decode_time if decode_time else float("nan"),
        "decode_full_batch_steps": len(full),
        "decode_tokens_per_s_full_batch": batch * len(full) / sum(full) if full else float("nan"),
        "decode_step_ms_median": 1e3 * sorted(t for t, _ in decode_steps)[len(decode_steps) // 2]
        if decode_steps
        else float("nan"),
        "prefill_tokens_per_s": sum(p for _, p in prefill_steps) / max(sum(t for t, _ in prefill_steps), 1e-9),
        "tokens_per_s_overall": sum(len(s.tokens) for s in samples) / wall,
        "cache_gib": engine.cache.nbytes() / 2**30,
    }

    decode_log = [e for e in log if e["prefill"] == 0 and e["decode"] > 0]
    if decode_log:  # where an unsynchronised step spends its host time (the waits land in the part that syncs)
        keys = [k for k in decode_log[0] if k not in ("start", "decode", "prefill")]
        row["unsynced_ms_median"] = {k: 1e3 * statistics.median(e[k] for e in decode_log) for k in keys}
        seconds = sorted(e["seconds"] for e in decode_log)
        row["decode_step_ms_quantiles"] = {q: 1e3 * seconds[int(q * (len(seconds) - 1))] for q in (0, 0.1, 0.5, 0.9, 1)}
        row["decode_step_ms_series"] = [round(1e3 * e["seconds"], 2) for e in decode_log]
    step = engine.decode_step
    if on_gpu and step is not None:  # GPU kernel time of one decode step, captured and eager at static shapes
        row["decode_step_profile"] = profiled(lambda: [step.replay() for _ in range(5)], "5 decode steps", None)
        row["decode_step_profile_eager"] = profiled(lambda: [step.forward() for _ in range(5)], "5 eager", None)
        row["replay_ms"] = replay_timings(step)
        row["replay_profiles"] = replay_profiles(step)

    # the synchronised breakdown over the decode steps of a shorter run (the parts inside the decoder only
    # eagerly: a graph replay runs no module hooks)
    graphed = engine.times.graph_steps > 0
    profile_new = min(args.profile_steps, args.new_tokens)
    short = SamplingParams(temperature=1.0, max_new_tokens=profile_new, seed=2)
    lm = parts.lm
    timed = (lambda kind: []) if graphed else (lambda kind: [m for m in lm.modules() if isinstance(m, kind)])
    attention = PartTimer(timed(VarlenCoreAttention), sync)
    moe = PartTimer(timed(MoELayer), sync)
    engine.sync_timing = True
    engine.times = type(engine.times)()
    engine.generate(prompts, short)
    attention.remove()
    moe.remove()
    engine.sync_timing = False
    decode = [e for e in engine.times.step_log if e["prefill"] == 0 and e["decode"] > 0]
    n = max(len(decode), 1)
    ms = lambda key: 1e3 * sum(e[key] for e in decode) / n  # noqa: E731
    inside = lambda timer: 1e3 * timer.within(decode) / n  # noqa: E731
    row["breakdown_ms_per_decode_step"] = {
        "decode_steps": len(decode),
        "step": ms("seconds"),
        "decoder_forward": ms("forward"),
        "core_attention": None if graphed else inside(attention),
        "moe_layers": None if graphed else inside(moe),
        "decoder_other": None if graphed else ms("forward") - inside(attention) - inside(moe),
        "embed_and_pack": ms("embed"),
        "output_layer": ms("logits"),
        "sample": ms("sample"),
        "host": ms("host"),
    }

    # rollout vs trainer log-probs
    from keye_train.model.keye_vl import embed_inputs, lm_token_losses

    gaps = []
    for prompt, s in list(zip(prompts, samples))[: args.recompute]:
        b = sample_batch(prompt, s).to(lm.output_layer.weight.device)
        with torch.no_grad():
            lm.eval()
            embeds = embed_inputs(lm, parts.vision, b, engine.tokens, sequence_parallel=False)
            per_token = lm_token_losses(lm, b, embeds)[0]
            lm.train()
        recompute = -per_token[b.loss_mask.bool()].float().cpu()  # temperature 1: log-prob = -CE
        gaps.append((recompute - torch.tensor(s.logprobs)).abs())
    if gaps:
        gap = torch.cat(gaps)
        row["logprob_gap"] = {"mean": float(gap.mean()), "p99": float(gap.quantile(0.99)), "tokens": gap.numel()}
    engine.release()
    del engine, samples
    free_device_memory()
    return row


def replay_timings(step, repeats: int = 5) -> dict:
    """The step's replay alone, timed three ways: back to back (the next launch queued behind the running one),
    from an idle GPU (synchronised before each launch), and after a 3 ms idle gap (as a step's sampling leaves)."""

    def wall_ms(before):
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            before()
            started = time.perf_counter()
            step.replay()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - started))
        return statistics.median(times)

    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step.replay()
    torch.cuda.synchronize()
    timings = {
        "back_to_back": 1e3 * (time.perf_counter() - started) / repeats,
        "from_idle": wall_ms(lambda: None),
        "after_3ms_gap": wall_ms(lambda: time.sleep(0.003)),
    }
    staged = step.inputs.cpu().pin_memory()
    timings["same_inputs_uploaded"] = wall_ms(lambda: step.inputs.copy_(staged, non_blocking=True))
    timings["rows_moved_on_device"] = wall_ms(lambda: step.inputs[2].sub_(1))
    # the engine's own sequence: new inputs through run(), the sampler, a host read
    from keye_train.posttrain.rollout import SamplingParams
    from keye_train.posttrain.rollout.sampler import sample

    tokens, positions, rows = step.inputs[:3].tolist()
    slots = list(range(len(tokens)))
    params = [SamplingParams(temperature=1.0)] * len(slots)
    generators = [torch.Generator(step.inputs.device).manual_seed(i) for i in slots]
    for name, read in (("run_sync", False), ("run_sample_read", True)):
        times = []
        for back in range(1, repeats + 1):
            torch.cuda.synchronize()
            started = time.perf_counter()
            logits = step.run(tokens, positions, [r - back for r in rows], slots)
            if read:
                sample(logits, params, generators)[0].tolist()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - started))
        timings[name] = statistics.median(times)
    return timings


def replay_profiles(step, repeats: int = 5) -> dict:
    """Kernel time of `repeats` replays that repeat the last inputs, against replays that move every slot's
    cache row back by one before each (as a real step moves it on by one)."""

    def moved():
        for _ in range(repeats):
            step.inputs[2].sub_(1)
            step.replay()

    return {
        "same_inputs": profiled(lambda: [step.replay() for _ in range(repeats)], f"{repeats} same replays", None),
        "rows_moved": profiled(moved, f"{repeats} moved replays", None),
    }


def free_device_memory():
    """Drop what the last row left (the graph's private pool and the KV cache sit in reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(on_gpu):
    if not on_gpu:
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for short in ("h200", "h100", "a100", "b200"):
        if short in name:
            return short
    return "gpu"


def main():
    args = parse_args()
    if args.new_tokens < 1 or args.context <= args.new_tokens:
        raise SystemExit("--context must exceed --new-tokens >= 1")
    model, parts, dtype, on_gpu = setup(args)
    result = {
        "benchmark": "rollout",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **git_state(),
        "device": torch.cuda.get_device_name() if on_gpu else cpu_description(),
        "torch": torch.__version__,
        "settings": {
            **vars(args),
            "dtype": str(dtype),
            "lm_layers": model.lm.num_layers,
            "experts_impl": args.experts,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "rows": [],
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"rollout_{device_name(on_gpu)}.json"
    header = f"{'batch':>5} {'graph':>11} {'decode tok/s':>12} {'full b.':>9} {'step ms':>8} {'attn':>7} {'moe':>7} "
    header += f"{'other':>7} "
    header += f"{'head':>7} {'sample':>7} {'host':>7} {'prefill tok/s':>13} {'|dlogp| mean':>12} {'p99':>8}"
    print(header)
    aheads = [a == "on" for a in args.decode_ahead]
    combos = [(b, m, a) for b in args.batch for m in args.decode_graph for a in (aheads if m != "off" else [False])]
    for batch, mode, ahead in combos:
        try:
            row = run_batch(args, model, parts, dtype, batch, mode, ahead)
        except Exception as err:  # record the failure and go on with the other rows
            traceback.print_exc()
            result["rows"].append({"batch": batch, "decode_graph": mode, "decode_ahead": ahead, "error": repr(err)})
            free_device_memory()
            write_result(out, result)
            continue
        result["rows"].append(row)
        parts_ms = {k: float("nan") if v is None else v for k, v in row["breakdown_ms_per_decode_step"].items()}
        gap = row.get("logprob_gap", {"mean": float("nan"), "p99": float("nan")})
        print(
            f"{batch:>5} {mode + ('+ahead' if ahead else ''):>11} {row['decode_tokens_per_s']:>12.1f} "
            f"{row['decode_tokens_per_s_full_batch']:>9.1f} {row['decode_step_ms_median']:>8.2f} "
            + " ".join(
                f"{parts_ms[k]:>7.2f}"
                for k in ("core_attention", "moe_layers", "decoder_other", "output_layer", "sample", "host")
            )
            + f" {row['prefill_tokens_per_s']:>13.1f} {gap['mean']:>12.2e} {gap['p99']:>8.2e}",
            flush=True,
        )
        rates = {
            (r["batch"], r["decode_graph"], r["decode_ahead"]): r["decode_tokens_per_s"]
            for r in result["rows"]
            if "error" not in r
        }
        best = {b: rates.get((b, "auto", True), rates.get((b, "auto", False))) for b in args.batch}
        result["decode_speedup_graph_vs_eager"] = {
            str(b): best[b] / rates[b, "off", False] for b in args.batch if best[b] and (b, "off", False) in rates
        }
        result["decode_speedup_ahead_vs_stepwise"] = {
            str(b): rates[b, "auto", True] / rates[b, "auto", False]
            for b in args.batch
            if (b, "auto", True) in rates and (b, "auto", False) in rates
        }
        result["peak_rss_mib"] = peak_rss_mib()
        if on_gpu:
            result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
