"""Per-layer rates of the full-width ViT and LM on one GPU, for the heterogeneous placement's cost model.

    python3 benchmarks/hetero_rates.py [--budget-s 300] [--vit-frames 256,1024,4096] [--lm-tokens 4096,32768]
    python3 benchmarks/hetero_rates.py --smoke        # CPU check: the tiny model, a couple of points, < 60 s

Builds the model the way training does (`recipe=stage1_pretrain`, `model=keye_vl2_30b_a3b`, EP 1,
`model.lm.experts_impl=grouped`, bf16, the trainer's init), with one ViT layer and one LM layer, no recompute
(the cost model adds the recompute's extra forward itself), and times with triton.testing.do_bench (median):
- ViT layer, forward and forward + backward, over frames of p patches (p from --vit-frames, square grids)
  and totals of patches (--vit-totals): n = total / p frames of p patches each;
- the ViT's ends (patch embedding, position interpolation, RoPE, 2x2 merge, projector) = the 1-layer tower
  minus its layer;
- LM layer (attention + grouped MoE, routed by the initialised router), forward and forward + backward, over
  packs of T tokens (--lm-tokens) cut into documents of one of the mixes (--lm-mixes);
- the LM's ends (embedding, chunked LM head + cross-entropy) = the 1-layer LM minus its layer.
Each point catches its own out-of-memory (or other) error and records it; the run stops adding points when
--budget-s has passed. The fit (non-negative least squares on relative error, `parallel/costs.py`) gives the
cost model's coefficients.
Writes benchmarks/results/hetero_rates_<device>.json (raw points) and parallel/calibration/<device>.json
(fitted rates + provenance; links and scaling are kept from the existing file: one GPU measures no p2p).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402
from parallel import costs  # noqa: E402

MIXES = {  # document lengths of a pack of T tokens
    "one": lambda t: [t],
    "docs_4096": lambda t: _cut(t, 4096),
    "docs_1024": lambda t: _cut(t, 1024),
    "docs_256": lambda t: _cut(t, 256),
    "mixed": lambda t: _mixed(t),
}


def _cut(total: int, size: int) -> list[int]:
    out = [size] * (total // size)
    if total % size:
        out.append(total % size)
    return out


def _mixed(total: int) -> list[int]:
    """A long document, then halving lengths, then the rest: e.g. 32K -> 16K, 8K, 4K, ..., 128, rest."""
    out, left, size = [], total, total // 2
    while left > 0:
        size = min(max(128, size), left)
        out.append(size)
        left -= size
        size //= 2
    return out


def device_tag() -> str:
    """ "NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100 (the calibration file's name)."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    found = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def timer(smoke: bool):
    if smoke:

        def wall_ms(fn) -> float:
            fn()  # warm
            started = time.perf_counter()
            fn()
            return (time.perf_counter() - started) * 1e3

        return wall_ms
    import triton.testing

    def bench_ms(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))

    return bench_ms


def build(args):
    """Config, model parts (1 ViT layer, 1 LM layer) and device."""
    from keye_train.cli.spawn import single_process_env
    from keye_train.config.compose import load_checked_config
    from keye_train.model.builder import build_model, initialize_weights
    from keye_train.training.setup import start_rank

    overrides = [
        "recipe=stage1_pretrain",
        "launch=local",
        "parallel=single",
        "parallel.nproc=1",
        "parallel.recompute=none",
        "parallel.vision.recompute=none",
        "model.lm.num_layers=1",
        "model.vit.num_layers=1",
        "train.global_batch=1",
        f"train.seq_length={max(args.lm_tokens)}",
        "logging.wandb_mode=disabled",
        "checkpoint.interval=0",
        "checkpoint.resume=false",
        f"run_dir={tempfile.mkdtemp(prefix='hetero_rates_')}",
    ]
    overrides += (
        ["model=tiny", "model.lm.experts_impl=sequential"]
        if args.smoke
        else [
            "model=keye_vl2_30b_a3b",
            "model.lm.experts_impl=grouped",
        ]
    )
    cfg, _ = load_checked_config(overrides, world=1, check_data=False)
    full = load_checked_config([o for o in overrides if "num_layers" not in o], world=1, check_data=False)[0]
    single_process_env()
    ctx = start_rank(cfg)
    parts = build_model(cfg.model, cfg.parallel, ctx.dtype, ctx.device.type == "cuda", ctx.placement)
    initialize_weights(parts, cfg.model, cfg.train.seed)
    return cfg, full, parts, ctx


