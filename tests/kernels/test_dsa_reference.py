"""The torch DSA reference against float64 brute force that materialises everything with -inf masks."""

import math

import pytest
import torch

from kernels import dsa
from kernels.dense_attention import dense_varlen_attention
from kernels.dsa_reference import kl_and_logit_grad

F64 = torch.float64
CU = torch.tensor([0, 13, 30, 47], dtype=torch.int32)  # three packed documents


def visible(cu: torch.Tensor) -> torch.Tensor:
    """[T, T] bool: causal and same document."""
    total = int(cu[-1])
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    pos = torch.arange(total)
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])


def brute_logits(q, w, k):
    return torch.einsum("tj,tjs->ts", w, torch.relu(torch.einsum("tjd,sd->tjs", q, k))) / math.sqrt(q.shape[-1])


def brute_topk(scores, mask, topk):
    """Sort each row's visible keys by (score desc, position asc); pad with -1."""
    rows = []
    for t in range(scores.shape[0]):
        keys = [s for s in range(scores.shape[1]) if mask[t, s]]
        best = sorted(keys, key=lambda s: (-float(scores[t, s]), s))[:topk]
        rows.append(sorted(best) + [-1] * (topk - len(best)))
    return torch.tensor(rows, dtype=torch.int32)


def indexer_inputs(seed, total=47, heads=3, dim=8, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(total, heads, dim, generator=g, dtype=dtype),
        torch.randn(total, heads, generator=g, dtype=dtype),
        torch.randn(total, dim, generator=g, dtype=dtype),
    )


def attention_inputs(seed, total=47, heads=4, groups=2, dim=8, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(total, heads, dim, generator=g, dtype=dtype),
        torch.randn(total, groups, dim, generator=g, dtype=dtype),
        torch.randn(total, groups, dim, generator=g, dtype=dtype),
    )


def set_mask(indices, total):
    mask = torch.zeros(indices.shape[0], total, dtype=torch.bool)
    for t, row in enumerate(indices.tolist()):
        mask[t, [s for s in row if s >= 0]] = True
    return mask


def brute_attention(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    s = torch.einsum("thd,shd->hts", q, kk) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, -1), vv), torch.logsumexp(s, -1).T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_is_the_exact_causal_in_document_set(seed):
    q, w, k = indexer_inputs(seed)
    mask = visible(CU)
    got = dsa.indexer_topk(q, w, k, CU, topk=5)
    assert got.dtype == torch.int32 and got.shape == (47, 5)
    assert torch.equal(got, brute_topk(brute_logits(q, w, k), mask, 5))
    for t, row in enumerate(got.tolist()):  # every index causal and inside its own document
        assert all(mask[t, s] for s in row if s >= 0)


def test_short_rows_take_every_visible_key_padded_with_minus_one():
    q, w, k = indexer_inputs(3)
    got = dsa.indexer_topk(q, w, k, CU, topk=5)
    assert got[13].tolist() == [13, -1, -1, -1, -1]  # first token of document 2
    assert got[15].tolist() == [13, 14, 15, -1, -1]
    assert (got[17] >= 0).all()


def test_ties_go_to_the_lowest_positions():
    q, w, k = indexer_inputs(4)
    k = torch.ones_like(k)  # every key scores the same
    got = dsa.indexer_topk(q, w, k, CU, topk=5)
    assert got[40].tolist() == [30, 31, 32, 33, 34]
    k2 = indexer_inputs(5)[2]
    k2[31:36] = k2[30]  # a tie of six equal keys straddling the threshold
    assert torch.equal(dsa.indexer_topk(q, w, k2, CU, 5), brute_topk(brute_logits(q, w, k2), visible(CU), 5))


