"""The guard in front of the CUDA fast path of dense varlen attention, exercised on the CPU with stand-ins for
torch's varlen kernel: a faithful one is used, a wrong or failing one is refused with a warning and the
per-document loop computes the result."""

import pytest
import torch

from kernels import dense_attention
from kernels.dense_attention import dense_varlen_attention, dense_varlen_attention_loop


def faithful(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    return dense_varlen_attention_loop(q, k, v, cu_q, causal=window_size == (-1, 0), scale=scale)


def never_causal(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    return dense_varlen_attention_loop(q, k, v, cu_q, causal=False, scale=scale)


def failing(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")


@pytest.fixture
def stand_in(monkeypatch):
    calls = []

    def install(kernel):
        def counted(*args, **kwargs):
            calls.append(kwargs)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(dense_attention, "_varlen_attn", counted)
        monkeypatch.setattr(dense_attention, "_VARLEN_ARGS", {"return_aux", "scale", "window_size"})
        monkeypatch.setattr(dense_attention, "flash_varlen_available", lambda q: True)
        monkeypatch.setattr(dense_attention, "_VERIFIED", {})
        return calls

    return install


def packed(seed=1):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 9, 40, 41, 100], dtype=torch.int32)
    return [torch.randn(100, h, 16, generator=g) for h in (8, 2, 2)], cu


@pytest.mark.parametrize(
    "kernel, used",
    [(faithful, True), (never_causal, False), (failing, False)],
    ids=["faithful", "wrong_mask", "raises"],
)
def test_the_fast_path_is_used_only_after_it_matches_the_loop(stand_in, kernel, used):
    calls = stand_in(kernel)
    (q, k, v), cu = packed()
    want = dense_varlen_attention_loop(q, k, v, cu, causal=True, scale=0.3)
    if used:
        got = dense_varlen_attention(q, k, v, cu, causal=True, scale=0.3, max_seqlen=59)
    else:
        with pytest.warns(UserWarning, match="using one SDPA call per document"):
            got = dense_varlen_attention(q, k, v, cu, causal=True, scale=0.3, max_seqlen=59)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(calls) == (2 if used else 1)  # the self-check, then (if it passed) the real call
    if used:
        assert calls[-1] == {"window_size": (-1, 0), "scale": 0.3}
    dense_varlen_attention(q, k, v, cu, causal=True, scale=0.3)  # the verdict is kept: no second self-check
    assert len(calls) == (3 if used else 1)
