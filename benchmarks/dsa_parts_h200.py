"""Where DSA time goes on one GPU: each part of the Triton path timed alone, for random top-k sets (fresh random
inputs, near-disjoint sets: the worst case for union tiling), local sets (each query takes its k most recent keys:
the best case) and structured sets (kernels/dsa_sets.py: shaped like a trained indexer's), over the tile options
of the sparse kernels (keys per chunk, warps, pipeline stages, fused or split backward), with each compiled
kernel's registers and spills; `--control` adds the control kernels of benchmarks/dsa_kernel_control.py.

    python3 benchmarks/dsa_parts_h200.py [--lengths 32768 131072]

Rows go to benchmarks/results/dsa_parts_h200.json.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402
from benchmarks.dsa_h200 import BUDGET, HKV, HQ, D, K, inputs, timed, torch_scores_topk  # noqa: E402
from kernels import dsa  # noqa: E402
from kernels.dsa_sets import selection_stats, structured_indices  # noqa: E402
from kernels.triton_dsa.indexer_kl import sparse_attention_target  # noqa: E402
from kernels.triton_dsa.union import block_union  # noqa: E402


def local_indices(length: int) -> torch.Tensor:
    t = torch.arange(length, device="cuda")[:, None]
    j = torch.arange(K, device="cuda")[None, :]
    first = (t - K + 1).clamp_min(0)
    idx = first + j
    return torch.where(idx <= t, idx, -1).to(torch.int32)


def compile_report(fn) -> list[dict]:
    """Registers, spills and the instructions that matter of every compiled variant of a Triton kernel."""
    report = []
    for cache in fn.device_caches.values():
        for kernel in cache[0].values():
            ptx = kernel.asm.get("ptx", "")
            report.append(
                {
                    "kernel": fn.__name__,
                    "num_warps": kernel.metadata.num_warps,
                    "num_stages": kernel.metadata.num_stages,
                    "n_regs": kernel.n_regs,
                    "n_spills": kernel.n_spills,
                    "wgmma": "wgmma" in ptx,
                    "cp_async": "cp.async" in ptx,
                    "vector_atomics": any(op in ptx for op in ("red.global.v", "red.global.add.v", ".v4.f32")),
                    "shared_bytes": kernel.metadata.shared,
                }
            )
    return report


def part_rows(length: int, kind: str, indices: torch.Tensor, q, k, v, configs, block_queries) -> list[dict]:
    rows = []
    for bq in block_queries:
        keys, _, offsets = block_union(indices, bq)
        union_ratio = keys.shape[0] / max(1, int((indices >= 0).sum())) * bq
        union_ms = timed(lambda: block_union(indices, bq))
        for bu, warps, stages, backward in configs:
            opts = dict(block_keys=bu, block_queries=bq, num_warps=warps, num_stages=stages)
            qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))

            def fwd_bwd():
                o, _ = dsa.sparse_gqa_attention(
                    qs, ks, vs, indices, D**-0.5, backend="triton", backward=backward, **opts
                )
                o.float().sum().backward()

            row = {
                "L": length,
                "sets": kind,
                "block_queries": bq,
                "block_keys": bu,
                "num_warps": warps,
                "num_stages": stages,
                "backward": backward,
                "union_keys_per_query_over_k": union_ratio,
                "union_ms": union_ms,
            }
            try:
                fwd = timed(lambda: dsa.sparse_gqa_attention(q, k, v, indices, D**-0.5, backend="triton", **opts))
                row.update(
                    sparse_fwd_ms=fwd,
                    sparse_fwd_bwd_ms=timed(fwd_bwd),
                    sparse_fwd_tflops_useful=4 * length * K * HQ * D / fwd / 1e9,
                )
            except triton.runtime.errors.OutOfResources as error:  # a tile too big for this GPU
                row["error"] = str(error)
            print(row, flush=True)
            rows.append(row)
    return rows


def control_rows(length: int, q, k, v, configs) -> list[dict]:
    """The control kernels (benchmarks/dsa_kernel_control.py) at the union tile's shape: 16 queries x 8 heads
    against 2048 keys per block, contiguous / gathered, unmasked / masked."""
    from benchmarks.dsa_kernel_control import _control_fwd, control_forward, control_lists

    rows = []
    keys, bits = control_lists(length, K)
    for gather, mask in ((False, False), (True, False), (True, True)):
        for bu, warps, stages, _ in configs:
            row = {"L": length, "control": f"gather={gather},mask={mask}", "block_keys": bu, "num_warps": warps,
                   "num_stages": stages}  # fmt: skip
            opts = dict(gather=gather, mask=mask, block_keys=bu, num_warps=warps, num_stages=stages)
            try:
                _, _, flops = control_forward(q, k, v, keys, bits, **opts)
                ms = timed(lambda: control_forward(q, k, v, keys, bits, **opts))
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except triton.runtime.errors.OutOfResources as error:
                row["error"] = str(error)
            print(row, flush=True)
            rows.append(row)
    return rows + compile_report(_control_fwd)


def common_times(q, k, v, iq, iw, ik, cu, indices) -> dict:
    """The indexer's scores + top-k (Triton, and torch as the baseline), the KL target and the KL fwd + bwd."""
    _, lse = dsa.sparse_gqa_attention(q, k, v, indices, D**-0.5, backend="triton")
    times = {
        "indexer_topk_ms": timed(lambda: dsa.indexer_topk(iq, iw, ik, cu, K, backend="triton", budget_bytes=BUDGET)),
        "torch_topk_ms": timed(lambda: torch_scores_topk(iq, iw, ik, cu)),
        "kl_target_ms": timed(lambda: sparse_attention_target(q, k, lse, indices, D**-0.5)),
    }
    iqs, iws, iks = (x.clone().requires_grad_() for x in (iq, iw, ik))

    def kl_step():
        kl = dsa.indexer_kl_loss(iqs, iws, iks, q, k, cu, D**-0.5, indices=indices, attn_lse=lse, backend="triton")
        kl.backward()

    times["kl_fwd_bwd_ms"] = timed(kl_step)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument(
        "--configs",
        default="64:4:3:fused,64:8:3:fused,64:8:3:split,64:4:2:split,32:4:3:split,128:8:2:split",
        help="block_keys:num_warps:num_stages:backward,...",
    )
    parser.add_argument("--sets", nargs="+", default=["random", "local", "structured"])
    parser.add_argument("--control", action="store_true", help="also time the control kernels")
    parser.add_argument("--no-common", action="store_true", help="skip the indexer, top-k and KL timings")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dsa_parts_h200.json")
    args = parser.parse_args()
    configs = [(int(a), int(b), int(c), mode) for a, b, c, mode in (x.split(":") for x in args.configs.split(","))]
    stamp = {
        **git_state(),
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    rows = []
    for length in args.lengths:
        q, k, v, iq, iw, ik = inputs(length, seed=length)
        cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
        indices = dsa.indexer_topk(iq, iw, ik, cu, K, backend="triton", budget_bytes=BUDGET)
        common = {"L": length, **stamp}
        if not args.no_common:
            common.update(common_times(q, k, v, iq, iw, ik, cu, indices))
            print(common, flush=True)
        rows.append(common)
        for kind in args.sets:
            sets = {"random": lambda: indices, "local": lambda: local_indices(length)}.get(
                kind, lambda: structured_indices(length, K, device="cuda")
            )()
            stats = selection_stats(sets)
            print(kind, stats, flush=True)
            block_queries = (2, 16) if kind == "random" else (16,)
            rows += [{**r, **stats} for r in part_rows(length, kind, sets, q, k, v, configs, block_queries)]
            write_result(args.out, {"shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "k": K}, "rows": rows})
        if args.control:
            rows += control_rows(length, q, k, v, configs)
        from kernels.triton_dsa import sparse_attention

        rows += [
            {"L": length, **r}
            for fn in (sparse_attention._sparse_fwd, sparse_attention._sparse_bwd, sparse_attention._sparse_bwd_dq,
                       sparse_attention._sparse_bwd_dkv)
            for r in compile_report(fn)
        ]  # fmt: skip
        write_result(args.out, {"shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "k": K}, "rows": rows})
        del q, k, v, iq, iw, ik, indices
        torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
