"""The decode experts' kernels (Triton under TRITON_INTERPRET=1 on CPU) against float64 torch: ragged groups with
empty experts, an expert with more rows than one pass, column and reduction tiles that do not divide the sizes,
rows gathered from and scattered to arbitrary token rows."""

import pytest
import torch

from kernels.moe_decode import rows_fc2, rows_fc2_reference, swiglu_fc1, swiglu_fc1_reference

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter


def routed(seed, tokens, experts, topk, hidden, features, hot=None):
    """Random routing sorted by expert, as sync_free_experts builds it (expert `hot` takes every token)."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)])
    if hot is not None:
        chosen[:, 0] = hot
        chosen[:, 1:] = torch.where(chosen[:, 1:] == hot, (hot + 1) % experts, chosen[:, 1:])
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ends = torch.bincount(flat, minlength=experts).cumsum(0).to(torch.int32)
    x = torch.randn(tokens, hidden, generator=g)
    fc1 = torch.randn(experts, 2 * features, hidden, generator=g) / hidden**0.5
    fc2 = torch.randn(experts, hidden, features, generator=g) / features**0.5
    scale = torch.rand(tokens * topk, generator=g)
    return tuple(t.to(DEVICE) for t in (x, fc1, fc2, ends, order, scale))


@pytest.mark.parametrize(
    "tokens,experts,topk,hidden,features,hot,configs",
    [
        (5, 16, 2, 48, 40, None, ["default", (16, 32, 4, 1)]),  # most experts empty; F % 16, K % 32 leave tails
        (24, 6, 3, 72, 24, 2, ["default", (16, 32, 4, 2)]),  # expert 2 holds 24 rows: two passes
    ],
)
def test_kernels_match_float64(tokens, experts, topk, hidden, features, hot, configs):
    x, fc1, fc2, ends, order, scale = routed(0, tokens, experts, topk, hidden, features, hot)
    source = order // topk
    act64 = swiglu_fc1_reference(x.double(), fc1.double(), ends, source, scale.double())
    out64 = rows_fc2_reference(act64, fc2.double(), ends, order, tokens * topk)
    sizes = ends.diff(prepend=ends.new_zeros(1))
    assert (sizes == 0).any() if tokens * topk < experts else sizes.max() > 16  # empty experts / two passes
    for config in configs:
        config = None if config == "default" else config
        act = swiglu_fc1(x, fc1, ends, source, scale, config=config)
        torch.testing.assert_close(act.double(), act64, rtol=1e-5, atol=1e-5)
        out = rows_fc2(act64.float(), fc2, ends, order, tokens * topk, config=config)
        torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
    x, fc1, _, ends, order, scale = routed(1, 4, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="do not fit"):
        swiglu_fc1(x[:, :8], fc1, ends, order // 2, scale)
    with pytest.raises(ValueError, match="unit stride"):
        swiglu_fc1(x.t().contiguous().t(), fc1, ends, order // 2, scale)
