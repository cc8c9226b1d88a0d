"""The Triton sparse GQA attention against the torch reference (TRITON_INTERPRET=1 on CPU, tiny shapes):
ragged documents, documents shorter than k, k not a power of two, unions and masks per query block."""

import pytest
import torch

from kernels import dsa
from kernels.triton_dsa.union import block_union, choose_block

pytest.importorskip("triton")


def random_case(seed, lengths, heads, groups, dim, topk, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    q = torch.randn(total, heads, dim, generator=g, dtype=dtype)
    k = torch.randn(total, groups, dim, generator=g, dtype=dtype)
    v = torch.randn(total, groups, dim, generator=g, dtype=dtype)
    iq, iw, ik = (
        torch.randn(total, 2, 16, generator=g),
        torch.randn(total, 2, generator=g),
        torch.randn(total, 16, generator=g),
    )
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


def test_choose_block_takes_big_tiles_only_when_neighbours_share_keys():
    total, topk = 512, 16
    t = torch.arange(total)[:, None]
    recent = (t - topk + 1).clamp_min(0) + torch.arange(topk)[None, :]
    local = torch.where(recent <= t, recent, -1).to(torch.int32)
    spread = torch.stack(
        [
            torch.randperm(total, generator=torch.Generator().manual_seed(int(r)))[:topk].sort().values
            for r in range(total)
        ]
    ).to(torch.int32)  # unrelated sets (causality aside)
    assert choose_block(local, smallest=2, largest=16) == 16
    assert choose_block(spread, smallest=2, largest=16) == 2


def test_block_union_of_many_random_rows_matches_a_plain_rebuild():
    g = torch.Generator().manual_seed(5)
    rows = [torch.randperm(200, generator=g)[: int(n)].sort().values for n in torch.randint(0, 30, (37,), generator=g)]
    indices = torch.full((37, 30), -1, dtype=torch.int32)
    for r, keys in enumerate(rows):
        indices[r, : len(keys)] = keys.to(torch.int32)
    keys, bits, offsets = block_union(indices, block=5)
    for b in range(8):
        union = sorted({int(x) for r in range(b * 5, min(37, b * 5 + 5)) for x in rows[r]})
        assert keys[offsets[b] : offsets[b + 1]].tolist() == union
        for u in range(offsets[b], offsets[b + 1]):
            owners = [r - b * 5 for r in range(b * 5, min(37, b * 5 + 5)) if int(keys[u]) in rows[r].tolist()]
            assert int(bits[u]) == sum(1 << i for i in owners)


@pytest.mark.parametrize(
    "lengths, heads, groups, dim, topk",
    [
        ([23, 9, 31], 4, 2, 16, 7),  # ragged documents, one shorter than k, k odd
        ([40], 8, 2, 32, 12),  # 4 heads per group
        ([5, 3, 50], 2, 2, 16, 20),  # one head per group: 16 queries per tile
    ],
)
@pytest.mark.parametrize("block_queries", [None, 8])  # chosen from the overlap, or forced
@pytest.mark.parametrize("backward", ["fused", "split"])
def test_forward_and_backward_match_the_reference(lengths, heads, groups, dim, topk, block_queries, backward):
    q, k, v, indices = random_case(sum(lengths) + topk, lengths, heads, groups, dim, topk)
    scale = dim**-0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = dsa.sparse_gqa_attention(
        *leaves, indices, scale, backend="triton", block_keys=16, block_queries=block_queries, backward=backward
    )
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
        dsa.sparse_gqa_attention(
            q[..., :8].repeat(1, 1, 3),
            k[..., :8].repeat(1, 1, 3),
            v[..., :8].repeat(1, 1, 3),
            indices,
            0.2,
            backend="triton",
        )


def test_padded_unions_hold_the_same_keys_in_whole_chunks():
    g = torch.Generator().manual_seed(6)
    rows = [torch.randperm(90, generator=g)[:9].sort().values for _ in range(23)]
    indices = torch.stack(rows).to(torch.int32)  # distinct keys per row, ascending
    indices[3, 4:] = -1  # a short row
    keys, bits, offsets = block_union(indices, block=4)
    pkeys, pbits, poffsets = block_union(indices, block=4, align=8)
    assert torch.all(poffsets % 8 == 0)
    for b in range(offsets.shape[0] - 1):
        segment = slice(int(poffsets[b]), int(poffsets[b + 1]))
        real = pbits[segment] != 0  # padding belongs to no query
        assert pkeys[segment][real].tolist() == keys[offsets[b] : offsets[b + 1]].tolist()
        assert pbits[segment][real].tolist() == bits[offsets[b] : offsets[b + 1]].tolist()
        assert int(poffsets[b + 1] - poffsets[b]) == -(-int(offsets[b + 1] - offsets[b]) // 8) * 8


def test_the_shared_union_is_reused_only_for_the_same_unmodified_sets():
    from kernels.triton_dsa.union import shared_union

    indices = torch.tensor([[0, -1], [0, 1], [1, 2], [2, 3]], dtype=torch.int32)
    first = shared_union(indices, per_group=8)
    assert shared_union(indices, per_group=8) is first  # the attention and the KL of one layer share it
    copy = indices.clone()
    assert shared_union(copy, per_group=8) is not first and torch.equal(shared_union(copy, 8)[1][0], first[1][0])
    copy[3, 1] = -1  # modified in place: rebuilt
    rebuilt = shared_union(copy, per_group=8)
    assert 3 not in rebuilt[1][0][rebuilt[1][1] != 0].tolist()
