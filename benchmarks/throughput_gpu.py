"""Full-width Keye-VL-2.0 training steps on one GPU: step time, tokens/s, MFU by model FLOPs, peak memory against the
plan, and where the time goes, for today's path (the baseline row) and the throughput options side by side.

    python3 benchmarks/throughput_gpu.py [--lm-layers 4] [--seq 32768] [--rows baseline,grouped_full,...]

Every row trains `recipe=stage1_pretrain` (the 27-layer ViT trains, Stage 1's video budget) at full width with
`--lm-layers` LM layers, EP 1, one 32K pack per step from the generated demo corpus (video-heavy), bf16, random
init, in its own process. Model FLOPs per step (recompute not counted; trailing padding documents included):
  LM     6 x active non-embedding parameters x tokens + attention 3 x 4 x sum(s_i^2 / 2) x heads x head_dim x layers
  ViT    6 x (encoder parameters x patches + projector parameters x merged tokens)
         + attention 3 x 4 x sum(f_j^2) x heads x head_dim x layers over the pack's frames
MFU divides by the 989 TFLOP/s dense-bf16 datasheet figure (`mfu`) and by a measured 8192^3 bf16 matmul
(`mfu_vs_measured_peak`). The breakdown times each part alone, forward + backward, on the step's real shapes (and
the real routing of layer 0), with the row's recompute: the ViT on the pack's frames, core attention x layers,
the MoE layer x layers split into experts (the grouped or looped GEMMs) and dispatch (router, permutation,
combine), the LM head + cross-entropy, the optimizer step as timed inside the loop; `other` is the rest of the
step (QKV and output projections, norms, RoPE, embedding, host work). Rows go to
benchmarks/results/throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402
from benchmarks.profiling import profiled  # noqa: E402

DATASHEET_BF16_TFLOPS = 989.0
BASELINE = [
    "model.lm.experts_impl=sequential",
    "model.lm.loss_impl=megatron",
    "model.lm.attention_backend=flash",
    "parallel.recompute=full",
    "model.fusion=off",
]
ROWS = {  # name -> overrides on top of the common ones
    "baseline": BASELINE,
    "grouped_full_unfused": ["model.lm.experts_impl=grouped", "parallel.recompute=full", "model.fusion=off"],
    "grouped_full": ["model.lm.experts_impl=grouped", "parallel.recompute=full"],
    "grouped_selective": [
        "model.lm.experts_impl=grouped",
        "parallel.recompute=selective",
        "parallel.recompute_modules=[moe,layernorm]",
        "parallel.vision.recompute=full",
    ],
    "sparse_full": ["model.lm.experts_impl=grouped", "parallel.recompute=full", "model.lm.dsa.mode=sparse"],
    "grouped_lm_none": ["model.lm.experts_impl=grouped", "parallel.recompute=none", "parallel.vision.recompute=full"],
}


def timed_ms(fn, smoke: bool) -> float:
    if smoke:  # the CPU check of this script: one call, wall clock
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=3, rep=30, return_mode="median"))


def matmul_tflops(smoke: bool) -> float:
    if smoke:
        return float("nan")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / timed_ms(lambda: a @ b, smoke) / 1e9


def model_flops(cfg, batch, counts) -> dict:
    """Model FLOPs of one packed micro-batch (forward + backward, no recompute)."""
    lm, vit = cfg.model.lm, cfg.model.vit
    docs = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    lm_dense = 6 * (counts["active"] - counts["active_parts"]["embedding"]) * batch.seq_length
    lm_attention = sum(3 * 4 * s * s / 2 * lm.num_heads * lm.head_dim * lm.num_layers for s in docs)
    vit_flops = 0.0
    if batch.visual is not None and batch.visual.num_frames:
        frames = batch.visual.grids.prod(dim=1).tolist()
        patches = sum(frames)
        head_dim = vit.hidden_size // vit.num_heads
        vit_flops = 6 * (counts["vit"] * patches + counts["projector"] * patches / 4)
        vit_flops += sum(3 * 4 * f * f * vit.num_heads * head_dim * vit.num_layers for f in frames)
    return {
        "lm_dense": lm_dense,
        "lm_attention": lm_attention,
        "vit": vit_flops,
        "total": lm_dense + lm_attention + vit_flops,
    }


def breakdown(trainer, batch, optimizer_ms: float, step_ms: float, smoke: bool) -> tuple[dict, float]:
    """Milliseconds per part of one step (see the module docstring) and the experts' TFLOP/s."""
    from kernels.dense_attention import dense_varlen_attention

    cfg, parts = trainer.cfg, trainer.model.parts
    lm_cfg, layers = cfg.model.lm, cfg.model.lm.num_layers
    full = cfg.parallel.recompute == "full"
    device, dtype = trainer.device, trainer.ctx.dtype
    T, hidden = batch.seq_length, lm_cfg.hidden_size
    out = {}

    def fwd_bwd(make):  # make() -> (outputs, upstream gradients)
        def run():
            outputs, grads = make()
            torch.autograd.backward(outputs, grads)

        return run

    if batch.visual is not None and batch.visual.num_frames:

        def vit_pass():
            embeds = parts.vision(batch.visual)
            return embeds, torch.ones_like(embeds)

        out["vit"] = timed_ms(fwd_bwd(vit_pass), smoke)
    else:
        out["vit"] = 0.0

    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    q = torch.randn(T, lm_cfg.num_heads, lm_cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(T, lm_cfg.num_kv_heads, lm_cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in range(2)
    )

    def attend():
        return dense_varlen_attention(
            q,
            k,
            v,
            batch.cu_seqlens,
            causal=True,
            scale=lm_cfg.head_dim**-0.5,
            max_seqlen=max(lengths),
            lengths=lengths,
            backend=str(lm_cfg.attention_backend),
        )

    attention = timed_ms(fwd_bwd(lambda: (attend(), torch.ones_like(q))), smoke)
    if full:
        with torch.no_grad():
            attention += timed_ms(attend, smoke)
    out["attention"] = attention * layers

    moe = parts.lm.decoder.layers[0].mlp
    captured = {}

    def capture(_module, inputs, _outputs):
        captured.setdefault("args", inputs)  # returns None: the output stays

    hook = moe.experts.register_forward_hook(capture)
    x = torch.randn(T, 1, hidden, device=device, dtype=dtype, requires_grad=True)

    def moe_pass():
        y, _ = moe(x)
        return y, torch.ones_like(y)

    moe_ms = timed_ms(fwd_bwd(moe_pass), smoke)
    hook.remove()
    tokens, counts, probs = captured["args"]
    tokens = tokens.detach().requires_grad_()
    probs = probs.detach().requires_grad_()

    def experts_pass():
        y, _ = moe.experts(tokens, counts, probs)
        return y, torch.ones_like(y)

    experts_ms = timed_ms(fwd_bwd(experts_pass), smoke)
    if full:
        with torch.no_grad():
            moe_ms += timed_ms(lambda: moe(x), smoke)
            experts_ms += timed_ms(lambda: moe.experts(tokens, counts, probs), smoke)
    rows = tokens.shape[0]
    expert_tflops = 18 * rows * hidden * lm_cfg.moe_ffn_hidden_size / (experts_ms / (2 if full else 1)) / 1e9
    out["experts"], out["dispatch"] = experts_ms * layers, (moe_ms - experts_ms) * layers

    head = parts.lm
    h = torch.randn(T, 1, hidden, device=device, dtype=dtype, requires_grad=True)
    labels = batch.labels.view(1, -1)

    def head_pass():
        if head.loss_chunk_tokens is not None:
            loss = head.chunked_loss(h, labels)
        else:
            logits, _ = head.output_layer(h)
            loss = head.compute_language_model_loss(labels, logits)
        return loss, torch.ones_like(loss)

    out["lm_head_ce"] = timed_ms(fwd_bwd(head_pass), smoke)
    out["optimizer"] = optimizer_ms
    out["other"] = step_ms - sum(out.values())
    return out, expert_tflops


def sync_sites(fn, top: int = 15) -> list[dict]:
    """Run fn once with CUDA's sync debug mode on: where the host waited for the GPU (the innermost frames of
    ours or megatron's), by count."""
    import collections
    import traceback
    import warnings

    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [
            f
            for f in traceback.extract_stack()[:-1]
            if "/keye_train/" in f.filename
            or "/megatron/" in f.filename
            or "/kernels/" in f.filename
            or "/data_pipeline/" in f.filename
        ]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        sites[where or f"{filename}:{lineno}"] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = shown
    return [{"site": site, "count": count} for site, count in sites.most_common(top)]


def measure(name: str, args) -> dict:
    """One row, in this process."""
    from keye_train.cli.spawn import single_process_env
    from keye_train.config.compose import load_checked_config
    from keye_train.planning.memory import GIB, memory_per_rank
    from keye_train.planning.parameters import count_parameters
    from keye_train.training import build_trainer, loop

    smoke = not torch.cuda.is_available()
    common = [
        "recipe=stage1_pretrain",
        "launch=local",
        "parallel=ep8_node",
        "parallel.nproc=1",
        "parallel.ep=1",
        f"model.lm.num_layers={args.lm_layers}",
        f"train.steps={args.warmup + args.steps}",
        "train.global_batch=1",
        f"train.seq_length={args.seq}",
        "optim.warmup_steps=1",
        f"data.shards={args.data / 'shards'}",
        f"data.tokenizer={args.data / 'tokenizer.json'}",
        "data.workers=4",
        "logging.wandb_mode=disabled",
        "logging.progress_bar=false",
        "checkpoint.interval=0",
        "checkpoint.resume=false",
        f"run_dir={tempfile.mkdtemp(prefix='tput_')}",
    ]
    if smoke:
        common += ["model=tiny", "data.workers=0"]
    cfg, sizes = load_checked_config([*common, *ROWS[name]], world=1)
    counts = count_parameters(cfg.model)  # before torch.distributed starts (its own 1-rank world); cached
    planned = memory_per_rank(cfg.model, cfg.parallel, cfg.train, sizes)["first_stage"]["total"] / GIB
    single_process_env()
    optimizer_times = []
    timed_step = loop.optimizer_step

    def optimizer_step(*a, **k):
        if not smoke:
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = timed_step(*a, **k)
        if not smoke:
            torch.cuda.synchronize()
        optimizer_times.append((time.perf_counter() - started) * 1e3)
        return result

    loop.optimizer_step = optimizer_step
    trainer = build_trainer(cfg)
    batches, next_step = [], trainer.data.next_step
    trainer.data.next_step = lambda: batches.append(next_step()) or batches[-1]
    metrics = [trainer.train_step() for _ in range(args.warmup)]
    metrics = [trainer.train_step() for _ in range(args.steps)]
    # the trainer's own per-step peak (it resets the counter after reading it, at the end of every step)
    peak = max(m.get("memory/peak_gib", float("nan")) for m in metrics)
    step_s = statistics.median(m["step_time_s"] for m in metrics)
    timed = [b[0].to(trainer.device) for b in batches[args.warmup :]]
    flops = [model_flops(cfg, b, counts) for b in timed]
    mean_flops = {key: statistics.mean(f[key] for f in flops) for key in flops[0]}
    parts_ms, expert_tflops = {}, float("nan")
    if not args.no_breakdown:
        parts_ms, expert_tflops = breakdown(
            trainer, timed[-1], statistics.median(optimizer_times[args.warmup :]), step_s * 1e3, smoke
        )
    profiles, syncs = [], []
    if args.profile and not smoke:
        args.profile.mkdir(parents=True, exist_ok=True)
        profiles.append(profiled(trainer.train_step, "train_step", args.profile / f"profile_{name}_step.txt"))
        last = timed[-1]
        if last.visual is not None and last.visual.num_frames:

            def vit_fwd_bwd():
                embeds = trainer.model.parts.vision(last.visual)
                embeds.backward(torch.ones_like(embeds))

            profiles.append(profiled(vit_fwd_bwd, "vit_fwd_bwd", args.profile / f"profile_{name}_vit.txt"))
        syncs = sync_sites(trainer.train_step)
    peak_tflops = matmul_tflops(smoke)
    achieved = mean_flops["total"] / step_s / 1e12
    trainer.data.close()
    visual = [int(b.visual.patches.shape[0]) if b.visual is not None else 0 for b in timed]
    return {
        "row": name,
        "overrides": ROWS[name],
        "lm_layers": args.lm_layers,
        "vit_layers": cfg.model.vit.num_layers,
        "seq_length": args.seq,
        "recompute": str(cfg.parallel.recompute),
        "recompute_modules": [str(m) for m in cfg.parallel.recompute_modules],
        "vision_recompute": str(cfg.parallel.vision.recompute or cfg.parallel.recompute),
        "experts_impl": str(cfg.model.lm.experts_impl),
        "loss_impl": str(cfg.model.lm.loss_impl),
        "attention_backend": str(cfg.model.lm.attention_backend),
        "step_time_s": step_s,
        "step_times_s": [m["step_time_s"] for m in metrics],
        "tokens_per_s_per_gpu": args.seq / step_s,
        "model_tflops_per_step": mean_flops["total"] / 1e12,
        "flops_share": {k: v / mean_flops["total"] for k, v in mean_flops.items() if k != "total"},
        "achieved_tflops": achieved,
        "mfu": achieved / DATASHEET_BF16_TFLOPS,
        "mfu_vs_measured_peak": achieved / peak_tflops,
        "matmul_bf16_tflops_measured": peak_tflops,
        "expert_gemm_tflops": expert_tflops,
        "breakdown_ms": parts_ms,
        "peak_memory_gib": peak,
        "planned_memory_gib": planned,
        "vit_patches_per_step": visual,
        "documents_per_step": [len(b.cu_seqlens) - 1 for b in timed],
        "losses": [m["loss"] for m in metrics],
        "device": torch.cuda.get_device_name() if not smoke else "cpu",
        **({"profiles": profiles, "sync_sites": syncs} if profiles else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "keye_demo_data")
    parser.add_argument(
        "--long-text-words", type=int, default=400, help="words of the demo corpus's long documents (long context)"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a child process measuring one row
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path, help="profile one extra step (and the ViT) per row into this folder")
    parser.add_argument("--profile-rows", help="the rows to profile (default: every row)")
    parser.add_argument("--no-breakdown", action="store_true", help="step time and memory only (long packs)")
    args = parser.parse_args()
    if args.row:
        print("ROW " + json.dumps(measure(args.row, args)), flush=True)
        return
    if not (args.data / "shards" / "index.json").exists():
        subprocess.run(
            [sys.executable, "-m", "data_pipeline.cli", "demo", "--out", str(args.data)]
            + ["--long-text-words", str(args.long_text_words)],
            check=True,
            capture_output=True,
        )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = args.out or REPO / "benchmarks" / "results" / f"throughput_{device.split()[-1].lower()}.json"
    result = {
        "device": device,
        **git_state(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "torch": torch.__version__,
        "rows": [],
    }
    profile_rows = (args.profile_rows or args.rows).split(",")
    for name in args.rows.split(","):
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--row",
                name,
                "--lm-layers",
                str(args.lm_layers),
                "--seq",
                str(args.seq),
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
                "--data",
                str(args.data),
                *(["--profile", str(args.profile)] if args.profile and name in profile_rows else []),
                *(["--no-breakdown"] if args.no_breakdown else []),
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
        if child.returncode != 0 or not lines:
            result["rows"].append({"row": name, "error": (child.stdout[-1500:] + child.stderr[-3000:])})
            print(f"{name}: failed\n{child.stderr[-3000:]}", flush=True)
            write_result(out, result)
            continue
        row = json.loads(lines[-1][4:])
        base = next((r for r in result["rows"] if r["row"] == "baseline" and "error" not in r), None)
        row["speedup_vs_baseline"] = base["step_time_s"] / row["step_time_s"] if base else 1.0
        result["rows"].append(row)
        write_result(out, result)
        b = row["breakdown_ms"]
        print(
            f"{name:<18} step {row['step_time_s']:.3f} s  {row['tokens_per_s_per_gpu']:>8.0f} tok/s  "
            f"mfu {row['mfu']:.3f} ({row['mfu_vs_measured_peak']:.3f} of measured)  x{row['speedup_vs_baseline']:.2f}"
            f"  experts {row['expert_gemm_tflops']:.0f} TF/s  peak {row['peak_memory_gib']:.1f} GiB"
            f" (plan {row['planned_memory_gib']:.1f})\n    "
            + "  ".join(f"{k} {v:.0f}" for k, v in b.items())
            + f" ms; flops {json.dumps({k: round(v, 3) for k, v in row['flops_share'].items()})}",
            flush=True,
        )
        for prof in row.get("profiles", []):
            print(
                f"    profile {prof['what']}: wall {prof['wall_ms']:.0f} ms, GPU busy {prof['gpu_busy_ms']:.0f} ms "
                f"({prof['gpu_busy_share']:.0%}); "
                + "  ".join(f"{k} {v:.0f}" for k, v in prof["kernel_ms_by_kind"].items()),
                flush=True,
            )
        for site in row.get("sync_sites", []):
            print(f"    sync x{site['count']}: {site['site']}", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
