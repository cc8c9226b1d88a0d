"""The LM with model.lm.loss_impl=chunked against today's megatron logits + vocab-parallel CE (fp32, one rank):
per-token losses, the gradients of the final hidden states and of the output layer, and every other LM
gradient; both against the head + CE in float64 on the same final hidden states. TP=2 is in
tests/parallel/test_layouts.py."""

import pytest
import torch

from keye_train.config import ParallelConfig, tiny
from tests.keye_train.model.lm_loss import lm_token_losses


def build(loss_impl, chunk=16):
    """chunk 16: 40 tokens in chunks of 16, 16, 8. (CPU BLAS sums a GEMM of fewer than 8 rows over the 151,936
    vocab rows less exactly: 4e-6 instead of 6e-7 relative in dhidden at 7 rows, the same for any caller.)"""
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    model = tiny()
    model.lm.loss_impl, model.lm.loss_chunk_tokens = loss_impl, chunk
    parts = build_model(model, ParallelConfig(), torch.float32, False, ColocatedPlacement())
    initialize_weights(parts, model, seed=21)
    return model, parts


def run(parts, model):
    """Per-token losses, d(loss . upstream) for the final hidden states (the head's input) and all LM weights."""
    from keye_train.model.builder import parameter_shards

    captured = {}

    def keep_output(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    hook = parts.lm.decoder.register_forward_hook(keep_output)
    tokens = torch.randint(0, model.lm.vocab_size, (1, 41), generator=torch.Generator().manual_seed(3))
    losses = lm_token_losses(parts.lm, tokens[:, :-1], tokens[:, 1:])
    hook.remove()
    upstream = torch.rand(losses.shape, generator=torch.Generator().manual_seed(4)) * (torch.arange(40) % 3 > 0)
    (losses * upstream).sum().backward()
    grads = {info.name: p.grad.clone() for p, info in parameter_shards(parts) if info.name.startswith("lm.")}
    hidden = captured["hidden"]
    return losses.detach(), hidden.detach(), hidden.grad, grads, tokens[0, 1:], upstream


def float64_head(hidden, weight, labels, upstream):
    leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    logits = leaves[0][:, 0] @ leaves[1].t()
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return (loss.detach(), *torch.autograd.grad((loss * upstream[0].double()).sum(), leaves))


def rel(got, want):
    return float((got.double() - want).norm() / want.norm())


@pytest.fixture(scope="module")
def runs(single_rank):
    out = {}
    for impl in ("megatron", "chunked"):
        model, parts = build(impl)
        out[impl] = (parts, *run(parts, model))
    return out


def test_chunked_head_matches_megatron_and_float64(runs):
    (parts_m, loss_m, hidden_m, dhidden_m, grads_m, labels, upstream) = runs["megatron"]
    (parts_c, loss_c, hidden_c, dhidden_c, grads_c, _, _) = runs["chunked"]
    assert parts_c.lm.loss_chunk_tokens == 16 and parts_m.lm.loss_chunk_tokens is None
    assert torch.equal(hidden_m, hidden_c)  # the same model up to the head
    weight = parts_m.lm.output_layer.weight
    want_loss, want_dhidden, want_dweight = float64_head(hidden_m, weight, labels, upstream)
    checks = {
        "loss": (loss_m[0], loss_c[0], want_loss),
        "d_hidden": (dhidden_m, dhidden_c, want_dhidden),
        "d_output_layer": (grads_m["lm.output_layer.weight"], grads_c["lm.output_layer.weight"], want_dweight),
    }
    for what, (megatron, chunked, want) in checks.items():
        err_m, err_c, between = rel(megatron, want), rel(chunked, want), rel(chunked, megatron.double())
        print(
            f"{what}: megatron vs float64 {err_m:.1e}, chunked vs float64 {err_c:.1e}, chunked vs megatron "
            f"{between:.1e}"
        )
        assert err_c <= max(2 * err_m, 1e-6) and between < 1e-6, (what, err_m, err_c, between)


def test_every_lm_gradient_matches_megatrons_loss(runs):
    grads_m, grads_c = runs["megatron"][4], runs["chunked"][4]
    assert grads_c.keys() == grads_m.keys()
    errors = {name: rel(grads_c[name], want.double()) for name, want in grads_m.items() if want.norm() > 0}
    worst = max(errors, key=errors.get)
    print(f"{len(errors)} LM gradients, worst relative L2 diff {errors[worst]:.1e} ({worst})")
    assert errors[worst] < 1e-5, (worst, errors[worst])
