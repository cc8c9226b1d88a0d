"""Training steps of the full-width Keye-VL-2.0-30B-A3B on the GPUs of this host, at reduced LM depth when the
host is too small for all 48 layers: step time, tokens/s per GPU, MFU, peak memory and MoE balance.

    python3 benchmarks/fullsize_step_gpu.py [--lm-layers 4] [--gpus 1] [--seq 32768] [--steps 6] [--attention dense]

The model is `model=keye_vl2_30b_a3b` (27-layer ViT, 128 experts, top-8, GQA 32/4) with `--lm-layers` LM layers,
random init, bf16, full activation recomputation, EP over the GPUs (recipes/parallel/ep8_node.yaml), on the demo
corpus packed to `--seq` tokens, one packed sequence per GPU per step, no checkpoints. MFU counts 6 x the active
LM parameters without the input embedding per token (a lower bound: no attention and no ViT FLOPs) and, as an
upper bound, adds full-causal attention over the whole packed sequence (packed documents attend less). Peaks:
the datasheet's 989 TFLOP/s dense bf16 and a measured large bf16 matmul. Rows go to
benchmarks/results/fullsize_step_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402

DATASHEET_BF16_TFLOPS = 989.0


def matmul_tflops() -> float:
    import triton.testing

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--attention", default="dense", choices=["dense", "sparse"])
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "keye_demo_data")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    out = args.out or REPO / "benchmarks" / "results" / f"fullsize_step_{device.split()[-1].lower()}.json"
    if not (args.data / "shards" / "index.json").exists():
        subprocess.run(
            [sys.executable, "-m", "data_pipeline.cli", "demo", "--out", str(args.data)],
            check=True,
            capture_output=True,
        )
    run_dir = Path(tempfile.mkdtemp(prefix="fullsize_"))
    overrides = [
        "recipe=stage1_pretrain",
        "launch=local",
        "parallel=ep8_node",
        f"parallel.nproc={args.gpus}",
        f"parallel.ep={args.gpus}",
        f"model.lm.num_layers={args.lm_layers}",
        f"attention={args.attention}",
        f"train.steps={args.steps}",
        f"train.global_batch={args.gpus}",
        f"train.seq_length={args.seq}",
        "optim.warmup_steps=1",
        f"data.shards={args.data / 'shards'}",
        f"data.tokenizer={args.data / 'tokenizer.json'}",
        "data.workers=4",
        "logging.wandb_mode=disabled",
        "logging.progress_bar=false",
        "checkpoint.interval=0",
        f"run_dir={run_dir}",
    ]
    done = subprocess.run([sys.executable, "-m", "keye_train.cli", *overrides], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[2:] if len(rows) > 3 else rows[1:]  # the first steps compile and warm the allocator

    from keye_train.config import keye_vl2_30b_a3b
    from keye_train.planning.parameters import count_parameters

    model = keye_vl2_30b_a3b()
    model.lm.num_layers = args.lm_layers
    counts = count_parameters(model)
    flop_params = counts["active"] - counts["active_parts"]["embedding"]
    lm = model.lm
    causal_attention = 6 * lm.num_layers * args.seq * lm.num_heads * lm.head_dim  # 3 x (2 matmuls of s/2 keys)
    step_s = statistics.median(r["step_time_s"] for r in timed)
    tokens_per_gpu = args.seq / step_s  # one packed sequence per GPU per step
    measured_peak = matmul_tflops()
    result = {
        "device": device,
        "gpus": args.gpus,
        **git_state(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "model": "keye_vl2_30b_a3b",
        "lm_layers": args.lm_layers,
        "vit_layers": model.vit.num_layers,
        "experts": lm.num_experts,
        "ep": args.gpus,
        "seq_length": args.seq,
        "attention": args.attention,
        "recompute": "full",
        "dtype": "bf16",
        "steps": len(rows),
        "timed_steps": len(timed),
        "step_time_s": step_s,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "active_params_for_flops": flop_params,
        "mfu_params_only": 6 * flop_params * tokens_per_gpu / (DATASHEET_BF16_TFLOPS * 1e12),
        "mfu_with_causal_attention": (6 * flop_params + causal_attention)
        * tokens_per_gpu
        / (DATASHEET_BF16_TFLOPS * 1e12),
        "matmul_bf16_tflops_measured": measured_peak,
        "peak_memory_gib": max(r.get("memory/peak_gib", float("nan")) for r in rows),
        "moe_max_over_mean_load": statistics.mean(r["moe/max_over_mean_load"] for r in timed),
        "moe_worst_layer_max_over_mean_load": max(r["moe/worst_layer_max_over_mean_load"] for r in timed),
        "moe_aux_loss": statistics.mean(r["moe/aux_loss"] for r in timed),
        "losses": [r["loss"] for r in rows],
    }
    for key, value in result.items():
        print(f"{key:36s} {value}")
    previous = json.loads(out.read_text()) if out.exists() else {"rows": []}
    write_result(out, {"rows": previous["rows"] + [result]})
    print(f"wrote {out}")
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
