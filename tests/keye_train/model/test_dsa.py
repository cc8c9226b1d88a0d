"""The DSA layer in the model: indexer M-RoPE, the detach rule and the loss routing."""

import dataclasses

import pytest
import torch

from keye_train.config import ParallelConfig, tiny


def dsa_model(mode="sparse", **dsa):
    model = tiny()
    model.lm.moe_aux_loss_coeff = 0.0  # its gradient would reach the backbone from the router
    model.lm.dsa = dataclasses.replace(model.lm.dsa, mode=mode, **dsa)
    return model


def build_lm(model):
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    parts = build_model(model, ParallelConfig(), torch.float32, False, ColocatedPlacement())
    initialize_weights(parts, model, seed=11)
    return parts.lm


def layer_inputs(lm, total=96):
    from keye_train.model.attention import KeyePackedSeqParams

    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 40, total], dtype=torch.int32)
    pos = torch.cat([torch.arange(40), torch.arange(total - 40)]).expand(3, -1).clone()
    pos[1, 50:70] += torch.arange(20) % 5  # a picture's rows and columns
    pos[2, 50:70] += torch.arange(20) // 5
    params = KeyePackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=56, max_seqlen_kv=56, position_ids=pos
    )
    hidden = torch.randn(total, 1, lm.config.hidden_size, generator=g, requires_grad=True)
    return hidden, lm.rotary_pos_emb(pos[:, None, :], lm.mrope_section), params


def test_indexer_rope_is_the_lm_mrope_at_the_scaled_sections(single_rank):
    lm = build_lm(dsa_model())
    hidden, rotary, params = layer_inputs(lm)
    indexer = lm.decoder.layers[0].self_attention.core_attention.indexer
    assert indexer.section == [2, 3, 3]  # [4, 6, 6] scaled by D_I / head_dim = 16 / 32
    # D_I = head_dim / 2: indexer frequency i is the LM's frequency 2 i, on the same t/h/w axis
    lm_angles = rotary[:, 0, 0, : lm.config.kv_channels // 2]
    torch.testing.assert_close(indexer.rope_angles(params.position_ids), lm_angles[:, ::2], rtol=1e-6, atol=1e-5)


def run_layer(lm, coeff_scale=1.0, lm_grad=1.0):
    from keye_train.model.dsa import set_indexer_loss_scale

    layer = lm.decoder.layers[0]
    set_indexer_loss_scale(lm, coeff_scale)
    lm.zero_grad(set_to_none=True)
    hidden, rotary, params = layer_inputs(lm)
    out, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=params)
    (out * lm_grad).sum().backward()
    attention = layer.self_attention
    grads = {name: p.grad for name, p in attention.named_parameters()}
    return grads, hidden.grad, attention.core_attention.stats.pop()


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_the_lm_loss_never_reaches_the_indexer_and_the_kl_never_reaches_the_backbone(single_rank, mode):
    lm = build_lm(dsa_model(mode))
    grads, hidden_grad, _ = run_layer(lm, coeff_scale=0.0)  # LM gradient only
    indexer = {n: g for n, g in grads.items() if ".indexer." in n}
    assert indexer and all(g is None or not g.any() for g in indexer.values())
    assert grads["linear_qkv.weight"].abs().sum() > 0
    grads, hidden_grad, stats = run_layer(lm, coeff_scale=1.0, lm_grad=0.0)  # indexer loss only
    assert all(
        g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith("proj.weight") and ".indexer." in n
    )
    backbone = {n: g for n, g in grads.items() if ".indexer." not in n}
    assert all(g is None or not g.any() for g in backbone.values()) and not hidden_grad.any()
    assert stats["kl"] > 0 and 0 < stats["recall"] <= 1 + 1e-6


def test_sparse_with_k_at_least_the_document_equals_dense(single_rank):
    dense, sparse = build_lm(dsa_model("warmup")), build_lm(dsa_model("sparse", topk=64))
    hidden, rotary, params = layer_inputs(dense)
    with torch.no_grad():
        a, _ = dense.decoder.layers[0](
            hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=params
        )
        b, _ = sparse.decoder.layers[0](
            hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=params
        )
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32: SDPA vs the gathered softmax


def test_the_indexer_loss_gradient_is_scaled_by_lambda_over_microbatches(single_rank):
    lm = build_lm(dsa_model("sparse", loss_coeff=0.5))
    once, _, _ = run_layer(lm, coeff_scale=1.0, lm_grad=0.0)
    quarter, _, _ = run_layer(lm, coeff_scale=0.25, lm_grad=0.0)
    name = next(n for n in once if n.endswith("indexer.k_proj.weight"))
    torch.testing.assert_close(quarter[name], 0.25 * once[name])


def test_the_triton_backend_computes_the_same_layer(single_rank):
    pytest.importorskip("triton")
    runs = {}
    for backend in ("torch", "triton"):
        lm = build_lm(dsa_model("sparse", topk=8, backend=backend))
        runs[backend] = run_layer(lm)
    (grads_t, hidden_t, stats_t), (grads_r, hidden_r, stats_r) = runs["triton"], runs["torch"]
    torch.testing.assert_close(hidden_t, hidden_r, rtol=1e-4, atol=1e-6)
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-4, atol=1e-6, msg=name)
    assert stats_t["kl"] == pytest.approx(stats_r["kl"], rel=1e-5)


def test_the_selection_capture_hook_sees_the_sets_sparse_mode_attends_to(single_rank, monkeypatch):
    from benchmarks.dsa_selection_stats import SelectionCapture, document_sets
    from keye_train.model import dsa as model_dsa

    lm = build_lm(dsa_model("sparse", topk=8))
    attended = []
    sparse = model_dsa.dsa_ops.sparse_gqa_attention

    def recording(q, k, v, indices, *args, **kwargs):
        attended.append(indices.clone())
        return sparse(q, k, v, indices, *args, **kwargs)

    monkeypatch.setattr(model_dsa.dsa_ops, "sparse_gqa_attention", recording)
    hidden, rotary, params = layer_inputs(lm)
    capture = SelectionCapture([lm.decoder.layers[0].self_attention.core_attention], topk=8)
    capture.cu_seqlens = params.cu_seqlens_q
    with torch.no_grad():
        lm.decoder.layers[0](hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=params)
    capture.remove()
    assert len(attended) == 1 and torch.equal(capture.selections[0], attended[0])
    docs = document_sets(capture.selections[0], params.cu_seqlens_q)
    assert [d.shape[0] for d in docs] == [40, 56]
    for doc in docs:  # document-relative: row t holds min(k, t + 1) keys among 0..t
        rows = torch.arange(doc.shape[0])
        assert torch.equal((doc >= 0).sum(1), (rows + 1).clamp(max=8))
        assert bool(((doc <= rows[:, None]) | (doc < 0)).all())
