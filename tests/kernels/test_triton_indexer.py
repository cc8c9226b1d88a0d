"""The Triton indexer scores and exact top-k against the torch reference (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from kernels import dsa
from kernels.triton_dsa.indexer import indexer_scores, select_rows

pytest.importorskip("triton")


def case(seed, lengths, heads=2, dim=16):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return (
        torch.randn(total, heads, dim, generator=g),
        torch.randn(total, heads, generator=g),
        torch.randn(total, dim, generator=g),
        cu,
    )


@pytest.mark.parametrize(
    "lengths, heads, topk",
    [
        ([37, 5, 70], 2, 7),  # ragged, a document shorter than k, k odd
        ([90], 4, 16),
        ([3, 40, 25], 2, 33),  # k larger than some documents, not a power of two
    ],
)
def test_topk_equals_the_reference(lengths, heads, topk):
    iq, iw, ik, cu = case(len(lengths) + topk, lengths, heads)
    want = dsa.indexer_topk(iq, iw, ik, cu, topk, backend="torch")
    for budget in (1 << 30, 2000):  # whole documents, and chunks of a few rows
        got = dsa.indexer_topk(iq, iw, ik, cu, topk, backend="triton", budget_bytes=budget, select_block=32)
        assert torch.equal(got, want)


@pytest.mark.parametrize("key_tiles", [1, 2, 8])  # 64-key tiles: 1 and 2 split each row over programs
def test_scores_equal_the_reference_logits_on_the_causal_part(key_tiles):
    iq, iw, ik, cu = case(3, [200])
    from kernels.dsa_reference import causal_mask, indexer_logits

    got = indexer_scores(iq, iw, ik, 0, 10, 200, key_tiles=key_tiles)
    want = indexer_logits(iq[10:200], iw[10:200], ik[0:200])
    visible = causal_mask(0, 10, 200, iq.device)
    torch.testing.assert_close(got[visible], want[visible], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("digit_bits", [8, 11])  # 4 passes of 8 bits, or 11 + 11 + 10 (the last overlaps 1 bit)
def test_exact_selection_with_ties_and_low_contrast_rows(digit_bits):
    g = torch.Generator().manual_seed(4)
    span, topk = 3000, 100
    scores = torch.randint(0, 5, (4, span), generator=g).float()  # heavy ties at every threshold
    scores[1] = 1.0 + torch.arange(span) * 1e-7  # near-equal
    scores[2, :] = -2.5  # one value everywhere
    scores[3] = -torch.rand(span, generator=g)  # negative keys
    out = torch.full((4, topk), -7, dtype=torch.int32)
    select_rows(scores, out, doc_start=0, r0=0, topk=topk, digit_bits=digit_bits)  # row i sees i + 1 columns
    assert out[0].tolist()[:1] == [0] and (out[0, 1:] == -1).all()
    out = torch.full((span, topk), -7, dtype=torch.int32)
    select_rows(scores, out, doc_start=0, r0=span - 4, topk=topk, block=256, digit_bits=digit_bits)  # token span-4+i
    for i in range(4):
        visible = span - 3 + i
        order = sorted(range(visible), key=lambda s: (-float(scores[i, s]), s))[:topk]
        assert out[span - 4 + i].tolist() == sorted(order)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("first, rows", [(57, 1), (30, 13), (0, 64)])  # decode, a prefill chunk, everything
def test_cached_prefill_and_decode_rows_equal_the_full_selection(backend, first, rows):
    iq, iw, ik, cu = case(first + rows, [64])
    whole = dsa.indexer_topk(iq, iw, ik, cu, 9, backend="torch")
    end = first + rows
    got = dsa.indexer_topk_cached(
        iq[first:end], iw[first:end], ik[:end], first, 9, backend=backend, budget_bytes=1500
    )  # a few rows per chunk
    assert torch.equal(got, whole[first:end])