def capture_layer_call(layer, run):
    """(args, kwargs) of the first call of `layer` while `run()` runs."""
    seen = {}

    def hook(_module, args, kwargs):
        seen.setdefault("call", (args, dict(kwargs)))

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen["call"]


def layer_runner(layer, call):
    """fwd() and fwd_bwd() of `layer` on its captured call, with a fresh leaf for its hidden states."""
    args, kwargs = call
    if "hidden_states" in kwargs:
        hidden = kwargs["hidden_states"].detach().clone().requires_grad_()
        kwargs = dict(kwargs, hidden_states=hidden)
    else:
        hidden = args[0].detach().clone().requires_grad_()
        args = (hidden, *args[1:])

    def forward():
        out = layer(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        out = forward()
        out.backward(torch.ones_like(out))
        hidden.grad = None

    return fwd, fwd_bwd


def square_grid(p: int) -> tuple[int, int]:
    """An even rows x cols grid with rows * cols == p (as square as possible)."""
    side = max(2, int(round(math.sqrt(p) / 2)) * 2)
    while side > 2 and p % side:
        side -= 2
    if p % side or (p // side) % 2:
        raise ValueError(f"{p} patches make no even grid")
    return side, p // side


def vit_point(parts, cfg, device, dtype, frame: int, total: int, ms) -> dict:
    from data_pipeline.batch import VisualInput

    rows, cols = square_grid(frame)
    frames = max(1, total // frame)
    patch_dim = 3 * cfg.model.vit.patch_size**2
    visual = VisualInput(
        torch.randn(frames * frame, patch_dim, device=device),
        torch.tensor([[rows, cols]] * frames, dtype=torch.int64, device=device),
    )
    tower = parts.vision
    layer = tower.encoder.blocks.layers[0]
    call = capture_layer_call(layer, lambda: tower(visual))
    fwd, fwd_bwd = layer_runner(layer, call)
    layer_fwd, layer_fwd_bwd = ms(fwd), ms(fwd_bwd)

    def tower_fwd():
        with torch.no_grad():
            tower(visual)

    def tower_fwd_bwd():
        out = tower(visual)
        out.backward(torch.ones_like(out))

    tower_f, tower_fb = ms(tower_fwd), ms(tower_fwd_bwd)
    for p in tower.parameters():
        p.grad = None
    return {
        "frame_patches": frame,
        "grid": [rows, cols],
        "frames": frames,
        "patches": frames * frame,
        "layer_fwd_ms": layer_fwd,
        "layer_fwd_bwd_ms": layer_fwd_bwd,
        "tower_fwd_ms": tower_f,
        "tower_fwd_bwd_ms": tower_fb,
        "ends_fwd_ms": max(0.0, tower_f - layer_fwd),
        "ends_fwd_bwd_ms": max(0.0, tower_fb - layer_fwd_bwd),
    }


def lm_batch(cfg, tokens: int, docs: list[int], device):
    from data_pipeline.batch import PackedBatch

    vocab = cfg.model.lm.vocab_size
    ids = torch.randint(0, min(vocab, 100000), (tokens,), device=device)
    positions = torch.cat([torch.arange(d, device=device) for d in docs]).expand(3, -1).contiguous()
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return PackedBatch(
        input_ids=ids,
        labels=torch.roll(ids, -1),
        loss_mask=torch.ones(tokens, device=device),
        position_ids=positions,
        cu_seqlens=cu,
    )


def lm_point(parts, cfg, device, tokens: int, mix: str, ms) -> dict:
    from keye_train.model.keye_vl import lm_token_losses

    docs = MIXES[mix](tokens)
    batch = lm_batch(cfg, tokens, docs, device)
    lm = parts.lm
    layer = lm.decoder.layers[0]
    call = capture_layer_call(layer, lambda: lm_token_losses(lm, batch, None))
    fwd, fwd_bwd = layer_runner(layer, call)
    layer_fwd, layer_fwd_bwd = ms(fwd), ms(fwd_bwd)

    def whole_fwd():
        with torch.no_grad():
            lm_token_losses(lm, batch, None)

    def whole_fwd_bwd():
        loss = lm_token_losses(lm, batch, None).sum()
        loss.backward()

    whole_f, whole_fb = ms(whole_fwd), ms(whole_fwd_bwd)
    for p in lm.parameters():
        p.grad = None
    return {
        "tokens": tokens,
        "mix": mix,
        "documents": docs,
        "layer_fwd_ms": layer_fwd,
        "layer_fwd_bwd_ms": layer_fwd_bwd,
        "lm_fwd_ms": whole_f,
        "lm_fwd_bwd_ms": whole_fb,
        "ends_fwd_ms": max(0.0, whole_f - layer_fwd),
        "ends_fwd_bwd_ms": max(0.0, whole_fb - layer_fwd_bwd),
    }


def guarded(fn, *a) -> dict:
    """One point; an out-of-memory or any other failure becomes the point's `error`."""
    try:
        return fn(*a)
    except torch.OutOfMemoryError as err:
        return {"error": "oom", "detail": str(err)[:400]}
    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
        return {"error": type(err).__name__, "detail": (str(err) + "\n" + traceback.format_exc())[-1500:]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fit(vit_points: list[dict], lm_points: list[dict]) -> dict:
    """Fitted terms (seconds) and their worst relative error on the points."""
    out, quality = {}, {}
    for name, points, segs in (
        ("vit", vit_points, lambda p: [p["frame_patches"]] * p["frames"]),
        ("lm", lm_points, lambda p: p["documents"]),
    ):
        good = [p for p in points if "error" not in p]
        module = {}
        for field in ("layer_fwd", "layer_fwd_bwd", "ends_fwd", "ends_fwd_bwd"):
            use = costs.TERM_KEYS
            if field.startswith("ends"):  # per-call work: linear in items, per frame (host loops), fixed
                use = ("per_item_s", "per_segment_s", "fixed_s")
            term, worst = costs.fit_term([(segs(p), p[f"{field}_ms"] / 1e3) for p in good], use)
            module[field] = term.as_dict()
            quality[f"{name}.{field}"] = worst
        out[name] = module
    return {"terms": out, "max_relative_error": quality}


def seed_from_rows(throughput: Path, attention: Path, data: Path) -> dict:
    """Rates derived from the full-step rows of throughput_h200.json (no per-layer sweep yet): see `provenance`."""
    import subprocess

    from keye_train.config.compose import load_checked_config
    from keye_train.planning.parameters import count_parameters
    from keye_train.planning.placement import profile_from_shards

    rows = json.loads(throughput.read_text())
    attn = json.loads(attention.read_text())
    by = {(r["row"], r["lm_layers"]): r for r in rows["rows"] if "error" not in r and r.get("commit") == "6960a4f"}
    four, six = by[("grouped_full", 4)], by[("grouped_full", 6)]
    if not (data / "shards" / "index.json").exists():
        subprocess.run([sys.executable, "-m", "data_pipeline.cli", "demo", "--out", str(data)], check=True)
    cfg, _ = load_checked_config(
        [
            "recipe=stage1_pretrain",
            "launch=local",
            f"data.shards={data / 'shards'}",
            f"data.tokenizer={data / 'tokenizer.json'}",
        ],
        world=128,
        check_data=False,
    )
    packs = profile_from_shards(cfg.data, four["seq_length"], 8, 8).packs  # the demo corpus the rows trained on
    frames = statistics.mean(len(p.frames) for p in packs)
    patches = statistics.mean(four["vit_patches_per_step"])
    frame_sq = (
        statistics.mean(sum(f * f for f in p.frames) for p in packs)
        * patches
        / statistics.mean(p.patches for p in packs)
    )
    doc_sq = statistics.mean(sum(d * d for d in p.docs) for p in packs)
    tokens = four["seq_length"]
    # attention alone (attention_backends_h200.json): the ViT's per-frame rows and the LM's one-document cuDNN rows
    vit_att = next(r for r in attn["rows"] if r["layer"] == "vit" and r["backend"] == "flash")
    vit_sq = vit_att["documents"] * (vit_att["tokens"] / vit_att["documents"]) ** 2
    lm_att = next(
        r
        for r in attn["rows"]
        if r["layer"] == "lm" and r["backend"] == "cudnn" and r["documents"] == 1 and r["tokens"] == 32768
    )
    lm_sq = float(lm_att["tokens"]) ** 2
    q = {
        "vit_f": vit_att["fwd_ms"] / 1e3 / vit_sq,
        "vit_fb": vit_att["fwd_bwd_ms"] / 1e3 / vit_sq,
        "lm_f": lm_att["fwd_ms"] / 1e3 / lm_sq,
        "lm_fb": lm_att["fwd_bwd_ms"] / 1e3 / lm_sq,
    }
    # ViT: the tower alone under full recompute = 27 x (fwd + bwd + fwd); backward taken as twice the forward
    vit_layers = four["vit_layers"]
    vit_s = four["breakdown_ms"]["vit"] / 1e3
    vit_linear = vit_s / vit_layers - (q["vit_fb"] + q["vit_f"]) * frame_sq  # per layer, fwd + bwd + recompute
    vit_f = vit_linear / 4 / patches
    # LM: the marginal layer (6 against 4 layers, same commit) under full recompute, split 1 : 2 likewise
    layer_s = (six["step_time_s"] - four["step_time_s"]) / (six["lm_layers"] - four["lm_layers"])
    lm_linear = layer_s - (q["lm_fb"] + q["lm_f"]) * doc_sq
    lm_f = lm_linear / 4 / tokens
    optimizer_s = four["breakdown_ms"]["optimizer"] / 1e3
    ends_s = four["step_time_s"] - vit_s - four["lm_layers"] * layer_s - optimizer_s  # embedding + head + CE
    counts = count_parameters(replace(cfg.model, lm=replace(cfg.model.lm, num_layers=four["lm_layers"])))
    return {
        "device": rows["device"],
        "provenance": {
            "source": "derived from throughput_h200.json rows, not a per-layer sweep",
            "device": rows["device"],
            "commit": four["commit"],
            "date": four["date"],
            "script": "benchmarks/hetero_rates.py --seed-from (this derivation); rows: benchmarks/throughput_gpu.py",
            "rows": [
                "grouped_full, 4 LM layers",
                "grouped_full, 6 LM layers",
                "attention_backends_h200.json: vit flash 128 x 1024 patches, lm cudnn one 32K document",
            ],
            "how": (
                "ViT: breakdown_ms.vit (27 layers, full recompute, the step's pack) less its per-frame attention "
                "(attention rows x sum p^2 of the demo corpus's packs), per patch, split fwd : bwd = 1 : 2; no ends "
                "term (in the layers). LM: (step at 6 layers - step at 4) / 2 per layer under full recompute, less "
                "attention (cuDNN row x sum s^2), per token, fwd : bwd = 1 : 2; ends = step - vit - layers - "
                "optimizer (embedding, chunked head + CE). Optimizer: breakdown_ms.optimizer / parameters held."
            ),
            "raw_points": {
                "vit_s": vit_s,
                "vit_patches": patches,
                "vit_frames": frames,
                "vit_sum_p2": frame_sq,
                "lm_layer_s_full_recompute": layer_s,
                "lm_tokens": tokens,
                "lm_sum_s2": doc_sq,
                "ends_s": ends_s,
                "optimizer_s": optimizer_s,
                "parameters": counts["total"],
                "attention_s_per_item_sq": q,
            },
            "links_and_scaling": "assumed, not measured: NVLink 150 GB/s and 400 Gb/s IB (40 GB/s) per GPU "
            "achieved; TP efficiency 0.8 (one GPU measures neither)",
        },
        "vit": {
            "layers": vit_layers,
            "layer_fwd": {"per_item_s": vit_f, "per_item_sq_s": q["vit_f"]},
            "layer_fwd_bwd": {"per_item_s": 3 * vit_f, "per_item_sq_s": q["vit_fb"]},
            "ends_fwd": {},
            "ends_fwd_bwd": {},
        },
        "lm": {
            "layers": cfg.model.lm.num_layers,
            "layer_fwd": {"per_item_s": lm_f, "per_item_sq_s": q["lm_f"]},
            "layer_fwd_bwd": {"per_item_s": 3 * lm_f, "per_item_sq_s": q["lm_fb"]},
            "ends_fwd": {"per_item_s": ends_s / 3 / tokens},
            "ends_fwd_bwd": {"per_item_s": ends_s / tokens},
        },
        "links": costs.DEFAULT_LINKS,
        "scaling": {"tp_efficiency": 0.8},
        "optimizer": {"s_per_param": optimizer_s / counts["total"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny model, a couple of points")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop adding points after this long")
    parser.add_argument("--vit-frames", default="256,576,1024,2304,4096", help="patches per frame")
    parser.add_argument("--vit-totals", default="16384,32768,65536,131072", help="patches per call")
    parser.add_argument("--lm-tokens", default="4096,8192,16384,32768", help="tokens per pack")
    parser.add_argument("--lm-mixes", default=",".join(MIXES), help="document-length mixes")
    parser.add_argument("--out", type=Path, help="raw points (default benchmarks/results/hetero_rates_<dev>.json)")
    parser.add_argument("--calibration", type=Path, help="fitted rates (default parallel/calibration/<dev>.json)")
    parser.add_argument(
        "--seed-from",
        type=Path,
        metavar="THROUGHPUT_JSON",
        help="no sweep: derive rates from throughput_h200.json's step rows (and attention_backends_h200.json)",
    )
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "keye_demo_data")
    args = parser.parse_args()
    if args.seed_from:
        rates = seed_from_rows(args.seed_from, args.seed_from.with_name("attention_backends_h200.json"), args.data)
        costs.rates_from_dict(rates)
        target = args.calibration or REPO / "parallel" / "calibration" / "h200.json"
        write_result(target, rates)
        print(json.dumps(rates["provenance"]["raw_points"], indent=1))
        print(f"wrote {target}")
        return
    if args.smoke:
        args.vit_frames, args.vit_totals, args.lm_tokens, args.lm_mixes = "16,64", "256,512", "64,128", "one,mixed"
    args.vit_frames = [int(x) for x in args.vit_frames.split(",")]
    args.vit_totals = [int(x) for x in args.vit_totals.split(",")]
    args.lm_tokens = [int(x) for x in args.lm_tokens.split(",")]
    args.lm_mixes = args.lm_mixes.split(",")
    started = time.perf_counter()
    smoke = args.smoke or not torch.cuda.is_available()
    tag = device_tag()
    home = Path(tempfile.mkdtemp(prefix="hetero_rates_smoke_")) if smoke else REPO  # a smoke run writes to /tmp
    out = args.out or home / "benchmarks" / "results" / f"hetero_rates_{tag}.json"
    calibration = args.calibration or home / "parallel" / "calibration" / f"{tag}.json"
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    cfg, full_cfg, parts, ctx = build(args)
    ms = timer(smoke)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "device": device_name,
        **git_state(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "torch": torch.__version__,
        "script": "benchmarks/hetero_rates.py",
        "model": cfg.model.name,
        "dtype": str(ctx.dtype),
        "experts_impl": str(cfg.model.lm.experts_impl),
        "attention_backend": str(cfg.model.lm.attention_backend),
        "timing": "wall clock, one call after a warm call (smoke)" if smoke else "triton do_bench median",
        "budget_s": args.budget_s,
        "vit": [],
        "lm": [],
        "skipped": [],
    }
    plan = [("vit", f, t) for t in args.vit_totals for f in args.vit_frames if f <= t]
    plan += [("lm", t, m) for t in args.lm_tokens for m in args.lm_mixes]
    # interleave small to large so a cut budget still spans both modules
    plan.sort(key=lambda p: (p[2] if p[0] == "vit" else p[1]) / (4 if p[0] == "vit" else 1))
    for kind, a, b in plan:
        if time.perf_counter() - started > args.budget_s:
            result["skipped"].append({"module": kind, "point": [a, b], "why": "budget"})
            continue
        if kind == "vit":
            row = guarded(vit_point, parts, cfg, ctx.device, ctx.dtype, a, b, ms)
            row.setdefault("frame_patches", a)
            row.setdefault("total_patches", b)
        else:
            row = guarded(lm_point, parts, cfg, ctx.device, a, b, ms)
            row.setdefault("tokens", a)
            row.setdefault("mix", b)
        result[kind].append(row)
        brief = row.get("error") or f"layer {row['layer_fwd_ms']:.2f}/{row['layer_fwd_bwd_ms']:.2f} ms fwd/fwd+bwd"
        print(f"{kind} {a:>6} {b!s:>10}: {brief}", flush=True)
        write_result(out, result)
    fitted = fit(result["vit"], result["lm"])
    result["fit"] = fitted
    result["elapsed_s"] = time.perf_counter() - started
    write_result(out, result)

    good = {k: sum("error" not in p for p in result[k]) for k in ("vit", "lm")}
    if min(good.values()) < 4:  # too few points to fit four coefficients: keep the existing calibration
        print(f"only {good} good points: {calibration} left as it was; raw points in {out}")
        sys.exit(1)
    previous = {}
    if calibration.exists():
        previous = json.loads(calibration.read_text())
    rates = {
        "device": device_name,
        "provenance": {
            "source": "measured: per-layer sweep" + (" (CPU smoke, tiny model: not for planning)" if smoke else ""),
            "device": device_name,
            "commit": result["commit"],
            "worktree_dirty": result["worktree_dirty"],
            "date": result["date"],
            "script": "benchmarks/hetero_rates.py",
            "raw_points": str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out),
            "model": cfg.model.name,
            "experts_impl": result["experts_impl"],
            "ep": 1,
            "dtype": result["dtype"],
            "max_relative_error": fitted["max_relative_error"],
            "links_and_scaling": previous.get("provenance", {}).get(
                "links_and_scaling", "assumed (one GPU measures no p2p): see parallel/costs.py defaults"
            ),
        },
        "vit": {"layers": full_cfg.model.vit.num_layers, **fitted["terms"]["vit"]},
        "lm": {"layers": full_cfg.model.lm.num_layers, **fitted["terms"]["lm"]},
        "links": previous.get("links", costs.DEFAULT_LINKS),
        "scaling": previous.get("scaling", {"tp_efficiency": 0.8}),
        "optimizer": previous.get("optimizer", {"s_per_param": 0.0}),
        "points": {"vit": result["vit"], "lm": result["lm"]},
    }
    costs.rates_from_dict(rates)  # the file must load
    write_result(calibration, rates)
    print(json.dumps(fitted["max_relative_error"], indent=1))
    print(f"wrote {out} and {calibration} in {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
