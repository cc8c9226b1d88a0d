"""The fused RoPE on CUDA at the model's real sizes (the ViT's 2D RoPE over ~100K patches, the LM's M-RoPE over
a 32K pack), against megatron's unfused RoPE in float64: bf16 outputs rounded once (half an ulp) and gradients
within the same band."""

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from kernels.rope import fused_rope

if not torch.cuda.is_available():
    pytest.skip(
        "needs a CUDA GPU (the CPU tests run the same kernel under TRITON_INTERPRET=1)", allow_module_level=True
    )


@pytest.mark.parametrize("S,H,D", [(103_000, 16, 72), (32_768, 32, 128)], ids=["vit", "lm"])
def test_real_sizes_round_once(S, H, D):
    g = torch.Generator(device="cuda").manual_seed(S)
    qkv = torch.randn(S, 1, 3 * H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    t = qkv[:, :, :H].requires_grad_(False).clone().requires_grad_()
    half = torch.rand(S, 1, 1, D // 2, device="cuda", generator=g) * 300
    freqs = torch.cat([half, half], dim=-1)
    exact = rope_utils._apply_rotary_pos_emb_bshd(t.detach().double(), freqs.double())
    out = fused_rope(t, freqs)
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()
    grad = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    out.backward(grad)
    t64 = t.detach().double().requires_grad_()
    rope_utils._apply_rotary_pos_emb_bshd(t64, freqs.double()).backward(grad.double())
    assert ((t.grad.double() - t64.grad).abs() <= t64.grad.abs() * 2**-8 + 1e-5).all()
