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
import sys
import tempfile
import time
import traceback
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
        size = max(128, min(size, left))
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
    args = parser.parse_args()
    if args.smoke:
        args.vit_frames, args.vit_totals, args.lm_tokens, args.lm_mixes = "16,64", "256,1024", "128,256", "one,mixed"
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
        "scaling": previous.get("scaling", {"tp_efficiency": 0.8, "ep_overhead": 0.1}),
        "optimizer": previous.get("optimizer", {"s_per_param": 0.0}),
        "points": {"vit": result["vit"], "lm": result["lm"]},
    }
    costs.rates_from_dict(rates)  # the file must load
    write_result(calibration, rates)
    print(json.dumps(fitted["max_relative_error"], indent=1))
    print(f"wrote {out} and {calibration} in {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
