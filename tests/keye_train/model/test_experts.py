"""Grouped-GEMM experts (model.lm.experts_impl=grouped) against megatron's SequentialMLP and a float64 loop: the
experts alone (forward and every gradient, with and without row padding), the whole LM's loss and gradients,
the shared canonical names and state-dict keys, and checkpoints written by one implementation loaded by the other."""

import pytest
import torch

from kernels.grouped_matmul import uses_grouped_kernel
from keye_train.config import ParallelConfig, tiny

COUNTS = [5, 0, 13, 1, 7, 0, 9, 3]  # tokens per local expert: empty and unaligned groups


def impl_model(impl):
    model = tiny()
    model.lm.experts_impl = impl
    return model


def build(impl, seed):
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    model = impl_model(impl)
    parts = build_model(model, ParallelConfig(), torch.float32, False, ColocatedPlacement())
    initialize_weights(parts, model, seed)
    return model, parts


def expert_weights(experts):
    """[(fc1, fc2)] per local expert, as tensors of the module (views for the grouped one)."""
    if hasattr(experts, "local_experts"):
        return [(e.linear_fc1.weight, e.linear_fc2.weight) for e in experts.local_experts]
    return list(zip(experts.linear_fc1.weight.unbind(0), experts.linear_fc2.weight.unbind(0)))


def expert_grads(experts):
    if hasattr(experts, "local_experts"):
        return [(e.linear_fc1.weight.grad, e.linear_fc2.weight.grad) for e in experts.local_experts]
    return list(zip(experts.linear_fc1.weight.grad.unbind(0), experts.linear_fc2.weight.grad.unbind(0)))


def float64_experts(hidden, probs, weights):
    """SwiGLU experts x router prob, one expert at a time, in float64."""
    out = []
    for rows, p, (fc1, fc2) in zip(hidden.split(COUNTS), probs.split(COUNTS), weights):
        gate, up = (rows @ fc1.t()).chunk(2, dim=-1)
        out.append((torch.nn.functional.silu(gate) * up * p[:, None]) @ fc2.t())
    return torch.cat(out)


def run_experts(experts, hidden, probs, upstream):
    hidden, probs = hidden.clone().requires_grad_(), probs.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out, bias = experts(hidden, torch.tensor(COUNTS), probs)
    assert bias is None
    (out * upstream).sum().backward()
    grads = [hidden.grad, probs.grad] + [g for pair in expert_grads(experts) for g in pair]
    return [out.detach()] + grads


def rel(got, want):
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("align", [None, 8], ids=["kernel_alignment", "padded_to_8"])
def test_grouped_experts_match_sequential_mlp_and_float64(single_rank, align):
    _, seq_parts = build("sequential", seed=5)
    _, grp_parts = build("grouped", seed=5)
    sequential, grouped = (p.lm.decoder.layers[1].mlp.experts for p in (seq_parts, grp_parts))
    grouped.group_align = align
    assert uses_grouped_kernel(torch.zeros(1, 128), grouped.linear_fc1.weight)  # torch's CPU grouped_mm, fp32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(sum(COUNTS), 128, generator=g)
    probs = torch.rand(sum(COUNTS), generator=g)
    upstream = torch.randn(sum(COUNTS), 128, generator=g)

    leaves = [hidden.double().requires_grad_(), probs.double().requires_grad_()]
    weights = [tuple(w.detach().double().requires_grad_() for w in pair) for pair in expert_weights(sequential)]
    reference = float64_experts(*leaves, weights)
    flat = [w for pair in weights for w in pair]
    want = [reference.detach(), *torch.autograd.grad((reference * upstream.double()).sum(), leaves + flat)]

    got_seq = run_experts(sequential, hidden, probs, upstream)
    got_grp = run_experts(grouped, hidden, probs, upstream)
    names = ["out", "d_hidden", "d_probs"] + [f"d_expert{i}_fc{k}" for i in range(len(COUNTS)) for k in (1, 2)]
    worst = {"sequential_vs_f64": 0.0, "grouped_vs_f64": 0.0, "grouped_vs_sequential": 0.0}
    for name, a, b, ref in zip(names, got_seq, got_grp, want):
        if ref.norm() == 0:  # an expert without tokens: its gradient is exactly zero in both
            assert a.abs().max() == 0 and b.abs().max() == 0, name
            continue
        errors = {
            "sequential_vs_f64": rel(a, ref),
            "grouped_vs_f64": rel(b, ref),
            "grouped_vs_sequential": rel(b, a.double()),
        }
        worst = {k: max(v, errors[k]) for k, v in worst.items()}
        assert all(err < 1e-6 for err in errors.values()), (name, errors)  # fp32: ~1e-7
    print(
        f"group_align={align}: worst relative L2 errors over out and all gradients: "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    )


