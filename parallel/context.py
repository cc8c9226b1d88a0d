"""Context parallelism (parallel.cp): the CP group of this rank and the K/V all-gather with its gradient.

Each CP rank holds a slice of every packed sequence (data_pipeline/context_parallel.py says which rows). Attention
gathers keys and values over the group per layer (Llama-3-style all-gather CP: with GQA, K/V are small next to
Q), and the backward reduce-scatters their gradients back to the rank that owns each row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_GROUP = None  # megatron's CP group of this rank (None: no CP)
_ALONE = None  # a group of this rank only: tells megatron's M-RoPE that the position ids arrive already sliced


def setup(cp_group) -> None:
    """Collective over the world (creates the size-1 groups) when CP is on; called after megatron's groups exist."""
    global _GROUP, _ALONE
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        _GROUP = _ALONE = None
        return
    _GROUP = cp_group
    _ALONE, _ = dist.new_subgroups(group_size=1)


def teardown() -> None:
    global _GROUP, _ALONE
    _GROUP = _ALONE = None


def group():
    return _GROUP


def size() -> int:
    return 1 if _GROUP is None else dist.get_world_size(_GROUP)


def rank() -> int:
    return 0 if _GROUP is None else dist.get_rank(_GROUP)


def alone_group():
    """A process group of this rank alone (None without CP)."""
    return _ALONE


class _GatherRows(torch.autograd.Function):
    """[n, ...] local rows -> [cp * n, ...] every rank's rows, rank-major, then reordered by `order`
    (order[i] = the row of the rank-major buffer that goes to position i). Backward: the gradient back to rank-major
    order, reduce-scattered (summed) to the owning ranks."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, order: torch.Tensor, cp_group):
        ctx.cp_group, ctx.local_shape = cp_group, local.shape
        world = dist.get_world_size(cp_group)
        buffer = local.new_empty((world * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(buffer, local.contiguous(), group=cp_group)
        if order is None:
            ctx.inverse = None
            return buffer
        ctx.inverse = torch.empty_like(order)
        ctx.inverse[order] = torch.arange(order.numel(), device=order.device)
        return buffer.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous() if ctx.inverse is None else grad.index_select(0, ctx.inverse)
        local = grad.new_empty(ctx.local_shape)
        dist.reduce_scatter_tensor(local, grad.contiguous(), group=ctx.cp_group)
        return local, None, None


def gather_rows(local: torch.Tensor, order: torch.Tensor | None = None, cp_group=None) -> torch.Tensor:
    """Every CP rank's rows of `local` (equal row counts), in `order` of the rank-major concatenation if given.
    Differentiable: the gradient of each gathered row is summed over the group and lands on its owner."""
    cp_group = cp_group if cp_group is not None else _GROUP
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return local if order is None else local.index_select(0, order)
    return _GatherRows.apply(local, order, cp_group)
