"""The Triton sparse GQA attention against the torch reference (TRITON_INTERPRET=1 on CPU, tiny shapes):
ragged documents, documents shorter than k, k not a power of two, unions and masks per query block."""

import pytest
import torch

from kernels import dsa
from kernels.triton_dsa.union import block_union

pytest.importorskip("triton")


def random_case(seed, lengths, heads, groups, dim, topk, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    q = torch.randn(total, heads, dim, generator=g, dtype=dtype)
    k = torch.randn(total, groups, dim, generator=g, dtype=dtype)
    v = torch.randn(total, groups, dim, generator=g, dtype=dtype)
    iq, iw, ik = (torch.randn(total, 2, 16, generator=g), torch.randn(total, 2, generator=g),
                  torch.randn(total, 16, generator=g))
    indices = dsa.indexer_topk(iq, iw, ik, cu, topk, backend="torch")
    return q, k, v, indices


def test_block_union_lists_each_selected_key_once_with_its_queries():
    indices = torch.tensor([[0, -1, -1], [0, 1, -1], [1, 2, -1], [0, 2, 3], [4, -1, -1]], dtype=torch.int32)
    keys, bits, offsets = block_union(indices, block=2)
    assert offsets.tolist() == [0, 2, 6, 7]
    assert keys.tolist() == [0, 1, 0, 1, 2, 3, 4] and bits.tolist() == [3, 2, 2, 1, 3, 2, 1]
    for b in range(3):  # rebuild every row's set from the union
        for i in range(2):
            row = b * 2 + i
            if row < 5:
                mine = [int(keys[u]) for u in range(offsets[b], offsets[b + 1]) if bits[u] >> i & 1]
                assert mine == [s for s in indices[row].tolist() if s >= 0]


@pytest.mark.parametrize("lengths, heads, groups, dim, topk", [
    ([23, 9, 31], 4, 2, 16, 7),     # ragged documents, one shorter than k, k odd
    ([40], 8, 2, 32, 12),           # 4 heads per group
    ([5, 3, 50], 2, 2, 16, 20),     # one head per group: 16 queries per tile
])
def test_forward_and_backward_match_the_reference(lengths, heads, groups, dim, topk):
    q, k, v, indices = random_case(sum(lengths) + topk, lengths, heads, groups, dim, topk)
    scale = dim ** -0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = dsa.sparse_gqa_attention(*leaves, indices, scale, backend="triton", block_keys=16)
    ref_out, ref_lse = dsa.sparse_gqa_attention(*ref_leaves, indices, scale, backend="torch")
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    up = torch.randn_like(out)
    grads = torch.autograd.grad((out * up).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * up).sum(), ref_leaves)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert not got.isnan().any(), name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_a_bad_head_dim_is_rejected_with_its_value():
    q, k, v, indices = random_case(0, [10], 2, 1, 16, 4)
    with pytest.raises(ValueError, match="head dim 24"):
        dsa.sparse_gqa_attention(q[..., :8].repeat(1, 1, 3), k[..., :8].repeat(1, 1, 3), v[..., :8].repeat(1, 1, 3),
                                 indices, 0.2, backend="triton")
