"""The chunked LM head + cross-entropy on one rank against its unchunked definition in float64: per-token loss
and the gradients of hidden and weight, for chunk sizes that split the tokens unevenly, fit them in one chunk or
exceed them, with targets outside the vocabulary (no target logit) and an uneven upstream gradient."""

import pytest
import torch

from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

TOKENS, HIDDEN, VOCAB = 37, 48, 1000


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 0.3
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    target[4], target[9] = VOCAB + 5, -1  # ignore ids
    upstream = torch.rand(TOKENS, generator=g, dtype=torch.float64) * (torch.arange(TOKENS) % 5 != 0)  # mask x scale
    return hidden.to(dtype), weight.to(dtype), target, upstream


def loss_and_grads(fn, hidden, weight, target, upstream):
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss = fn(*leaves, target)
    return (loss.detach(), *torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), leaves))


def rel(got, want):
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("chunk", [5, TOKENS, 4096])
def test_chunked_head_and_ce_match_the_float64_definition(chunk):
    want = loss_and_grads(linear_cross_entropy_reference, *inputs(torch.float64))
    chunked = lambda h, w, t: linear_cross_entropy(h, w, t, chunk_tokens=chunk)  # noqa: E731
    exact = loss_and_grads(chunked, *inputs(torch.float64))
    fp32 = loss_and_grads(chunked, *inputs(torch.float32))
    fp32_unchunked = loss_and_grads(linear_cross_entropy_reference, *inputs(torch.float32))
    for what, a, b, c, ref in zip(("loss", "d_hidden", "d_weight"), exact, fp32, fp32_unchunked, want):
        assert exact[0].dtype == torch.float64 and b.dtype == torch.float32
        assert rel(a, ref) < 1e-13, (what, rel(a, ref))  # the same algebra in float64: only rounding
        # in fp32 about as accurate as the unchunked fp32 computation (full logits, autograd)
        assert rel(b, ref) <= max(2 * rel(c, ref), 1e-6), (what, rel(b, ref), rel(c, ref))
        print(
            f"chunk {chunk} {what}: float64 {rel(a, ref):.1e}, fp32 {rel(b, ref):.1e} "
            f"(unchunked fp32 {rel(c, ref):.1e})"
        )
    ignored = torch.tensor([4, 9])
    torch.testing.assert_close(
        fp32[0][ignored].double(), torch.logsumexp(inputs(torch.float64)[0][ignored] @ inputs(torch.float64)[1].t(), 1)
    )


def test_bad_arguments_are_refused():
    hidden, weight, target, _ = inputs(torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        linear_cross_entropy(hidden, weight, target, chunk_tokens=0)
    with pytest.raises(ValueError, match="one id per row"):
        linear_cross_entropy(hidden, weight, target[:-1])
