"""Dense varlen attention reference (torch SDPA), the baseline every attention kernel is checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention confined to documents of a packed sequence.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq % Hkv == 0 (GQA); cu_seqlens: [N + 1] int offsets, last == T.
    Returns [T, Hq, D]. Tokens never attend across document boundaries.
    """
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1)
    return out
