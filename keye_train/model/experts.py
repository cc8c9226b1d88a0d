"""Grouped-GEMM MoE experts without Transformer Engine (model.lm.experts_impl=grouped).

megatron's TEGroupedMLP runs fc1 -> SwiGLU x router prob -> fc2 over all local experts at once, calling its fc1/fc2
spec slots as `linear(x, tokens_per_expert_list)`; in bf16 it needs no TE itself. Our linears fill those slots:
each holds one stacked weight [local experts, out, in] (this rank's expert-TP shard) and runs
`kernels.grouped_matmul`. `GroupedExperts` pads every expert's rows to the kernel's alignment once, around the
whole MLP (zero rows with router prob 0 contribute nothing), so the linears see aligned groups.

Compatibility with megatron's SequentialMLP (the per-expert loop, `local_experts.{i}.linear_fc{1,2}.weight`):
state dicts use the same keys and per-expert shapes (views into the stacked weight), so checkpoints load either
way; keye_train.model.sharding names each expert slice with the same canonical name.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import TEGroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import get_pg_size

from kernels import moe_decode
from kernels.grouped_matmul import (
    group_alignment,
    grouped_matmul,
    grouped_matmul_by_offsets,
    padded_counts,
    padded_rows,
)

_LINEARS = ("linear_fc1", "linear_fc2")


class _GroupedExpertLinear(torch.nn.Module):
    """One linear per local expert as a single [experts, out, in] weight; forward(x, counts) -> (out, None)."""

    partition_dim = 0  # of the stacked weight, split over expert TP: 1 (output rows) or 2 (input columns)

    def __init__(
        self,
        num_gemms: int,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method=None,
        bias: bool = False,
        skip_bias_add: bool = False,
        is_expert: bool = True,
        tp_comm_buffer_name=None,
        pg_collection=None,
    ):
        super().__init__()
        if bias:
            raise ValueError("grouped experts have no bias: megatron's add_bias_linear must be False")
        if not is_expert:
            raise ValueError("grouped linears serve MoE experts only")
        tp = get_pg_size(pg_collection.expt_tp) if pg_collection is not None else 1
        shape = [num_gemms, output_size, input_size]
        if shape[self.partition_dim] % tp:
            raise ValueError(f"expert size {shape[self.partition_dim]} is not divisible by expert TP {tp}")
        shape[self.partition_dim] //= tp
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.empty(shape, dtype=config.params_dtype, device=device))
        # As megatron marks SequentialMLP's expert linears: reduced over expert-DP only when EP > 1, and always
        # distinct per rank for the grad norm (weights come from keye_train.model.init).
        self.weight.allreduce = not config.expert_model_parallel_size > 1
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=self.partition_dim, stride=1)

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int]):
        return grouped_matmul(x, self.weight, tokens_per_expert), None

    def backward_dw(self) -> None:  # TEGroupedMLP's delayed-wgrad hook: gradients are not deferred here
        pass


class GroupedColumnLinear(_GroupedExpertLinear):
    """fc1: expert TP splits the output rows ([gate_r; up_r] per rank, as megatron's SwiGLU shards)."""

    partition_dim = 1


class GroupedRowLinear(_GroupedExpertLinear):
    """fc2: expert TP splits the input columns; megatron's dispatcher sums the partial outputs."""

    partition_dim = 2


class GroupedExperts(TEGroupedMLP):
    """TEGroupedMLP over our grouped linears, padding each expert's rows to the kernel's alignment."""

    group_align: int | None = None  # rows per group; None: what the kernel needs (kernels.grouped_matmul)

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection)
        self._register_state_dict_hook(_per_expert_state)
        self._register_load_state_dict_pre_hook(_stacked_state, with_module=True)

    def forward(self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        counts = tokens_per_expert.tolist()  # on the host already (megatron's dispatchers move it)
        align = self.group_align or group_alignment(hidden, self.linear_fc1.weight)
        padded = padded_counts(counts, align)
        if padded == counts:
            return super().forward(hidden, tokens_per_expert, probs)
        rows = padded_rows(counts, padded, hidden.device)
        total = sum(padded)
        padded_hidden = hidden.new_zeros(total, hidden.shape[-1]).index_copy(0, rows, hidden)
        padded_probs = probs.new_zeros(total).index_copy(0, rows, probs)
        output, bias = super().forward(padded_hidden, torch.tensor(padded), padded_probs)
        return output.index_select(0, rows), bias


def sync_free_unsupported(experts: torch.nn.Module) -> str | None:
    """Why `sync_free_experts` cannot stand in for this experts module's forward (None: it can)."""
    config = getattr(experts, "config", None)
    if not isinstance(experts, GroupedExperts):
        return "the experts are not grouped (model.lm.experts_impl=grouped)"
    if get_pg_size(experts.ep_group) > 1 or get_pg_size(experts.tp_group) > 1:
        return "expert parallelism or expert TP (the dispatcher's collectives need host-side split sizes)"
    if not (config.gated_linear_unit and config.activation_func is torch.nn.functional.silu):
        return "the expert activation is not SwiGLU"
    if config.activation_func_clamp_value is not None or config.glu_linear_offset or config.moe_apply_probs_on_input:
        return "a clamped, offset or input-weighted expert activation"
    return None


def sync_free_experts(
    hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, experts: GroupedExperts, kernel: str = "auto"
) -> torch.Tensor:
    """The MoE block's routed output with no host read: hidden [T, H], the router's probs and routing_map [T, E]
    -> [T, H]. Tokens are sorted by expert on the device and the group ends stay there (the dispatcher and
    TEGroupedMLP read the per-expert counts back to the host), so the forward can be captured in a CUDA graph.
    The same math as dispatcher + TEGroupedMLP + combine: fc1 -> SwiGLU x prob (fp32, cast back) -> fc2 -> the
    sum over each token's experts. Forward only, one rank's experts (see sync_free_unsupported).
    `kernel`: "triton" runs the decode kernels of kernels/moe_decode.py (the weights streamed once, the rows
    gathered and scattered inside them), "torch" torch's grouped GEMM, "auto" Triton on CUDA."""
    tokens, num_experts = routing_map.shape
    topk = experts.config.moe_router_topk
    chosen = routing_map.to(torch.float32).topk(topk, dim=1).indices  # [T, k]: exactly the routed experts
    weights = probs.gather(1, chosen).reshape(-1)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=hidden.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    ends = counts.cumsum(0, dtype=torch.int32)
    if kernel not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel={kernel!r}: expected auto, triton or torch")
    if kernel == "triton" or (kernel == "auto" and hidden.is_cuda and moe_decode.triton is not None):
        act = moe_decode.swiglu_fc1(hidden, experts.linear_fc1.weight, ends, order // topk, weights[order])
        combined = moe_decode.rows_fc2(act, experts.linear_fc2.weight, ends, order, tokens * topk)
        return combined.view(tokens, topk, -1).sum(dim=1)
    rows = hidden[order // topk]
    gate, up = grouped_matmul_by_offsets(rows, experts.linear_fc1.weight, ends).chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate) * up * weights[order, None]).to(hidden.dtype)
    out = grouped_matmul_by_offsets(act, experts.linear_fc2.weight, ends)
    combined = torch.empty_like(out)
    combined[order] = out
    return combined.view(tokens, topk, -1).sum(dim=1)


def _per_expert_state(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """Replace each stacked weight by SequentialMLP's per-expert entries: views into it, and the empty extra
    state megatron's linears save."""
    stacked = {name: state_dict.pop(f"{prefix}{name}.weight") for name in _LINEARS}
    for i in range(module.num_local_experts):
        for name in _LINEARS:
            state_dict[f"{prefix}local_experts.{i}.{name}.weight"] = stacked[name][i]
            state_dict[f"{prefix}local_experts.{i}.{name}._extra_state"] = None


def _stacked_state(
    module: GroupedExperts,
    state_dict: dict,
    prefix: str,
    local_metadata,
    strict,
    missing_keys,
    unexpected_keys,
    error_msgs,
) -> None:
    """Stack SequentialMLP-style per-expert entries into the weights before they load."""
    for name in _LINEARS:
        keys = [f"{prefix}local_experts.{i}.{name}.weight" for i in range(module.num_local_experts)]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{name}.weight"] = torch.stack([state_dict.pop(key) for key in keys])
        for i in range(module.num_local_experts):
            state_dict.pop(f"{prefix}local_experts.{i}.{name}._extra_state", None)


def grouped_experts_spec() -> ModuleSpec:
    return ModuleSpec(
        module=GroupedExperts, submodules=MLPSubmodules(linear_fc1=GroupedColumnLinear, linear_fc2=GroupedRowLinear)
    )


def experts_impl_of(module: torch.nn.Module | None) -> str | None:
    """The experts implementation a built LM uses: "grouped" or "sequential" (None: no LM on this rank)."""
    if module is None:
        return None
    return "grouped" if any(isinstance(m, GroupedExperts) for m in module.modules()) else "sequential"
