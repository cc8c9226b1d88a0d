"""Peak memory and time of the torch DSA reference at long context; figures to benchmarks/results/.

    .venv/bin/python benchmarks/dsa_reference.py [--length 32768] [--budget-mb 256]

Each function runs in a fresh process on one document of `length` tokens at the full-size shapes (indexer
16 x 64, top-k 2048; attention of one TP=4 shard: 8 query heads, 1 KV head, head dim 128), fp32. Peak memory
is the process's peak RSS above its RSS once the inputs exist, so it is the function's own working set.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_description, git_state, write_result  # noqa: E402


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _run(name: str, length: int, budget_mb: int, queue) -> None:
    import torch

    from kernels import dsa_reference as ref

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cu = torch.tensor([0, length], dtype=torch.int32)
    budget = budget_mb << 20
    iq, iw, ik = torch.randn(length, 16, 64), torch.randn(length, 16), torch.randn(length, 64)
    q, k, v = torch.randn(length, 8, 128), torch.randn(length, 1, 128), torch.randn(length, 1, 128)
    indices = ref.indexer_topk(iq, iw, ik, cu, 2048, budget_bytes=budget) if name != "indexer_topk" else None
    if name == "indexer_kl_sparse":
        iq.requires_grad_(), iw.requires_grad_(), ik.requires_grad_()
    base = _status_mib("VmRSS")
    exact = _reset_peak()
    started = time.perf_counter()
    if name == "indexer_topk":
        ref.indexer_topk(iq, iw, ik, cu, 2048, budget_bytes=budget)
    elif name == "sparse_attention_fwd":
        ref.sparse_gqa_attention(q, k, v, indices, 128**-0.5, budget_bytes=budget)
    elif name == "indexer_kl_sparse":
        ref.indexer_kl_loss(iq, iw, ik, q, k, cu, 128**-0.5, indices=indices, budget_bytes=budget).backward()
    seconds = time.perf_counter() - started
    peak = _status_mib("VmHWM")
    outputs = {
        "indexer_topk": length * 2048 * 4,
        "sparse_attention_fwd": length * 8 * (128 + 1) * 4,
        "indexer_kl_sparse": length * (16 * 64 + 16 + 64) * 4,
    }[name]  # indices / out + lse / saved grads
    queue.put(
        {
            "function": name,
            "seconds": seconds,
            "peak_above_inputs_mib": peak - base,
            "of_which_outputs_mib": outputs / 2**20,
            "inputs_rss_mib": base,
            "peak_reset_exact": exact,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--budget-mb", type=int, default=256)
    parser.add_argument("--functions", nargs="+", default=["indexer_topk", "sparse_attention_fwd", "indexer_kl_sparse"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dsa_reference_cpu.json")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name in args.functions:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(name, args.length, args.budget_mb, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    full_logits_mib = args.length * args.length * 4 / 2**20
    result = {
        "benchmark": "dsa_reference",
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        **git_state(),
        "device": cpu_description(),
        "shapes": {
            "length": args.length,
            "documents": 1,
            "index_heads": 16,
            "index_head_dim": 64,
            "topk": 2048,
            "q_heads": 8,
            "kv_heads": 1,
            "head_dim": 128,
            "dtype": "fp32",
            "memory_budget_mb": args.budget_mb,
        },
        "figures": {"functions": rows, "full_fp32_logits_mib": full_logits_mib},
    }
    print(
        f"{'function':24}{'seconds':>10}{'peak MiB':>10}{'outputs MiB':>13}   "
        f"(full L x L fp32 logits: {full_logits_mib:.0f} MiB)"
    )
    for r in rows:
        print(
            f"{r['function']:24}{r['seconds']:>10.1f}{r['peak_above_inputs_mib']:>10.0f}{r['of_which_outputs_mib']:>13.0f}"
        )
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
