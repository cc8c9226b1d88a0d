"""The exact top-k select kernel alone on one GPU: its tile (elements per step along a row) and warps, on the
indexer scores of the last rows of one long document (the longest rows, where select time concentrates), with
each configuration's sets checked equal to torch.topk's on the same scores; then the scores kernel over key tiles
per program.

    python3 benchmarks/dsa_select_h200.py [--length 131072] [--rows 4096]

Rows go to benchmarks/results/dsa_select_h200.json.
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
from benchmarks.dsa_h200 import K, inputs, timed  # noqa: E402
from kernels.triton_dsa.indexer import indexer_scores, select_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument(
        "--configs",
        default="1024:4:8,512:4:8,1024:4:11,512:4:11,2048:4:11,1024:8:11",
        help="block:num_warps:digit_bits,...",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dsa_select_h200.json")
    args = parser.parse_args()
    stamp = {
        **git_state(),
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    _, _, _, iq, iw, ik = inputs(args.length, seed=11)
    r0, r1 = args.length - args.rows, args.length
    scores = indexer_scores(iq, iw, ik, 0, r0, r1)
    visible = torch.arange(r0, r1, device="cuda")[:, None] >= torch.arange(r1, device="cuda")[None, :]
    want = torch.topk(scores.masked_fill(~visible, float("-inf")), K, dim=1).indices.sort(1).values.int()
    streamed = float((visible.sum() * 4).item())  # bytes of one pass over every row's visible scores
    rows = []
    for block, warps, bits in (tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")):
        out = torch.full((args.rows, K), -7, dtype=torch.int32, device="cuda")
        select_rows(scores, out, 0, r0, K, block, q_row0=r0, num_warps=warps, digit_bits=bits)
        exact = bool(torch.equal(out, want))  # random scores: ties are measure-zero, so the sets are unique
        ms = timed(lambda: select_rows(scores, out, 0, r0, K, block, q_row0=r0, num_warps=warps, digit_bits=bits))
        passes = -(-32 // bits) + 1  # radix passes + the writing pass, each over the whole row
        row = {
            "L": args.length,
            "rows": args.rows,
            "k": K,
            "block": block,
            "num_warps": warps,
            "digit_bits": bits,
            "exact": exact,
            "select_ms": ms,
            "passes_gb_per_s": passes * streamed / ms / 1e6,
            **stamp,
        }
        print(
            f"block {block:5d} warps {warps:2d} bits {bits:2d}  {ms:8.2f} ms  exact={exact}  "
            f"{passes} passes at {row['passes_gb_per_s']:.0f} GB/s",
            flush=True,
        )
        rows.append(row)
    for tiles in (1, 4, 8, 16):
        ms = timed(lambda: indexer_scores(iq, iw, ik, 0, r0, r1, key_tiles=tiles))
        same = bool(
            torch.equal(
                indexer_scores(iq, iw, ik, 0, r0, r1, key_tiles=tiles).masked_fill(~visible, 0),
                scores.masked_fill(~visible, 0),
            )
        )
        written = float(visible.sum()) * 4
        rows.append(
            {
                "L": args.length,
                "rows": args.rows,
                "scores_key_tiles": tiles,
                "scores_ms": ms,
                "scores_same": same,
                "scores_write_gb_per_s": written / ms / 1e6,
                **stamp,
            }
        )
        print(
            f"scores, {tiles:2d} key tiles per program: {ms:8.2f} ms  same={same}  "
            f"writes at {rows[-1]['scores_write_gb_per_s']:.0f} GB/s",
            flush=True,
        )
    torch_ms = timed(lambda: torch.topk(scores.masked_fill(~visible, float("-inf")), K, dim=1))
    print(f"torch.topk on the same scores (mask included): {torch_ms:.2f} ms")
    write_result(args.out, {"rows": rows, "torch_topk_ms": torch_ms})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
