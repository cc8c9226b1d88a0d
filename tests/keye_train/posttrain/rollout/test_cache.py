"""The KV cache's attention against a brute-force float64 softmax: decode rows batched over a slot range with idle
slots inside it or gathered, prompt chunks over a cached prefix, padding rows; fork copies a slot's history."""

import math

import pytest
import torch

from keye_train.posttrain.rollout.cache import PAD_SLOT, KVCache

HQ, HKV, D = 4, 2, 8


def filled_cache(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache([3], slots=len(lengths), capacity=16, kv_heads=HKV, head_dim=D, dtype=torch.float64, device="cpu")
    cache.k[3].copy_(torch.randn(cache.k[3].shape, generator=g, dtype=torch.float64))
    cache.v[3].copy_(torch.randn(cache.v[3].shape, generator=g, dtype=torch.float64))
    cache.lengths = list(lengths)
    return cache


def brute_force(cache_k, cache_v, lengths, slots, counts, q, k, v, scale):
    out, offset = torch.zeros_like(q), 0
    for slot, count in zip(slots, counts):
        if slot != PAD_SLOT:
            start = lengths[slot]
            keys = torch.cat([cache_k[slot, :start], k[offset : offset + count]])
            values = torch.cat([cache_v[slot, :start], v[offset : offset + count]])
            for j in range(count):
                for h in range(HQ):
                    kv = h // (HQ // HKV)
                    scores = [float(q[offset + j, h] @ keys[s, kv]) * scale for s in range(start + j + 1)]
                    top = max(scores)
                    weights = [math.exp(x - top) for x in scores]
                    total = sum(weights)
                    out[offset + j, h] = sum(w / total * values[s, kv] for s, w in enumerate(weights))
        offset += count
    return out


@pytest.mark.parametrize(
    "slots,counts",
    [
        ([0, 3, 5, PAD_SLOT, 2], [1, 1, 1, 2, 4]),  # decode over slots 0..5 with idle 1 and 4, a chunk, padding
        ([0, 5], [1, 1]),  # a sparse range: gathered
        ([4, 1], [3, 1]),  # a chunk on an empty slot (causal from row 0) beside one decode row
    ],
)
def test_cached_attention_equals_a_brute_force_softmax(slots, counts):
    lengths = [5, 2, 7, 3, 0, 9]
    cache = filled_cache(lengths)
    before_k, before_v = cache.k[3].clone(), cache.v[3].clone()
    g = torch.Generator().manual_seed(1)
    total = sum(counts)
    q = torch.randn(total, HQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(total, HKV, D, generator=g, dtype=torch.float64) for _ in range(2))
    step = cache.step(slots, counts)
    out = step.attend(3, q[:, None], k[:, None], v[:, None], scale=0.3)
    expected = brute_force(before_k, before_v, lengths, slots, counts, q, k, v, 0.3)
    torch.testing.assert_close(out.view(total, HQ, D), expected, rtol=0, atol=1e-12)
    cache.commit(step)
    offset = 0
    for slot, count in zip(slots, counts):
        if slot != PAD_SLOT:
            assert cache.lengths[slot] == lengths[slot] + count
            assert torch.equal(cache.k[3][slot, lengths[slot] : lengths[slot] + count], k[offset : offset + count])
            assert torch.equal(cache.k[3][slot, : lengths[slot]], before_k[slot, : lengths[slot]])
        offset += count
    untouched = [s for s in range(6) if s not in slots]
    assert [cache.lengths[s] for s in untouched] == [lengths[s] for s in untouched]


def test_fork_copies_the_history_and_the_length():
    cache = filled_cache([0, 6, 0, 0])
    cache.fork(1, [0, 3])
    assert cache.lengths == [6, 6, 0, 6]
    for slot in (0, 3):
        assert torch.equal(cache.k[3][slot, :6], cache.k[3][1, :6]) and torch.equal(
            cache.v[3][slot, :6], cache.v[3][1, :6]
        )


def test_a_step_past_the_capacity_names_the_key():
    cache = filled_cache([15, 0])
    with pytest.raises(ValueError, match="rollout.capacity=16"):
        cache.step([0], [2])


def test_grouped_decode_attention_equals_sdpa_on_strided_cache_views():
    """The CUDA fallback (per-KV-head matmuls) on the cache's own strided views, against SDPA, float64."""
    from keye_train.posttrain.rollout.cache import grouped_decode_attention

    g = torch.Generator().manual_seed(3)
    table_k, table_v = (torch.randn(5, 12, HKV, D, generator=g, dtype=torch.float64) for _ in range(2))
    ks, vs = (t[1:4, :9].transpose(1, 2) for t in (table_k, table_v))  # [3, Hkv, 9, D], not contiguous
    q = torch.randn(3, HQ, 1, D, generator=g, dtype=torch.float64)
    mask = (torch.arange(9)[None, :] <= torch.tensor([8, 0, 4])[:, None])[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, scale=0.4, enable_gqa=True)
    torch.testing.assert_close(grouped_decode_attention(q, ks, vs, mask, 0.4), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("budget", [1 << 30, 4 * 2 * 12 * 3])  # one block, or blocks of 3 query rows
def test_chunk_attention_over_a_cached_prefix_equals_masked_sdpa(budget):
    from keye_train.posttrain.rollout.cache import chunk_attention

    g = torch.Generator().manual_seed(4)
    start, count = 5, 7
    table = [torch.randn(16, HKV, D, generator=g, dtype=torch.float64) for _ in range(2)]
    keys, values = (t[: start + count] for t in table)
    q = torch.randn(count, HQ, D, generator=g, dtype=torch.float64)
    mask = torch.arange(start + count)[None, :] <= torch.arange(start, start + count)[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys.transpose(0, 1)[None],
        values.transpose(0, 1)[None],
        attn_mask=mask,
        scale=0.3,
        enable_gqa=True,
    )[0].transpose(0, 1)
    got = chunk_attention(q, keys, values, start, 0.3, budget=budget)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
