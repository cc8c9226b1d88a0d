"""The LM head + cross-entropy on one GPU, forward + backward in bf16, at 32K tokens x 151,936 vocab x 2048:
time and peak memory of megatron's path (full bf16 logits, then its vocab-parallel CE in fp32, as GPTModel does
with labels) against our chunked head + CE (model.lm.loss_impl=chunked) at several chunk sizes, and liger-kernel's
fused linear + CE as a third row when it is importable (an optional candidate, not a dependency).

    python3 benchmarks/lm_head_gpu.py [--tokens 32768] [--chunks 2048 4096 8192]

The loss is the training loss's form: sum over supervised tokens (a random 75 % of them) x a constant scale.
Liger computes its gradients inside the forward for a scalar loss, so it runs reduction="sum" with
ignore_index on the unsupervised tokens, which is the same quantity. Errors: relative L2 of the loss sum,
dhidden and dweight against a float64 reference computed chunk by chunk with torch.softmax. Peak memory is
above the inputs (hidden, weight, targets). FLOPs: 6 x tokens x hidden x vocab (the chunked path recomputes
the logits in backward: 8 x, not counted). Rows go to benchmarks/results/lm_head_h200.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402
from kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402

HIDDEN, VOCAB = 2048, 151936
DEVICE, DTYPE = "cuda", torch.bfloat16
SCALE = 1.0 / 8192  # like train_step's micro-batches x DP / supervised tokens


def timed_ms(fn, grads) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=100, rep=1000, grad_to_none=grads, return_mode="median"))


def inputs(tokens: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, generator=g, device=DEVICE).to(DTYPE).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g, device=DEVICE) * 0.02).to(DTYPE).requires_grad_()
    target = torch.randint(0, VOCAB, (tokens,), generator=g, device=DEVICE)
    mask = torch.rand(tokens, generator=g, device=DEVICE) < 0.75
    return hidden, weight, target, mask


def megatron_step(hidden, weight, target, mask):
    """ColumnParallelLinear's GEMM (bf16 logits) + megatron's vocab_parallel_cross_entropy, as GPTModel runs."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = hidden @ weight.t()
    loss = vocab_parallel_cross_entropy(logits[:, None, :], target[:, None])[:, 0]
    total = (loss * mask * SCALE).sum()
    total.backward()
    return total


def chunked_step(chunk: int):
    def step(hidden, weight, target, mask):
        total = (linear_cross_entropy(hidden, weight, target, chunk_tokens=chunk) * mask * SCALE).sum()
        total.backward()
        return total

    return step


def liger_step(hidden, weight, target, mask):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    ignored = torch.where(mask, target, torch.full_like(target, -100))
    out = liger_fused_linear_cross_entropy(hidden, weight, ignored, ignore_index=-100, reduction="sum")
    total = (out[0] if isinstance(out, tuple) else out) * SCALE  # some releases return (loss, z_loss)
    total.backward()
    return total


def float64_reference(hidden, weight, target, mask, chunk: int = 1024):
    """(loss sum, dhidden, dweight) in float64, one token chunk at a time (independent of our kernel)."""
    h64, w64 = hidden.detach().double(), weight.detach().double()
    total, dhidden, dweight = 0.0, torch.empty_like(h64), torch.zeros_like(w64)
    for start in range(0, h64.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = h64[rows] @ w64.t()
        scale = (mask[rows] * SCALE).double()
        total += float((torch.nn.functional.cross_entropy(logits, target[rows], reduction="none") * scale).sum())
        grad = torch.softmax(logits, dim=1)
        grad[torch.arange(grad.shape[0], device=grad.device), target[rows]] -= 1
        grad *= scale[:, None]
        dhidden[rows] = grad @ w64
        dweight += grad.t() @ h64[rows]
        del logits, grad
    return total, dhidden, dweight


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def measure(name: str, step, tensors, reference, flops: float) -> dict:
    hidden, weight = tensors[0], tensors[1]
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    total = step(*tensors)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    errors = {
        "rel_err_loss": abs(float(total.detach()) - reference[0]) / abs(reference[0]),
        "rel_err_d_hidden": rel(hidden.grad, reference[1]),
        "rel_err_d_weight": rel(weight.grad, reference[2]),
    }
    ms = timed_ms(lambda: step(*tensors), [hidden, weight])
    hidden.grad = weight.grad = None
    return {"impl": name, "ms": ms, "model_tflops": flops / ms / 1e9, "peak_gib_above_inputs": peak, **errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/lm_head_h200.json")
    args = parser.parse_args()

    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel()
    tensors = inputs(args.tokens)
    reference = float64_reference(*tensors)
    flops = 6 * args.tokens * HIDDEN * VOCAB
    steps = [("megatron", megatron_step)] + [(f"chunked_{c}", chunked_step(c)) for c in args.chunks]
    liger = importlib.util.find_spec("liger_kernel") is not None
    if liger:
        steps.append(("liger_fused_linear_ce", liger_step))
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        **git_state(),
        "date": datetime.date.today().isoformat(),
        "liger_kernel_importable": liger,
        "shape": {"tokens": args.tokens, "hidden": HIDDEN, "vocab": VOCAB, "dtype": "bf16", "tp": 1},
        "rows": [],
    }
    for name, step in steps:
        try:
            result["rows"].append(measure(name, step, tensors, reference, flops))
        except Exception as err:  # the optional liger row must not lose the others
            if name != "liger_fused_linear_ce":
                raise
            result["liger_error"] = f"{type(err).__name__}: {err}"
        write_result(args.out, result)
    base = result["rows"][0]
    for row in result["rows"]:
        row["speedup_vs_megatron"] = base["ms"] / row["ms"]
        row["memory_vs_megatron"] = row["peak_gib_above_inputs"] / base["peak_gib_above_inputs"]
    write_result(args.out, result)
    print(
        f"{'impl':24s} {'ms':>8s} {'TFLOP/s':>8s} {'x meg':>6s} {'peak GiB':>9s} {'err loss':>9s} "
        f"{'err dh':>8s} {'err dW':>8s}"
    )
    for row in result["rows"]:
        print(
            f"{row['impl']:24s} {row['ms']:8.2f} {row['model_tflops']:8.1f} {row['speedup_vs_megatron']:6.2f} "
            f"{row['peak_gib_above_inputs']:9.2f} {row['rel_err_loss']:9.1e} {row['rel_err_d_hidden']:8.1e} "
            f"{row['rel_err_d_weight']:8.1e}"
        )
    print(f"liger-kernel importable: {liger}; written to {args.out}")


if __name__ == "__main__":
    main()
