"""Layout-invariant initialisation: every canonical tensor is drawn from its own seeded generator.

The same seed gives the same model under any TP/PP/EP/DP layout, which is what lets the parallel tests compare
layouts exactly and lets a run change layout between stages without a different starting point.
"""

from __future__ import annotations

import math
import zlib

import torch

from keye_train.model.sharding import ShardInfo

_SCALED = ("linear_proj.weight", "linear_fc2.weight")  # residual-branch outputs


def init_value(info: ShardInfo, seed: int, std: float, num_layers: int, device) -> torch.Tensor:
    name = info.name
    if name.endswith("norm.weight"):
        return torch.ones(info.full_shape, device=device)
    if name.endswith("bias"):
        return torch.zeros(info.full_shape, device=device)
    scale = std / math.sqrt(2.0 * num_layers) if name.endswith(_SCALED) else std
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(info.full_shape, generator=gen, device=device) * scale


@torch.no_grad()
def initialize(shards, seed: int, std: float, num_layers: int) -> None:
    for param, info in shards:
        full = init_value(info, seed, std, num_layers, param.device)
        param.copy_(info.cut(full).to(param.dtype))
