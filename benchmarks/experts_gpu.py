"""The MoE expert GEMMs alone on one GPU, forward + backward in bf16: megatron's SequentialMLP (one fc1/fc2 per
expert in a Python loop) against our GroupedExperts (torch's grouped GEMM, model.lm.experts_impl=grouped).

    python3 benchmarks/experts_gpu.py [--tokens 32768] [--topk 8] [--experts 128] [--routing balanced skewed]

Shape of the full model at EP 1: 32K tokens x top-8 = 262,144 routed rows over 128 experts, 2048 -> 2 x 768
(SwiGLU) -> 2048, router probs applied before fc2, as in the model (each module built from the LM's own layer
spec). Routing: `balanced` gives every expert the same row count (a multiple of 8: no padding); `skewed` draws
counts from softmax(N(0, 1)) expert weights (uneven, unaligned: GroupedExperts pads each group to 8 rows).
Also timed: the three grouped GEMMs + SwiGLU on their own (`grouped_mm_only`, no megatron module), and a large
bf16 matmul as the device's reachable peak. FLOPs = 6 x rows x 3 x hidden x ffn (fc1 is 2 x ffn wide) for
forward + backward, counted on the routed rows (padding rows are overhead). The grouped row checks GroupedExperts
against SequentialMLP on the same inputs (relative L2 of the output and of every gradient). Rows go to
benchmarks/results/experts_h200.json.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402

HIDDEN, FFN = 2048, 768
DEVICE, DTYPE = "cuda", torch.bfloat16


def matmul_tflops() -> float:
    import triton.testing

    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def timed_ms(fn, grads) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=100, rep=2000, grad_to_none=grads, return_mode="median"))


def build_experts(impl: str, num_experts: int):
    """One MoE layer's experts module as the LM builds it (its spec), bf16 on this GPU."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from keye_train.config import LMConfig, ParallelConfig
    from keye_train.model.lm import lm_transformer_config
    from keye_train.model.specs import lm_block_spec

    lm = LMConfig(num_layers=1, num_experts=num_experts, experts_impl=impl)
    config = lm_transformer_config(lm, ParallelConfig(), DTYPE, on_gpu=DEVICE == "cuda")
    spec = lm_block_spec(config, lm, pp_rank=0).submodules.layer_specs[0].submodules.mlp.submodules.experts
    return build_module(spec, num_experts, config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def routed_counts(routing: str, rows: int, num_experts: int, seed: int = 0) -> list[int]:
    if routing == "balanced":
        return [rows // num_experts] * num_experts
    g = torch.Generator().manual_seed(seed)
    weights = torch.softmax(torch.randn(num_experts, generator=g), 0)
    return torch.multinomial(weights, rows, replacement=True, generator=g).bincount(minlength=num_experts).tolist()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def grouped_mm_only(x, probs, fc1, fc2, counts):
    """The grouped GEMMs and SwiGLU without a megatron module (rows already aligned by the caller)."""
    from kernels.grouped_matmul import grouped_matmul

    gate, up = grouped_matmul(x, fc1, counts).chunk(2, dim=-1)
    return grouped_matmul((torch.nn.functional.silu(gate) * up * probs[:, None]).to(x.dtype), fc2, counts)


def measure(routing: str, rows: int, num_experts: int, modules: dict) -> list[dict]:
    from kernels.grouped_matmul import padded_counts

    counts = routed_counts(routing, rows, num_experts)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(rows, HIDDEN, generator=g, device=DEVICE, dtype=DTYPE).requires_grad_()
    probs = torch.rand(rows, generator=g, device=DEVICE).requires_grad_()
    upstream = torch.randn(rows, HIDDEN, generator=g, device=DEVICE, dtype=DTYPE)
    tokens = torch.tensor(counts)
    flops = 6 * rows * 3 * HIDDEN * FFN
    out, results = [], {}
    for impl, module in modules.items():
        leaves = [x, probs, *module.parameters()]

        def step():
            y, _ = module(x, tokens, probs)
            y.backward(upstream)
            return y

        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        y = step()
        results[impl] = [t.detach().clone() for t in (y, x.grad, probs.grad, *_per_expert(module, "grad"))]
        del y
        ms = timed_ms(step, leaves)
        peak = torch.cuda.max_memory_allocated() / 2**30  # both modules' weights and this one's activations
        out.append({"impl": impl, "routing": routing, "ms": ms, "tflops": flops / ms / 1e9, "peak_gib": peak})
        for t in leaves:
            t.grad = None
    # the grouped GEMMs alone on pre-aligned rows (balanced counts are aligned; skewed ones are rounded up)
    grouped = modules["grouped"]
    aligned = padded_counts(counts, 8)
    xa = torch.randn(sum(aligned), HIDDEN, generator=g, device=DEVICE, dtype=DTYPE).requires_grad_()
    pa = torch.rand(sum(aligned), generator=g, device=DEVICE)
    ua = torch.randn(sum(aligned), HIDDEN, generator=g, device=DEVICE, dtype=DTYPE)
    fc1, fc2 = grouped.linear_fc1.weight, grouped.linear_fc2.weight
    ms = timed_ms(lambda: grouped_mm_only(xa, pa, fc1, fc2, aligned).backward(ua), [xa, fc1, fc2])
    out.append({"impl": "grouped_mm_only", "routing": routing, "ms": ms, "tflops": flops / ms / 1e9})
    names = ("out", "d_hidden", "d_probs", "d_fc1", "d_fc2")
    check = {f"rel_err_{n}": rel(a, b) for n, a, b in zip(names, results["grouped"], results["sequential"])}
    base = next(r["ms"] for r in out if r["impl"] == "sequential")
    for row in out:
        row.update(
            speedup_vs_sequential=base / row["ms"],
            rows=rows,
            padded_rows=sum(padded_counts(counts, 8)),
            min_count=min(counts),
            max_count=max(counts),
        )
        if row["impl"] == "grouped":
            row["grouped_vs_sequential"] = check
    return out


def _per_expert(module, attr: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, out, in] fc1 and fc2 values (attr 'data' or 'grad') of either experts module."""
    if hasattr(module, "local_experts"):
        return tuple(
            torch.stack([getattr(getattr(e, fc).weight, attr) for e in module.local_experts])
            for fc in ("linear_fc1", "linear_fc2")
        )
    return tuple(getattr(getattr(module, fc).weight, attr) for fc in ("linear_fc1", "linear_fc2"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--routing", nargs="+", default=["balanced", "skewed"], choices=["balanced", "skewed"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/experts_h200.json")
    args = parser.parse_args()

    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    modules = {impl: build_experts(impl, args.experts) for impl in ("sequential", "grouped")}
    with torch.no_grad():  # the same random weights in both
        fc1 = torch.randn(args.experts, 2 * FFN, HIDDEN, device=DEVICE) * HIDDEN**-0.5
        fc2 = torch.randn(args.experts, HIDDEN, FFN, device=DEVICE) * FFN**-0.5
        modules["grouped"].linear_fc1.weight.copy_(fc1)
        modules["grouped"].linear_fc2.weight.copy_(fc2)
        for i, expert in enumerate(modules["sequential"].local_experts):
            expert.linear_fc1.weight.copy_(fc1[i])
            expert.linear_fc2.weight.copy_(fc2[i])

    peak = matmul_tflops()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        **git_state(),
        "date": datetime.date.today().isoformat(),
        "matmul_bf16_tflops_measured": peak,
        "shape": {
            "tokens": args.tokens,
            "topk": args.topk,
            "experts": args.experts,
            "hidden": HIDDEN,
            "ffn": FFN,
            "dtype": "bf16",
        },
        "rows": [],
    }
    rows = args.tokens * args.topk
    for routing in args.routing:
        result["rows"].extend(measure(routing, rows, args.experts, modules))
        write_result(args.out, result)
    print(f"{'routing':9s} {'impl':16s} {'ms':>8s} {'TFLOP/s':>8s} {'x seq':>6s} {'peak GiB':>8s}")
    for row in result["rows"]:
        print(
            f"{row['routing']:9s} {row['impl']:16s} {row['ms']:8.2f} {row['tflops']:8.1f} "
            f"{row['speedup_vs_sequential']:6.2f} {row.get('peak_gib', float('nan')):8.2f}"
        )
        if "grouped_vs_sequential" in row:
            print(
                "    grouped vs sequential: "
                + ", ".join(f"{k[8:]} {v:.1e}" for k, v in row["grouped_vs_sequential"].items())
            )
    print(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s; written to {args.out}")


if __name__ == "__main__":
    main()