def lm_loss_and_grads(parts, model):
    from keye_train.model.builder import parameter_shards
    from tests.keye_train.model.lm_loss import lm_token_losses

    tokens = torch.randint(0, model.lm.vocab_size, (1, 49), generator=torch.Generator().manual_seed(1))
    loss = lm_token_losses(parts.lm, tokens[:, :-1], tokens[:, 1:]).sum()
    loss.backward()
    return loss.detach(), {
        info.name: p.grad.clone()
        for p, info in parameter_shards(parts)
        if info.name.startswith("lm.") and p.grad is not None
    }


def test_the_lm_trains_alike_with_either_experts_impl(single_rank):
    """Same seed, same tokens: the loss and every LM gradient, by canonical name, agree to fp32 error."""
    losses, grads = {}, {}
    for impl in ("sequential", "grouped"):
        model, parts = build(impl, seed=9)
        losses[impl], grads[impl] = lm_loss_and_grads(parts, model)
    assert grads["grouped"].keys() == grads["sequential"].keys()
    assert sum(".experts.expert_" in name for name in grads["grouped"]) == 4 * 8 * 2
    loss_diff = abs(float(losses["grouped"] - losses["sequential"])) / abs(float(losses["sequential"]))
    assert loss_diff <= 1e-6, loss_diff
    errors = {name: rel(grads["grouped"][name], want.double()) for name, want in grads["sequential"].items()}
    worst = max(errors, key=errors.get)
    print(f"loss relative diff {loss_diff:.2e}; worst gradient relative L2 diff {errors[worst]:.2e} ({worst})")
    assert errors[worst] < 1e-5, (worst, errors[worst])


def test_both_impls_share_canonical_names_and_state_dict_keys(single_rank):
    from keye_train.model.builder import parameter_shards

    _, seq_parts = build("sequential", seed=2)
    _, grp_parts = build("grouped", seed=2)
    assert type(grp_parts.lm.decoder.layers[0].mlp.experts).__name__ == "GroupedExperts"
    seq_shards, grp_shards = list(parameter_shards(seq_parts)), list(parameter_shards(grp_parts))
    assert [i.name for _, i in seq_shards] == [i.name for _, i in grp_shards]
    for (a, info), (b, _) in zip(seq_shards, grp_shards):
        assert torch.equal(a, b), info.name  # the seeded init is the same tensor under either impl
    seq_state, grp_state = seq_parts.lm.state_dict(), grp_parts.lm.state_dict()
    assert list(seq_state) == list(grp_state)
    for key, value in seq_state.items():
        assert (value is None and grp_state[key] is None) or torch.equal(value, grp_state[key]), key
    # a state dict of one loads into the other with strict key checking
    _, other = build("grouped", seed=4)
    other.lm.load_state_dict(seq_state, strict=True)
    loaded = [
        (info.name, a, b)
        for (a, info), (b, _) in zip(seq_shards, parameter_shards(other))
        if info.name.startswith("lm.")
    ]
    assert all(torch.equal(a, b) for _, a, b in loaded) and any(".expert_7." in name for name, _, _ in loaded)


@pytest.mark.parametrize("written, loaded", [("grouped", "sequential"), ("sequential", "grouped")])
def test_a_checkpoint_of_one_impl_starts_the_other(single_rank, tmp_path, written, loaded):
    from keye_train import checkpoint
    from keye_train.model.builder import parameter_shards

    layout = {"tp": 1}
    _, source = build(written, seed=3)
    path = checkpoint.save(tmp_path, 1, source, None, {"step": 1}, layout, keep_last=1)
    _, target = build(loaded, seed=8)
    assert checkpoint.load_weights(str(path), target, layout) == []
    for (a, info), (b, _) in zip(parameter_shards(source), parameter_shards(target)):
        assert torch.equal(a, b), info.name
    with pytest.raises(RuntimeError, match=f"model.lm.experts_impl={written}"):
        checkpoint.load(path, target, None, layout)  # a resume needs the optimizer's per-parameter state


def test_auto_is_grouped_on_gpus_and_the_loop_on_cpus():
    from keye_train.config import resolve_experts_impl

    lm = tiny().lm
    assert resolve_experts_impl(lm, on_gpu=True) == "grouped"
    assert resolve_experts_impl(lm, on_gpu=False) == "sequential"
