"""DSA on one GPU at the full-size shapes: correctness of the Triton kernels against the torch reference, then
time and memory of DSA against dense attention (cuDNN and flash SDPA backends), fwd + bwd.

    python3 benchmarks/dsa_h200.py [--lengths 32768 65536 131072] [--check-length 16384]

Shapes: one document of L tokens, 32 q heads / 4 KV heads, head dim 128, k = 2048, indexer 16 x 64, bf16.
DSA time = indexer scores + top-k + sparse attention forward + backward + the sparse-stage indexer KL (forward
and backward). Each row names which backend ran each part. Rows go to benchmarks/results/dsa_h200.json.

Two regimes of top-k sets (`--sets`), each row with the sets' adjacent-query Jaccard and |U16| / k:
- structured (the target): kernels/dsa_sets.py's generator, shaped like a trained indexer's selections; the
  indexer's scores and top-k still run on the same inputs and count in the DSA time, but attention and KL use the
  structured sets;
- random (the guard): the indexer's own top-k on fresh random inputs, near-disjoint sets.
Each row also times the parts alone: indexer scores; the query-block union (built once per step and shared by
the attention and the KL target); the sparse forward kernel (union prebuilt); attention fwd + bwd; the KL target
kernel; the KL fwd + bwd.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402
from kernels import dsa  # noqa: E402
from kernels.dsa_sets import selection_stats, structured_indices  # noqa: E402

HQ, HKV, D, K, HI, DI = 32, 4, 128, 2048, 16, 64
BUDGET = 4 << 30


def inputs(length: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    return (
        rnd(length, HQ, D),
        rnd(length, HKV, D),
        rnd(length, HKV, D),
        rnd(length, HI, DI).float(),
        rnd(length, HI).float(),
        rnd(length, DI).float(),
    )


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.isnan().any():
        return float("nan")
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def check_topk(length: int) -> dict:
    """The select kernel is exact on given scores; the Triton scores (tf32 dots) may move near-ties, so the
    end-to-end selection is reported as set overlap with the fp32 reference."""
    from kernels.dsa_reference import causal_mask, indexer_logits, select_topk, selection_positions
    from kernels.triton_dsa.indexer import select_rows

    _, _, _, iq, iw, ik = inputs(length, seed=3)
    r0, r1 = length - 256, length
    scores = indexer_logits(iq[r0:r1], iw[r0:r1], ik[:r1])
    want = selection_positions(select_topk(scores, causal_mask(0, r0, r1, iq.device), K), 0, K)
    out = torch.full((length, K), -7, dtype=torch.int32, device="cuda")
    select_rows(scores, out, 0, r0, K)
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    ref = dsa.indexer_topk(iq, iw, ik, cu, K, backend="torch", budget_bytes=BUDGET)
    got = dsa.indexer_topk(iq, iw, ik, cu, K, backend="triton", budget_bytes=BUDGET)
    both = torch.sort(torch.cat([ref, got], 1), 1).values  # each list holds distinct keys: a repeat is shared
    same = (both.diff(dim=1) == 0) & (both[:, 1:] >= 0)
    visible = torch.clamp(torch.arange(length, device="cuda") + 1, max=K)
    return {
        "select_exact_on_given_scores": bool(torch.equal(out[r0:r1], want)),
        "selection_overlap_vs_fp32_reference": float(same.sum() / visible.sum()),
    }


def check_kl(length: int) -> dict:
    """The sparse-stage indexer KL and its gradients (Triton: TF32 indexer dots) against the fp32 reference."""
    q, k, _, iq, iw, ik = inputs(length, seed=4)
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    indices = dsa.indexer_topk(iq, iw, ik, cu, K, backend="torch", budget_bytes=BUDGET)
    results = {}
    for backend, (aq, ak) in (("triton", (q, k)), ("torch", (q.float(), k.float()))):
        leaves = [x.clone().requires_grad_() for x in (iq, iw, ik)]
        kl = dsa.indexer_kl_loss(*leaves, aq, ak, cu, D**-0.5, indices=indices, backend=backend, budget_bytes=BUDGET)
        results[backend] = (kl.detach(), *torch.autograd.grad(kl, leaves))
    names = ("kl", "d_index_q", "d_index_w", "d_index_k")
    return {f"rel_err_{n}": rel(a, b) for n, a, b in zip(names, results["triton"], results["torch"])}


def torch_scores_topk(iq, iw, ik, cu):
    """The baseline: scores in torch (chunked as the reference) and torch.topk on each chunk."""
    from kernels.dsa_reference import causal_mask, indexer_logits, row_chunks

    for doc_start, r0, r1 in row_chunks(cu, 4 * 3, BUDGET):
        scores = indexer_logits(iq[r0:r1], iw[r0:r1], ik[doc_start:r1])
        scores.masked_fill_(~causal_mask(doc_start, r0, r1, iq.device), float("-inf"))
        torch.topk(scores, min(K, scores.shape[1]), dim=1)


def check(length: int) -> dict:
    q, k, v, iq, iw, ik = inputs(length, seed=1)
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    indices = dsa.indexer_topk(iq, iw, ik, cu, K, backend="torch", budget_bytes=BUDGET)
    scale = D**-0.5
    out = {}
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.float().requires_grad_() for x in (q, k, v)]
    runs = (("fused", leaves, "triton", {"backward": "fused"}), ("split", leaves, "triton", {"backward": "split"}))
    for name, xs, backend, options in (*runs, ("reference", ref_leaves, "torch", {})):
        o, lse = dsa.sparse_gqa_attention(*xs, indices, scale, backend=backend, budget_bytes=BUDGET, **options)
        up = torch.randn(o.shape, generator=torch.Generator(device="cuda").manual_seed(2), device="cuda")
        grads = torch.autograd.grad((o.float() * up).sum(), xs)
        out[name] = (o, lse, *grads)
    names = ("out", "lse", "dq", "dk", "dv")
    errors = {f"rel_err_{n}": rel(a, b) for n, a, b in zip(names, out["fused"], out["reference"])}
    split = zip(names[2:], out["split"][2:], out["reference"][2:])
    errors.update({f"rel_err_{n}_split": rel(a, b) for n, a, b in split})
    return errors


def timed(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def dense_step(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    qd = q.transpose(0, 1)[None].requires_grad_()
    kd = k.repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None].requires_grad_()
    vd = v.repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None].requires_grad_()

    def step():
        with sdpa_kernel(kind):
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        o.backward(torch.ones_like(o))

    return step


def dsa_step(q, k, v, iq, iw, ik, cu, parts: dict, sets=None, backward: str = "fused"):
    """One DSA layer's fwd + bwd. sets: the top-k sets the attention and the KL use instead of the indexer's own
    (structured sets); the indexer's scores and top-k still run, and count, on the same inputs."""
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    iqs, iws, iks = (x.clone().requires_grad_() for x in (iq, iw, ik))
    options = {"backward": backward} if parts["attention"] == "triton" else {}

    def step():
        indices = dsa.indexer_topk(
            iqs.detach(), iws.detach(), iks.detach(), cu, K, backend=parts["topk"], budget_bytes=BUDGET
        )
        if sets is not None:
            indices = sets.clone()  # a new tensor each step, like the indexer's: its union is built once per step
        o, lse = dsa.sparse_gqa_attention(
            qs, ks, vs, indices, D**-0.5, backend=parts["attention"], budget_bytes=BUDGET, **options
        )
        kl = dsa.indexer_kl_loss(
            iqs,
            iws,
            iks,
            qs.detach(),
            ks.detach(),
            cu,
            D**-0.5,
            indices=indices,
            attn_lse=lse,
            backend=parts["kl"],
            budget_bytes=BUDGET,
        )
        (o.float().sum() + kl).backward()

    return step


