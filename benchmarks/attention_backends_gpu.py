"""Dense packed attention on the GPU: cuDNN's ragged (THD) attention vs FlashAttention varlen (both through torch,
kernels/dense_attention.py), forward and forward+backward, on the LM's GQA layout (32 / 4 heads, d 128, causal)
and the ViT's per-frame layout (16 heads, d 72, bidirectional), over realistic document-length profiles.

    python3 benchmarks/attention_backends_gpu.py [--out benchmarks/results/attention_backends_h200.json]

FLOPs count the attention actually computed (sum of per-document s_i^2, halved when causal); forward + backward
is 3.5x the forward. Each row also gives the relative difference of the outputs and gradients from the flash
path on the same inputs (both bf16).
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402
from kernels import dense_attention  # noqa: E402
from kernels.dense_attention import dense_varlen_attention  # noqa: E402


def profile(name: str, total: int) -> list[int]:
    """Document lengths filling `total` tokens."""
    if name == "one_document":
        return [total]
    if name == "short_documents":
        return [2048] * (total // 2048)
    if name == "frames_1024":  # the ViT: one attention segment per frame of 32 x 32 patches
        return [1024] * (total // 1024)
    rng, lengths = random.Random(0), []  # "mixed": a Stage-1-like mix of captions, clips and long documents
    while sum(lengths) < total:
        lengths.append(min(int(rng.lognormvariate(7.8, 1.1)) + 64, total // 2, total - sum(lengths)))
    return lengths


def timed(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure(lengths: list[int], heads: int, kv_heads: int, dim: int, causal: bool) -> list[dict]:
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(total)
    q, k, v = (
        torch.randn(total, h, dim, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    )
    up = torch.randn(total, heads, dim, generator=g, device="cuda", dtype=torch.bfloat16)
    pairs = sum(s * s for s in lengths) / (2 if causal else 1)
    fwd_flops = 4 * pairs * heads * dim
    rows, reference = [], None
    for backend in ("flash", "cudnn"):

        def forward(backend=backend):
            return dense_varlen_attention(
                q, k, v, cu, causal=causal, scale=dim**-0.5, max_seqlen=max(lengths), backend=backend
            )

        def step(forward=forward):
            return torch.autograd.grad(forward(), (q, k, v), up)

        if not dense_attention._fast_path_verified(backend, q, k, causal):  # never time the loop fallback
            rows.append({"backend": backend, "error": "failed its self-check; not timed"})
            continue
        with torch.no_grad():
            fwd_ms = timed(forward)
        torch.cuda.reset_peak_memory_stats()
        out = forward()
        grads = torch.autograd.grad(out, (q, k, v), up)
        peak = torch.cuda.max_memory_allocated() / 2**30
        both_ms = timed(step)
        results = (out.detach(), *grads)
        reference = reference or results
        rows.append(
            {
                "backend": backend,
                "fwd_ms": fwd_ms,
                "fwd_bwd_ms": both_ms,
                "fwd_tflops": fwd_flops / fwd_ms / 1e9,
                "fwd_bwd_tflops": 3.5 * fwd_flops / both_ms / 1e9,
                "peak_gib": peak,
                "rel_diff_vs_flash": [rel(a, b) for a, b in zip(results, reference)],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "attention_backends_h200.json")
    args = parser.parse_args()
    cases = [("lm", 32 * 1024, name) for name in ("one_document", "mixed", "short_documents")]
    cases += [("lm", 64 * 1024, name) for name in ("one_document", "mixed")]
    cases += [("lm", 128 * 1024, "one_document"), ("vit", 128 * 1024, "frames_1024")]
    result = {
        "device": torch.cuda.get_device_name(),
        **git_state(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "rows": [],
    }
    print(
        f"{'layer':<5}{'tokens':>8}{'profile':>17}{'docs':>6}{'backend':>8}{'fwd ms':>9}{'f+b ms':>9}"
        f"{'f+b TF/s':>10}{'peak GiB':>10}  max rel diff vs flash"
    )
    for layer, total, name in cases:
        lengths = profile(name, total)
        heads, kv_heads, dim, causal = (32, 4, 128, True) if layer == "lm" else (16, 16, 72, False)
        for row in measure(lengths, heads, kv_heads, dim, causal):
            row.update(
                layer=layer,
                tokens=total,
                profile=name,
                documents=len(lengths),
                heads=heads,
                kv_heads=kv_heads,
                head_dim=dim,
                causal=causal,
            )
            result["rows"].append(row)
            if "error" in row:
                print(f"{layer:<5}{total:>8}{name:>17}{len(lengths):>6}{row['backend']:>8}  {row['error']}")
                continue
            print(
                f"{layer:<5}{total:>8}{name:>17}{len(lengths):>6}{row['backend']:>8}{row['fwd_ms']:>9.2f}"
                f"{row['fwd_bwd_ms']:>9.2f}{row['fwd_bwd_tflops']:>10.1f}{row['peak_gib']:>10.2f}  "
                f"{max(row['rel_diff_vs_flash']):.2e}"
            )
        write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
