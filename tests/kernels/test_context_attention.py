"""Segment attention (CP: each rank's query chunks against their documents' keys) computes, row for row, what
per-document causal attention over the whole padded sequence computes; the dK/dV of all ranks add up to it."""

import pytest
import torch

from data_pipeline.context_parallel import context_shard
from kernels.context_attention import segment_attention, segment_attention_loop
from kernels.dense_attention import dense_varlen_attention_loop


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_segments_equal_full_causal_attention(cp):
    lengths = [2 * cp * n for n in (1, 5, 2, 9)]  # padded documents; the first one: a single row per chunk
    total = sum(lengths)
    g = torch.Generator().manual_seed(cp)
    q = torch.randn(total, 8, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(total, 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(total, 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(total, 8, 16, generator=g, dtype=torch.float64)
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    full = dense_varlen_attention_loop(q, k, v, cu, causal=True, scale=0.3)
    expected = torch.autograd.grad((full * up).sum(), (q, k, v))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for r in range(cp):
        shard = context_shard(lengths, cp, r)
        rows = shard.rows
        qs = q.detach()[rows].requires_grad_()
        out = segment_attention_loop(qs, k, v, shard.q_lengths, shard.k_starts, shard.k_lengths, scale=0.3)
        torch.testing.assert_close(out, full.detach()[rows], rtol=1e-12, atol=1e-12)
        assert torch.equal(segment_attention(qs, k, v, shard.q_lengths, shard.k_starts, shard.k_lengths, 0.3), out)
        gq, gk, gv = torch.autograd.grad((out * up[rows]).sum(), (qs, k, v))
        dq[rows] += gq
        dk += gk
        dv += gv
    for got, want in zip((dq, dk, dv), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_segment_with_fewer_keys_than_queries_is_refused():
    q, k = torch.randn(4, 2, 8), torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="keys >= queries"):
        segment_attention_loop(q, k, k, [4], [0], [3])
