"""The Triton sparse-stage KL target and indexer KL against the torch reference (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from kernels import dsa
from kernels.dsa_reference import attention_target

pytest.importorskip("triton")

from kernels.triton_dsa.indexer_kl import sparse_attention_target  # noqa: E402


def case(seed, lengths, heads=4, groups=2, dim=16, index_heads=2, topk=7):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    iq, iw, ik = (
        torch.randn(total, index_heads, 16, generator=g),
        torch.randn(total, index_heads, generator=g),
        torch.randn(total, 16, generator=g),
    )
    q, k = torch.randn(total, heads, dim, generator=g), torch.randn(total, groups, dim, generator=g)
    indices = dsa.indexer_topk(iq, iw, ik, cu, topk, backend="torch")
    return iq, iw, ik, q, k, cu, indices


@pytest.mark.parametrize("lengths, topk", [([21, 4, 30], 7), ([45], 12)])
def test_target_from_the_attention_lse_is_the_head_summed_softmax_on_the_set(lengths, topk):
    iq, iw, ik, q, k, cu, indices = case(topk, lengths, topk=topk)
    _, lse = dsa.sparse_gqa_attention(q, k, k, indices, 0.3, backend="torch")
    got = sparse_attention_target(q, k, lse, indices, 0.3)
    want = attention_target(q, k, 0, 0, q.shape[0], indices, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lengths, topk, index_heads", [([21, 4, 30], 7, 2), ([40], 20, 4)])
def test_sparse_kl_loss_and_gradients_match_the_reference(lengths, topk, index_heads):
    iq, iw, ik, q, k, cu, indices = case(index_heads + topk, lengths, index_heads=index_heads, topk=topk)
    mine = [x.clone().requires_grad_() for x in (iq, iw, ik)]
    ref = [x.clone().requires_grad_() for x in (iq, iw, ik)]
    _, lse = dsa.sparse_gqa_attention(q, k, k, indices, 0.3, backend="torch")
    got = dsa.indexer_kl_loss(*mine, q, k, cu, 0.3, indices=indices, attn_lse=lse, backend="triton")
    want = dsa.indexer_kl_loss(*ref, q, k, cu, 0.3, indices=indices, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for name, a, b in zip(("q", "w", "k"), torch.autograd.grad(2.0 * got, mine), torch.autograd.grad(2.0 * want, ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"d{name}")
