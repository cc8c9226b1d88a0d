"""model.fusion=auto on CUDA (our Triton RoPE in the ViT and the LM, megatron's compiled bias+GELU and
bias+residual) against model.fusion=off, in float32 with the same weights: the vision tower's output and every
parameter gradient."""

import dataclasses

import pytest
import torch

from keye_train.config import Fusion, ParallelConfig
from tests.keye_train.model.test_vision import VisualInput

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (model.fusion=auto only changes CUDA runs)", allow_module_level=True)


def build(model, fusion):
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    model = dataclasses.replace(model, fusion=fusion)
    parts = build_model(model, ParallelConfig(), torch.float32, True, ColocatedPlacement())
    initialize_weights(parts, model, seed=5)
    return parts


def test_fused_tower_matches_unfused(single_rank):
    grids = torch.tensor([[4, 6], [6, 4], [4, 6]])
    patches = torch.randn(int(grids.prod(1).sum()), 3 * 14 * 14, generator=torch.Generator().manual_seed(1))
    visual = VisualInput(patches.cuda(), grids)
    results = {}
    for fusion in (Fusion.auto, Fusion.off):
        tower = build(single_rank, fusion).vision
        out = tower(visual)
        out.backward(torch.ones_like(out))
        results[fusion] = (out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()})
    (fused, fused_grads), (plain, plain_grads) = results[Fusion.auto], results[Fusion.off]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
