"""The routed experts of one decode step at the 30B model's sizes: torch's grouped GEMM path (what
sync_free_experts ran before) against the Triton decode kernels (kernels/moe_decode.py), with a sweep of the
kernels' tile configs. 128 experts, hidden 2048, expert FFN 768, top-8, uniform random routing, bf16; each
timing is the median of triton.testing.do_bench (L2 flushed between runs). `weight_gbs` = bytes of the weights
of the experts that got rows / time: the decode floor is the HBM bandwidth (about 4.8 TB/s on an H200).

    python3 benchmarks/experts_decode_gpu.py [--tokens 64 128] [--out benchmarks/results/experts_decode_h200.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402


def main() -> None:
    import triton.testing

    from kernels import moe_decode
    from kernels.grouped_matmul import grouped_matmul_by_offsets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "experts_decode_h200.json")
    args = parser.parse_args()
    experts, topk, hidden, features = 128, 8, 2048, 768
    result = {
        "benchmark": "experts_decode_gpu",
        "device": torch.cuda.get_device_name(),
        **git_state(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "shapes": {"experts": experts, "topk": topk, "hidden": hidden, "ffn": features, "dtype": "bf16"},
        "rows": [],
    }
    g = torch.Generator("cuda").manual_seed(0)
    fc1 = (torch.randn(experts, 2 * features, hidden, generator=g, device="cuda") / hidden**0.5).bfloat16()
    fc2 = (torch.randn(experts, hidden, features, generator=g, device="cuda") / features**0.5).bfloat16()
    bench = lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))  # noqa: E731
    fc1_configs = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4))]
    fc2_configs = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4))]
    for tokens in args.tokens:
        chosen = torch.rand(tokens, experts, generator=g, device="cuda").topk(topk, dim=1).indices
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts)
        ends = counts.cumsum(0).to(torch.int32)
        hit = int((counts > 0).sum())
        x = torch.randn(tokens, hidden, generator=g, device="cuda").bfloat16()
        scale = torch.rand(tokens * topk, generator=g, device="cuda")
        source = order // topk
        weight_bytes = hit * 3 * hidden * features * 2

        def torch_path():
            gate, up = grouped_matmul_by_offsets(x[source], fc1, ends).chunk(2, dim=-1)
            act = (torch.nn.functional.silu(gate) * up * scale[:, None]).to(x.dtype)
            out = grouped_matmul_by_offsets(act, fc2, ends)
            combined = torch.empty_like(out)
            combined[order] = out
            return combined

        act = moe_decode.swiglu_fc1(x, fc1, ends, source, scale)
        fc1_times = {
            c: bench(lambda c=c: moe_decode.swiglu_fc1(x, fc1, ends, source, scale, config=c)) for c in fc1_configs
        }
        fc2_times = {
            c: bench(lambda c=c: moe_decode.rows_fc2(act, fc2, ends, order, tokens * topk, config=c))
            for c in fc2_configs
        }
        best1, best2 = min(fc1_times, key=fc1_times.get), min(fc2_times, key=fc2_times.get)

        def triton_path(c1=None, c2=None):
            a = moe_decode.swiglu_fc1(x, fc1, ends, source, scale, config=c1)
            return moe_decode.rows_fc2(a, fc2, ends, order, tokens * topk, config=c2)

        row = {
            "tokens": tokens,
            "experts_hit": hit,
            "weight_mb": weight_bytes / 1e6,
            "torch_ms": bench(torch_path),
            "triton_default_ms": bench(triton_path),
            "triton_best_ms": bench(lambda: triton_path(best1, best2)),
            "fc1_best": {"config": list(best1), "ms": fc1_times[best1], "default_ms": fc1_times[moe_decode.FC1_CONFIG]},
            "fc2_best": {"config": list(best2), "ms": fc2_times[best2], "default_ms": fc2_times[moe_decode.FC2_CONFIG]},
            "fc1_sweep_ms": {",".join(map(str, c)): t for c, t in fc1_times.items()},
            "fc2_sweep_ms": {",".join(map(str, c)): t for c, t in fc2_times.items()},
        }
        for key in ("torch", "triton_default", "triton_best"):
            row[f"{key}_weight_gbs"] = weight_bytes / row[f"{key}_ms"] / 1e6
        row["speedup_default_vs_torch"] = row["torch_ms"] / row["triton_default_ms"]
        result["rows"].append(row)
        print(
            f"tokens {tokens:>4}: experts hit {hit}, "
            f"torch {row['torch_ms']:.3f} ms ({row['torch_weight_gbs']:.0f} GB/s), "
            f"triton default {row['triton_default_ms']:.3f} ms ({row['triton_default_weight_gbs']:.0f} GB/s), "
            f"best {row['triton_best_ms']:.3f} ms "
            f"(fc1 {best1} {fc1_times[best1]:.3f}, fc2 {best2} {fc2_times[best2]:.3f})",
            flush=True,
        )
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
