"""Where DSA time goes on one GPU: each part of the Triton path timed alone, for random top-k sets (fresh random
inputs, near-disjoint sets: the worst case for union tiling) and for local sets (each query takes its k most
recent keys: the best case), over the tile options of the sparse kernels.

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
from kernels.triton_dsa.indexer_kl import sparse_attention_target  # noqa: E402
from kernels.triton_dsa.union import block_union  # noqa: E402


def local_indices(length: int) -> torch.Tensor:
    t = torch.arange(length, device="cuda")[:, None]
    j = torch.arange(K, device="cuda")[None, :]
    first = (t - K + 1).clamp_min(0)
    idx = first + j
    return torch.where(idx <= t, idx, -1).to(torch.int32)


def part_rows(length: int, kind: str, indices: torch.Tensor, q, k, v, configs) -> list[dict]:
    rows = []
    for bq in (2, 4, 16):
        keys, _, offsets = block_union(indices, bq)
        union_ratio = keys.shape[0] / max(1, int((indices >= 0).sum())) * bq
        union_ms = timed(lambda: block_union(indices, bq))
        for bu, warps in configs:
            opts = dict(block_keys=bu, block_queries=bq, num_warps=warps)
            qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))

            def fwd_bwd():
                o, _ = dsa.sparse_gqa_attention(qs, ks, vs, indices, D**-0.5, backend="triton", **opts)
                o.float().sum().backward()

            row = {
                "L": length,
                "sets": kind,
                "block_queries": bq,
                "block_keys": bu,
                "num_warps": warps,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--configs", default="64:4,64:8,32:4,128:8", help="block_keys:num_warps,...")
    parser.add_argument("--sets", nargs="+", default=["random", "local"], choices=["random", "local"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dsa_parts_h200.json")
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
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
        _, lse = dsa.sparse_gqa_attention(q, k, v, indices, D**-0.5, backend="triton")
        common = {"L": length, **stamp}
        common["indexer_topk_ms"] = timed(
            lambda: dsa.indexer_topk(iq, iw, ik, cu, K, backend="triton", budget_bytes=BUDGET)
        )
        common["torch_topk_ms"] = timed(lambda: torch_scores_topk(iq, iw, ik, cu))
        common["kl_target_ms"] = timed(lambda: sparse_attention_target(q, k, lse, indices, D**-0.5))
        iqs, iws, iks = (x.clone().requires_grad_() for x in (iq, iw, ik))

        def kl_step():
            dsa.indexer_kl_loss(
                iqs, iws, iks, q, k, cu, D**-0.5, indices=indices, attn_lse=lse, backend="triton"
            ).backward()

        common["kl_fwd_bwd_ms"] = timed(kl_step)
        print(common, flush=True)
        rows.append(common)
        for kind in args.sets:
            sets = indices if kind == "random" else local_indices(length)
            rows += part_rows(length, kind, sets, q, k, v, configs)
            write_result(args.out, {"shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "k": K}, "rows": rows})
        del q, k, v, iq, iw, ik, indices
        torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