def test_chunking_gives_identical_indices_outputs_and_losses():
    q, w, k = indexer_inputs(6, dtype=torch.float32)
    aq, ak, av = attention_inputs(6, dtype=torch.float32)
    whole = dsa.indexer_topk(q, w, k, CU, 5, budget_bytes=1 << 30)
    chunked = dsa.indexer_topk(q, w, k, CU, 5, budget_bytes=1)  # one query row at a time
    assert torch.equal(whole, chunked)
    out_whole, lse_whole = dsa.sparse_gqa_attention(aq, ak, av, whole, 0.3, budget_bytes=1 << 30)
    out_chunk, lse_chunk = dsa.sparse_gqa_attention(aq, ak, av, whole, 0.3, budget_bytes=1)
    assert torch.equal(out_whole, out_chunk) and torch.equal(lse_whole, lse_chunk)
    for indices in (None, whole):
        a = dsa.indexer_kl_loss(q, w, k, aq, ak, CU, 0.3, indices=indices, budget_bytes=1 << 30)
        b = dsa.indexer_kl_loss(q, w, k, aq, ak, CU, 0.3, indices=indices, budget_bytes=1)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)  # the row sum is taken in chunk order


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_attention_matches_masked_dense_with_gradients(seed):
    q, k, v = (x.requires_grad_() for x in attention_inputs(seed))
    iq, iw, ik = indexer_inputs(seed + 10)
    indices = dsa.indexer_topk(iq, iw, ik, CU, topk=6)
    out, lse = dsa.sparse_gqa_attention(q, k, v, indices, 0.35)
    ref_out, ref_lse = brute_attention(q, k, v, set_mask(indices, 47), 0.35)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-12)
    up = torch.randn_like(out)
    grads = torch.autograd.grad((out * up).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * up).sum(), (q, k, v))
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_with_k_at_least_the_length_sparse_equals_dense():
    q, k, v = attention_inputs(7)
    iq, iw, ik = indexer_inputs(7)
    indices = dsa.indexer_topk(iq, iw, ik, CU, topk=47)
    out, _ = dsa.sparse_gqa_attention(q, k, v, indices, 0.35)
    torch.testing.assert_close(
        out, dense_varlen_attention(q, k, v, CU, causal=True, scale=0.35), rtol=1e-10, atol=1e-12
    )


def test_kl_gradient_in_the_logits_is_softmax_minus_target():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 9, generator=g, dtype=F64, requires_grad=True)
    valid = torch.rand(6, 9, generator=g) < 0.7
    valid[:, 0] = True
    target = torch.rand(6, 9, generator=g, dtype=F64) * valid
    target = target / target.sum(-1, keepdim=True)
    kl, grad = kl_and_logit_grad(logits, target, valid)
    independent = torch.softmax(logits.detach().masked_fill(~valid, -math.inf), -1) - target
    torch.testing.assert_close(grad, independent, rtol=1e-12, atol=1e-14)
    (autograd,) = torch.autograd.grad(kl.sum(), logits)
    torch.testing.assert_close(autograd, independent, rtol=1e-12, atol=1e-14)
    p, qd = target[valid], torch.softmax(logits.detach().masked_fill(~valid, -math.inf), -1)[valid]
    assert torch.isclose(kl.sum(), (torch.xlogy(p, p) - p * torch.log(qd)).sum())


def brute_kl(q, w, k, aq, ak, key_mask, scale):
    """Mean over rows of KL(head-summed normalised attention on key_mask || softmax(I) on key_mask)."""
    groups = aq.shape[1] // ak.shape[1]
    s = torch.einsum("thd,shd->hts", aq, ak.repeat_interleave(groups, dim=1)) * scale
    p = torch.softmax(s.masked_fill(~key_mask[None], -math.inf), -1).sum(0)
    p = p / p.sum(-1, keepdim=True)
    logq = torch.log_softmax(brute_logits(q, w, k).masked_fill(~key_mask, -math.inf), -1)
    return torch.where(key_mask, torch.xlogy(p, p) - p * logq, 0.0).sum() / q.shape[0]


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_kl_loss_and_gradients_match_brute_force(sparse):
    q, w, k = (x.requires_grad_() for x in indexer_inputs(9))
    aq, ak, _ = attention_inputs(9)
    indices = dsa.indexer_topk(q, w, k, CU, topk=6) if sparse else None
    key_mask = set_mask(indices, 47) if sparse else visible(CU)
    loss = dsa.indexer_kl_loss(q, w, k, aq, ak, CU, 0.35, indices=indices, budget_bytes=4096)
    ref = brute_kl(q, w, k, aq, ak, key_mask, 0.35)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(3.0 * loss, (q, w, k)), torch.autograd.grad(3.0 * ref, (q, w, k))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_an_unknown_backend_is_named():
    q, w, k = indexer_inputs(0)
    with pytest.raises(ValueError, match="'cuda_magic'"):
        dsa.indexer_topk(q, w, k, CU, 4, backend="cuda_magic")