def part_times(q, k, v, iq, iw, ik, cu, indices, backward: str) -> dict:
    """Each part of the DSA step alone, on the sets the step uses."""
    from kernels.triton_dsa.indexer import indexer_scores
    from kernels.triton_dsa.indexer_kl import sparse_attention_target
    from kernels.triton_dsa.union import block_queries_for, block_union

    length = q.shape[0]
    rows = max(1, BUDGET // (4 * length))
    r0 = length - rows  # the last chunk of rows (the longest), scaled to all rows by area
    scores_ms = timed(lambda: indexer_scores(iq, iw, ik, 0, r0, length))
    area = (length * (length + 1) / 2) / (rows * (2 * length - rows + 1) / 2)
    bq = block_queries_for(indices, HQ // HKV)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))

    def attention_fwd_bwd():
        o, _ = dsa.sparse_gqa_attention(qs, ks, vs, indices, D**-0.5, backend="triton", backward=backward)
        o.float().sum().backward()

    _, lse = dsa.sparse_gqa_attention(q, k, v, indices, D**-0.5, backend="triton")
    fwd_ms = timed(lambda: dsa.sparse_gqa_attention(q, k, v, indices, D**-0.5, backend="triton"))
    iqs, iws, iks = (x.clone().requires_grad_() for x in (iq, iw, ik))
    target = sparse_attention_target(q, k, lse, indices, D**-0.5)

    def kl_fwd_bwd():
        from kernels.triton_dsa.indexer_kl import _TritonIndexerKL

        _TritonIndexerKL.apply(iqs, iws, iks, indices, target).backward()

    return {
        "indexer_scores_ms": scores_ms * area,
        "block_queries": bq,
        "union_ms": timed(lambda: block_union(indices, bq, 64)),
        "sparse_fwd_ms": fwd_ms,
        "sparse_fwd_tflops_useful": 4 * length * K * HQ * D / fwd_ms / 1e9,
        "sparse_fwd_bwd_ms": timed(attention_fwd_bwd),
        "kl_target_ms": timed(lambda: sparse_attention_target(q, k, lse, indices, D**-0.5)),
        "kl_fwd_bwd_ms": timed(kl_fwd_bwd),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--check-length", type=int, default=16384)
    parser.add_argument("--sets", nargs="+", default=["structured", "random"], choices=["structured", "random"])
    parser.add_argument("--backward", default="fused", choices=["fused", "split"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dsa_h200.json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    stamp = {**git_state(), "device": device, "date": datetime.datetime.now(datetime.UTC).isoformat()}
    parts = {"topk": "triton", "attention": "triton", "kl": "triton"}
    checks = {
        "L": args.check_length,
        **check(args.check_length),
        **check_topk(args.check_length),
        **check_kl(args.check_length),
    }
    print(
        "check (bf16 triton vs fp32 reference):",
        {k: f"{v:.2e}" if isinstance(v, float) else v for k, v in checks.items()},
    )
    rows = []
    for length in args.lengths:
        q, k, v, iq, iw, ik = inputs(length, seed=length)
        cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
        dense = {}
        for backend in ("cudnn", "flash"):
            step = dense_step(q, k, v, backend)
            dense[f"dense_{backend}_fwd_bwd_ms"] = timed(step)
            dense[f"dense_{backend}_peak_gib"] = peak_gib(step)
        dense["dense_fwd_bwd_ms"] = dense["dense_cudnn_fwd_bwd_ms"]
        own = dsa.indexer_topk(iq, iw, ik, cu, K, backend="triton", budget_bytes=BUDGET)
        topk_ms = timed(lambda: dsa.indexer_topk(iq, iw, ik, cu, K, backend=parts["topk"], budget_bytes=BUDGET))
        for kind in args.sets:
            indices = own if kind == "random" else structured_indices(length, K, device="cuda")
            row = {
                "L": length,
                "sets": kind,
                **selection_stats(indices),
                "k": K,
                "q_heads": HQ,
                "kv_heads": HKV,
                "head_dim": D,
                "indexer_heads": HI,
                "indexer_dim": DI,
                "dense_backend": "cudnn",
                "backends": parts,
                "backward": args.backward,
                **stamp,
                **dense,
            }
            step = dsa_step(q, k, v, iq, iw, ik, cu, parts, None if kind == "random" else indices, args.backward)
            row["dsa_fwd_bwd_ms"] = timed(step)
            row["dsa_peak_gib"] = peak_gib(step)
            row["speedup"] = row["dense_cudnn_fwd_bwd_ms"] / row["dsa_fwd_bwd_ms"]
            row["speedup_vs_flash"] = row["dense_flash_fwd_bwd_ms"] / row["dsa_fwd_bwd_ms"]
            row["indexer_topk_ms"] = topk_ms
            row.update(part_times(q, k, v, iq, iw, ik, cu, indices, args.backward))
            if kind == "random":
                row["torch_topk_ms"] = timed(lambda: torch_scores_topk(iq, iw, ik, cu))  # scores + torch.topk
            rows.append(row)
            print(
                f"L={length:>6} {kind:>10}  J {row['jaccard']:.2f} U16/k {row['union16_over_k']:.2f}  dense cudnn "
                f"{row['dense_cudnn_fwd_bwd_ms']:7.1f} ms  DSA {row['dsa_fwd_bwd_ms']:7.1f} ms  speedup "
                f"{row['speedup']:.2f}x  | topk {topk_ms:.1f} (scores {row['indexer_scores_ms']:.1f}) union "
                f"{row['union_ms']:.1f} fwd {row['sparse_fwd_ms']:.1f} ({row['sparse_fwd_tflops_useful']:.0f} TF/s) "
                f"fwd+bwd {row['sparse_fwd_bwd_ms']:.1f} kl target {row['kl_target_ms']:.1f} "
                f"kl {row['kl_fwd_bwd_ms']:.1f}"
                f"  peak dense/DSA {row['dense_cudnn_peak_gib']:.1f}/{row['dsa_peak_gib']:.1f} GiB",
                flush=True,
            )
            write_result(args.out, {"checks": checks, "rows": rows})  # after every row: a timeout keeps it
        del q, k, v, iq, iw, ik, own
        torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
