"""The CUDA grouped GEMM (torch's grouped_mm in bf16) against the per-group loop in float32: the kernel alone at
the full model's expert shapes, and GroupedExperts against megatron's SequentialMLP at the tiny model's, forward
and every gradient within the bf16 band; experts without tokens get exactly zero weight gradients."""

import pytest
import torch

from kernels.grouped_matmul import (
    group_alignment,
    grouped_matmul,
    grouped_matmul_by_offsets,
    grouped_matmul_loop,
    padded_counts,
    padded_rows,
    uses_grouped_kernel,
)

if not torch.cuda.is_available():
    pytest.skip(
        "needs a CUDA GPU (torch's grouped GEMM kernel is CUDA-only; the CPU tests cover the rest)",
        allow_module_level=True,
    )

BF16_BAND = 1e-2  # relative L2 error of bf16 operands against float32 (typically 1e-3 .. 1e-2); NaN fails


def rel(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


def swiglu_experts(x, probs, fc1, fc2, counts, matmul):
    gate, up = matmul(x, fc1, counts).chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up * probs[:, None]).to(x.dtype)
    return matmul(act, fc2, counts)


def test_grouped_mm_matches_the_fp32_loop_at_full_expert_shapes():
    experts, hidden, ffn = 16, 2048, 768
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.randint(0, 700, (experts,), generator=g, device="cuda").tolist()
    counts[3] = counts[11] = 0  # experts without tokens
    fc1 = torch.randn(experts, 2 * ffn, hidden, generator=g, device="cuda") * hidden**-0.5
    fc2 = torch.randn(experts, hidden, ffn, generator=g, device="cuda") * ffn**-0.5
    x = torch.randn(sum(counts), hidden, generator=g, device="cuda")
    probs = torch.rand(sum(counts), generator=g, device="cuda")
    upstream = torch.randn(sum(counts), hidden, generator=g, device="cuda")
    assert uses_grouped_kernel(x.bfloat16(), fc1.bfloat16()) and group_alignment(x.bfloat16(), fc1.bfloat16()) == 8

    results = {}
    for name, dtype in (("grouped_bf16", torch.bfloat16), ("loop_fp32", torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, probs, fc1, fc2)]
        xs, ps, w1, w2 = leaves
        if name == "grouped_bf16":  # padded the way GroupedExperts pads
            padded = padded_counts(counts, group_alignment(xs, w1))
            rows = padded_rows(counts, padded, xs.device)
            xp = xs.new_zeros(sum(padded), hidden).index_copy(0, rows, xs)
            pp = ps.new_zeros(sum(padded)).index_copy(0, rows, ps)
            out = swiglu_experts(xp, pp, w1, w2, padded, grouped_matmul).index_select(0, rows)
        else:
            out = swiglu_experts(xs, ps, w1, w2, counts, grouped_matmul_loop)
        grads = torch.autograd.grad((out.float() * upstream).sum(), leaves)
        results[name] = (out, *grads)
    for what, got, want in zip(("out", "dx", "dprobs", "dfc1", "dfc2"), results["grouped_bf16"], results["loop_fp32"]):
        err = rel(got, want)
        print(f"{what}: {err:.2e}")
        assert err < BF16_BAND, (what, err)
    for grad in results["grouped_bf16"][3:]:
        assert grad[3].abs().max() == 0 and grad[11].abs().max() == 0  # never uninitialised memory


def test_grouped_experts_match_sequential_mlp_on_the_gpu(single_rank):
    from keye_train.config import ParallelConfig, tiny
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    experts = {}
    for impl, dtype in (("grouped", torch.bfloat16), ("sequential", torch.float32)):
        model = tiny()
        model.lm.experts_impl = impl
        parts = build_model(model, ParallelConfig(), dtype, True, ColocatedPlacement())
        initialize_weights(parts, model, seed=5)
        experts[impl] = parts.lm.decoder.layers[0].mlp.experts
    grouped, sequential = experts["grouped"], experts["sequential"]
    with torch.no_grad():  # the fp32 loop runs the bf16 weights, so only the arithmetic differs
        for i, expert in enumerate(sequential.local_experts):
            expert.linear_fc1.weight.copy_(grouped.linear_fc1.weight[i])
            expert.linear_fc2.weight.copy_(grouped.linear_fc2.weight[i])
    counts = [37, 0, 130, 1, 64, 0, 9, 250]
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(sum(counts), 128, generator=g, device="cuda")
    probs = torch.rand(sum(counts), generator=g, device="cuda")
    upstream = torch.randn(sum(counts), 128, generator=g, device="cuda")
    assert uses_grouped_kernel(x.bfloat16(), grouped.linear_fc1.weight)

    results = {}
    for name, module, dtype in (("grouped", grouped, torch.bfloat16), ("sequential", sequential, torch.float32)):
        xs = x.to(dtype).requires_grad_()
        ps = probs.clone().requires_grad_()
        out, _ = module(xs, torch.tensor(counts), ps)
        (out.float() * upstream).sum().backward()
        if name == "grouped":
            weights = [module.linear_fc1.weight.grad, module.linear_fc2.weight.grad]
        else:
            weights = [
                torch.stack([e.linear_fc1.weight.grad for e in module.local_experts]),
                torch.stack([e.linear_fc2.weight.grad for e in module.local_experts]),
            ]
        results[name] = (out, xs.grad, ps.grad, *weights)
    for what, got, want in zip(("out", "dx", "dprobs", "dfc1", "dfc2"), results["grouped"], results["sequential"]):
        err = rel(got, want)
        print(f"{what}: {err:.2e}")
        assert err < BF16_BAND, (what, err)


def test_device_offsets_take_unaligned_and_empty_groups():
    """The decode graph's grouped GEMM: group ends on the device, groups of any size (1-7 rows, empty) unpadded,
    against the float32 loop at the full model's expert shapes."""
    experts, hidden, ffn = 128, 2048, 768
    g = torch.Generator(device="cuda").manual_seed(1)
    counts = torch.randint(0, 8, (experts,), generator=g, device="cuda")
    counts[::5] = 0
    x = torch.randn(int(counts.sum()), hidden, generator=g, device="cuda").bfloat16()
    fc1 = (torch.randn(experts, 2 * ffn, hidden, generator=g, device="cuda") / hidden**0.5).bfloat16()
    got = grouped_matmul_by_offsets(x, fc1, counts.cumsum(0).int())
    want = grouped_matmul_loop(x.float(), fc1.float(), counts.tolist())
    assert rel(got, want) < BF16_BAND
