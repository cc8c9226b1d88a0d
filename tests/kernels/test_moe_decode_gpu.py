"""The decode experts' kernels on CUDA at the 30B model's sizes (128 experts, hidden 2048, expert FFN 768,
top-8, 64 and 128 tokens, bf16) against float64 torch: no further from it than torch's grouped-GEMM path, which
rounds fc1's output to bf16 before the SwiGLU."""

import pytest
import torch

from kernels.grouped_matmul import grouped_matmul_by_offsets
from kernels.moe_decode import rows_fc2, rows_fc2_reference, swiglu_fc1, swiglu_fc1_reference

if not torch.cuda.is_available():
    pytest.skip(
        "needs a CUDA GPU (the CPU tests run the same kernels under TRITON_INTERPRET=1)", allow_module_level=True
    )


def torch_path(x, fc1, fc2, ends, order, scale, topk):
    gate, up = grouped_matmul_by_offsets(x[order // topk], fc1, ends).chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up * scale[:, None]).to(x.dtype)
    out = grouped_matmul_by_offsets(act, fc2, ends)
    combined = torch.empty_like(out)
    combined[order] = out
    return combined


@pytest.mark.parametrize("tokens", [64, 128])
def test_decode_experts_at_full_size(tokens):
    experts, topk, hidden, features = 128, 8, 2048, 768
    g = torch.Generator("cuda").manual_seed(tokens)
    chosen = torch.rand(tokens, experts, generator=g, device="cuda").topk(topk, dim=1).indices
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.bincount(flat, minlength=experts).cumsum(0).to(torch.int32)
    x = torch.randn(tokens, hidden, generator=g, device="cuda").bfloat16()
    fc1 = (torch.randn(experts, 2 * features, hidden, generator=g, device="cuda") / hidden**0.5).bfloat16()
    fc2 = (torch.randn(experts, hidden, features, generator=g, device="cuda") / features**0.5).bfloat16()
    scale = torch.rand(tokens * topk, generator=g, device="cuda")[order]
    act64 = swiglu_fc1_reference(x.double(), fc1.double(), ends, order // topk, scale.double())
    out64 = rows_fc2_reference(act64, fc2.double(), ends, order, tokens * topk)
    act = swiglu_fc1(x, fc1, ends, order // topk, scale)
    ours = rows_fc2(act, fc2, ends, order, tokens * topk)
    theirs = torch_path(x, fc1, fc2, ends, order, scale, topk)

    def error(out):
        return float((out.double() - out64).norm() / out64.norm())

    assert error(ours) < 1e-2 and error(ours) <= 1.05 * error(theirs), (error(ours), error(theirs))
    act_error = float((act.double() - act64).norm() / act64.norm())
    assert act_error < 5e-3, act_error
