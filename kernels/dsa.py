"""DeepSeek Sparse Attention on GQA: the functional API the model calls, one implementation per backend.

Backends: "torch" (kernels.dsa_reference, exact and chunked, any device) and "triton" (kernels/triton_dsa, GPU;
registered by the kernels issue). `backend="auto"` takes triton on CUDA tensors when it is registered.

Packed-sequence convention (T tokens, N documents):
    cu_seqlens   [N + 1] int32, cu_seqlens[0] == 0, cu_seqlens[-1] == T; a query never sees another document
    index_q      [T, H_I, D_I] float  indexer queries (after RMSNorm and M-RoPE)
    index_w      [T, H_I]      float  indexer head gates
    index_k      [T, D_I]      float  the one shared indexer key per token (after LayerNorm and M-RoPE)
    indices      [T, topk]     int32  selected key positions in the packed sequence, ascending, -1 padded;
                                      row t holds min(topk, t - doc_start(t) + 1) valid entries
    q            [T, Hq, D]    float  attention queries; k, v [T, Hkv, D] with Hq % Hkv == 0 (GQA)
    out          [T, Hq, D]    q.dtype;  lse [T, Hq] fp32, natural log (float64 for float64 inputs)
Scores are I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]) * D_I^-1/2, accumulated in fp32. Ties in top-k go
to the lowest key position, so selections are identical on every run and rank.
"""

from __future__ import annotations

from kernels import dsa_reference

BACKENDS: dict[str, object] = {"torch": dsa_reference}


def _register_triton() -> None:
    try:
        from kernels import triton_dsa as triton_backend
    except ImportError:  # no triton on this machine: the torch reference serves every call
        return
    BACKENDS["triton"] = triton_backend


def _backend(name: str, tensor):
    if "triton" not in BACKENDS and name in ("auto", "triton"):
        _register_triton()
    if name == "auto":
        name = "triton" if tensor.is_cuda and "triton" in BACKENDS else "torch"
    if name not in BACKENDS:
        raise ValueError(f"DSA backend {name!r} is not available here; have {sorted(BACKENDS)} (or 'auto')")
    return BACKENDS[name]


def indexer_topk(index_q, index_w, index_k, cu_seqlens, topk: int, backend: str = "auto", **options):
    """-> indices [T, topk] int32 (see the module docstring)."""
    return _backend(backend, index_q).indexer_topk(index_q, index_w, index_k, cu_seqlens, topk, **options)


def indexer_topk_cached(index_q, index_w, index_k, first_position: int, topk: int, backend: str = "auto", **options):
    """Chunked prefill and decode over a cached key history (one sequence): index_q [n, H_I, D_I] and index_w
    [n, H_I] for positions first_position .. first_position + n - 1, index_k [>= first_position + n, D_I].
    -> [n, topk] int32, the same rows `indexer_topk` gives those positions. Chunks follow free memory unless
    `budget_bytes` is given."""
    return _backend(backend, index_q).indexer_topk_cached(index_q, index_w, index_k, first_position, topk, **options)


def sparse_gqa_attention(q, k, v, indices, softmax_scale: float, backend: str = "auto", **options):
    """-> (out [T, Hq, D], lse [T, Hq]); every KV group attends with its own softmax over the shared set."""
    return _backend(backend, q).sparse_gqa_attention(q, k, v, indices, softmax_scale, **options)


def indexer_kl_loss(
    index_q,
    index_w,
    index_k,
    attn_q,
    attn_k,
    cu_seqlens,
    softmax_scale: float,
    indices=None,
    tp_group=None,
    attn_lse=None,
    backend: str = "auto",
    **options,
):
    """-> scalar: mean over tokens t of KL(p_t || softmax(I_t)).

    p_t is the dense attention of (attn_q, attn_k) summed over all heads (all-reduced over `tp_group` when the
    heads are split) and L1-normalised, over every causal in-document key (warm-up, indices=None) or over the
    selected set only, renormalised there (sparse stage). Gradients flow to index_q, index_w, index_k only.
    attn_lse [T, Hq]: the sparse attention's own LSE (sparse stage), which lets a backend skip recomputing it."""
    return _backend(backend, index_q).indexer_kl_loss(
        index_q,
        index_w,
        index_k,
        attn_q,
        attn_k,
        cu_seqlens,
        softmax_scale,
        indices=indices,
        tp_group=tp_group,
        attn_lse=attn_lse,
        **options,
    )
