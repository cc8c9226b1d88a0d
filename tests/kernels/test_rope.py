"""The fused RoPE (Triton under TRITON_INTERPRET=1 on CPU) against megatron's unfused RoPE in float64: strided
q/k views, broadcast and per-batch angles, a pass-through tail, head dims whose half is not a power of two; the
backward against autograd through the float64 formula; and megatron routing apply_rope_fusion to it."""

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from kernels.rope import fused_rope, rope_reference

pytest.importorskip("triton")


def megatron_rope64(t, freqs):
    return rope_utils._apply_rotary_pos_emb_bshd(t.double(), freqs.double(), rotary_interleaved=False)


def case(seed, S, B, H, D, R, freq_batch=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(S, B, 3 * H, D, generator=g, dtype=dtype)
    t = qkv[:, :, H : 2 * H]  # a strided view, as megatron's split of the fused QKV output
    freqs = torch.randn(S, freq_batch, 1, R, generator=g) * 3
    return t, freqs


@pytest.mark.parametrize(
    "S,B,H,D,R,freq_batch",
    [(7, 1, 3, 72, 72, 1), (5, 2, 4, 16, 16, 2), (6, 2, 2, 24, 16, 1), (3, 1, 17, 8, 8, 1)],
)
def test_forward_matches_megatron_unfused_in_float64(S, B, H, D, R, freq_batch):
    t, freqs = case(0, S, B, H, D, R, freq_batch)
    expected = megatron_rope64(t, freqs)
    out = fused_rope(t, freqs)
    assert out.shape == t.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rope_reference(t, freqs).double(), expected, rtol=1e-6, atol=1e-6)


def test_backward_matches_autograd_of_the_float64_formula():
    t, freqs = case(1, 6, 2, 3, 40, 32)
    t = t.detach().requires_grad_()
    grad = torch.randn(t.shape, generator=torch.Generator().manual_seed(2))
    fused_rope(t, freqs).backward(grad)
    t64 = t.detach().double().requires_grad_()
    megatron_rope64(t64, freqs).backward(grad.double())
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-6, atol=1e-6)


def test_bfloat16_within_one_ulp_of_the_exact_value():
    t, freqs = case(3, 9, 1, 4, 64, 64, dtype=torch.bfloat16)
    exact = megatron_rope64(t, freqs)  # of the bf16 inputs, in float64
    error = (fused_rope(t, freqs).double() - exact).abs()
    # fp32 arithmetic, then one conversion to bf16: half an ulp when it rounds to nearest (the GPU, see
    # test_rope_gpu.py), one ulp under the interpreter, whose conversion rounds toward zero
    assert (error <= exact.abs() * 2**-7 + 1e-5).all()


def test_megatron_routes_apply_rope_fusion_to_it():
    from megatron.core.transformer import TransformerConfig

    from keye_train.model.megatron_compat import install_fused_rope

    install_fused_rope()
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, apply_rope_fusion=True)
    t, freqs = case(4, 5, 1, 2, 8, 8)
    routed = rope_utils.apply_rotary_pos_emb(t, freqs, config, cp_group=object())  # unused without cu_seqlens
    torch.testing.assert_close(routed.double(), megatron_rope64(t, freqs), rtol=1e-6, atol=1e-6)


def test_refuses_interleaved_and_bad_shapes():
    t, freqs = case(5, 4, 1, 2, 8, 8)
    with pytest.raises(ValueError, match="rotate-half"):
        fused_rope(t, freqs, interleaved=True)
    with pytest.raises(ValueError, match="freqs"):
        fused_rope(t, torch.zeros(4, 1, 1, 10))
