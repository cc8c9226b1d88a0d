"""Validate a parallel layout before any rank starts, then build megatron's process groups."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

_HOST_WORLD = None  # a gloo group over the world when the default backend is not gloo (init_process_groups)


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the config keys involved."""


@dataclass(frozen=True)
class LayoutSizes:
    world: int
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    vision_ranks: int = 0  # placement=split: ranks 0 .. vision_ranks - 1 run the ViT, the rest the LM
    cp: int = 1  # context parallel: the ranks of one DP replica that share its packs, each holding a slice
    placement: str = "colocated"  # parallel.placement: where the ViT's weights and optimizer state live
    vision_tp: int = 1  # placement=split: the ViT's tensor parallelism over its ranks

    def record(self) -> dict:
        """The sizes as checkpoints record them; cp and vision_tp only when > 1 and the placement only when not
        colocated, so checkpoints written before CP, ViT TP or the placements still match. The placement is part
        of the layout: spread holds the ViT on every stage with an optimizer of its own, so a checkpoint of the
        same sizes under another placement is loaded by the shard indexes, never array by array."""
        sizes = asdict(self)
        if sizes["cp"] == 1:
            del sizes["cp"]
        if sizes["placement"] == "colocated":
            del sizes["placement"]
        if sizes["vision_tp"] == 1:
            del sizes["vision_tp"]
        return sizes


def expert_tp(par) -> int:
    return par.tp if par.etp is None else par.etp


def check_layout(par, lm, vit, world_size: int) -> LayoutSizes:
    """Raise LayoutError naming the offending keys; return the derived sizes."""
    vision_ranks = _check_placement(par, vit, world_size)
    total, world_size = world_size, world_size - vision_ranks  # the LM's ranks
    if par.etp is not None and par.etp != par.tp and par.ep == 1:
        raise LayoutError(
            f"parallel.etp={par.etp} differs from parallel.tp={par.tp} with parallel.ep=1: megatron "
            "then treats experts as dense parameters and never sums their gradients over the "
            "TP ranks; use parallel.ep>1 or leave parallel.etp unset"
        )
    for key in ("tp", "cp", "pp", "ep"):
        if getattr(par, key) < 1:
            raise LayoutError(f"parallel.{key}={getattr(par, key)} must be >= 1")
    cp = par.cp
    model_parallel = par.tp * cp * par.pp  # world = tp x cp x pp x dp (megatron's dense grid)
    label = "LM ranks (world - parallel.vision.ranks)" if vision_ranks else "world size"
    if world_size % model_parallel:
        raise LayoutError(
            f"{label} {world_size} is not divisible by parallel.tp*parallel.cp*parallel.pp = "
            f"{par.tp}*{cp}*{par.pp}; change parallel.nproc/nodes or the layout"
        )
    etp = expert_tp(par)
    expert_grid = etp * par.ep * par.pp  # megatron's expert grid: etp x ep x pp x expert_dp, EP within dp x cp
    if world_size % expert_grid:
        raise LayoutError(
            f"{label} {world_size} is not divisible by parallel.etp*parallel.ep*parallel.pp = {etp}*{par.ep}*{par.pp}"
        )
    if cp > 1 and par.placement != "colocated":
        raise LayoutError(
            f"parallel.cp={cp} with parallel.placement={par.placement}: context parallelism is built for the "
            "colocated placement (the ViT runs whole on every CP rank); use parallel.placement=colocated"
        )
    checks = [
        (lm.num_heads % par.tp, f"model.lm.num_heads={lm.num_heads} is not divisible by parallel.tp={par.tp}"),
        (lm.num_kv_heads % par.tp, f"model.lm.num_kv_heads={lm.num_kv_heads} is not divisible by parallel.tp={par.tp}"),
        (lm.num_experts % par.ep, f"model.lm.num_experts={lm.num_experts} is not divisible by parallel.ep={par.ep}"),
        (
            lm.moe_ffn_hidden_size % etp,
            f"model.lm.moe_ffn_hidden_size={lm.moe_ffn_hidden_size} is not divisible by expert TP {etp}",
        ),
        (lm.num_layers % par.pp, f"model.lm.num_layers={lm.num_layers} is not divisible by parallel.pp={par.pp}"),
        (lm.vocab_size % par.tp, f"model.lm.vocab_size={lm.vocab_size} is not divisible by parallel.tp={par.tp}"),
        (
            vit.hidden_size % vit.num_heads,
            f"model.vit.hidden_size={vit.hidden_size} is not divisible by model.vit.num_heads={vit.num_heads}",
        ),
        (
            (vit.hidden_size // vit.num_heads) % 4,
            f"model.vit head dim {vit.hidden_size // vit.num_heads} must be divisible by 4 for 2D RoPE",
        ),
        (
            sum(lm.mrope_section) * 2 != lm.head_dim,
            f"model.lm.mrope_section={list(lm.mrope_section)} must sum to head_dim/2 = {lm.head_dim // 2}",
        ),
    ]
    for failed, message in checks:
        if failed:
            raise LayoutError(message)
    if par.tp > 1 and par.sequence_parallel is False:
        raise LayoutError(
            "parallel.sequence_parallel=false with parallel.tp>1: megatron MoE needs sequence "
            "parallelism under TP; leave it unset or true"
        )
    dp = world_size // model_parallel
    expert_dp = world_size // expert_grid
    placement = getattr(par.placement, "value", par.placement)  # a plain string in the checkpoint JSON
    vision_tp = par.vision.tp if vision_ranks else 1
    return LayoutSizes(total, par.tp, par.pp, par.ep, etp, dp, expert_dp, vision_ranks, cp, placement, vision_tp)


def _check_placement(par, vit, world_size: int) -> int:
    """The ranks that run only the ViT (0 when colocated)."""
    vision = par.vision
    if par.placement == "colocated":
        if vision.tp != 1 or vision.ranks:
            raise LayoutError(
                "parallel.vision.tp / parallel.vision.ranks set with parallel.placement=colocated, "
                "which runs the ViT unsharded on the LM's first pipeline stage; use "
                "parallel.placement=split for a ViT layout of its own"
            )
        return 0
    if par.placement in ("spread", "auto"):  # spread: the LM on every rank; auto: `keye-train plan` decides
        return 0
    if not 0 < vision.ranks < world_size:
        raise LayoutError(
            f"parallel.vision.ranks={vision.ranks} must be between 1 and world size - 1 "
            f"({world_size - 1}) with parallel.placement=split"
        )
    if vision.tp < 1 or vision.ranks % vision.tp or vit.num_heads % vision.tp:
        raise LayoutError(
            f"parallel.vision.tp={vision.tp} must divide parallel.vision.ranks={vision.ranks} and "
            f"model.vit.num_heads={vit.num_heads}"
        )
    return vision.ranks


def check_batch(train, sizes: LayoutSizes) -> int:
    """Return micro-batches per DP rank per step."""
    if train.global_batch % sizes.dp:
        raise LayoutError(
            f"train.global_batch={train.global_batch} is not divisible by the data-parallel "
            f"size {sizes.dp} (world / (tp*cp*pp))"
        )
    if sizes.tp > 1 and train.seq_length % sizes.tp:
        raise LayoutError(
            f"train.seq_length={train.seq_length} is not divisible by parallel.tp={sizes.tp} "
            "(sequence parallelism splits the sequence)"
        )
    return train.global_batch // sizes.dp


def init_single_process(backend: str = "gloo") -> None:
    """A 1-rank world. It needs no rendezvous: an in-memory store never races for (or inherits) a TCP port."""
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def rank_roles(par, sizes: LayoutSizes) -> list[str]:
    """The rank-offset role scheme, one line per role: under placement=split the first vision_ranks global
    ranks run the ViT and the rest the LM, whichever node each rank lands on."""
    cp = f" x cp {sizes.cp}" if sizes.cp > 1 else ""
    lm = f"LM (tp {sizes.tp}{cp} x pp {sizes.pp} x dp {sizes.dp}, ep {sizes.ep})"
    if not sizes.vision_ranks:
        return [f"ranks 0-{sizes.world - 1}: {lm} with the ViT on pipeline stage 0 (colocated)"]
    vision_dp = sizes.vision_ranks // par.vision.tp
    return [
        f"ranks 0-{sizes.vision_ranks - 1}: ViT + projector (tp {par.vision.tp} x dp {vision_dp})",
        f"ranks {sizes.vision_ranks}-{sizes.world - 1}: {lm}",
    ]


def require_trainable(par, rl: bool = False) -> None:
    """The placements the trainer runs: colocated, split and spread (auto is the planner's)."""
    if par.placement == "auto":
        raise LayoutError(
            "parallel.placement=auto is for `keye-train plan`, which prints the placement to train with; "
            "train with parallel.placement=colocated, split or spread"
        )
    if rl and par.placement != "colocated":
        raise LayoutError(
            f"parallel.placement={par.placement} with rl.enabled=true: the rollout engine samples on the "
            "colocated model; use parallel.placement=colocated for RL stages"
        )


def resolve_backend(par, on_gpu: bool) -> str:
    """parallel.backend, with auto = nccl on GPUs and gloo on the CPU."""
    return par.backend if par.backend != "auto" else ("nccl" if on_gpu else "gloo")


def init_process_groups(par, sizes: LayoutSizes, backend: str) -> None:
    """Start torch.distributed (from torchrun's env) and megatron's TP/CP/PP/EP/DP groups."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        if os.environ.get("WORLD_SIZE", "1") == "1":
            init_single_process(backend)
        else:
            dist.init_process_group(backend=backend)
    if dist.get_world_size() != sizes.world:
        raise LayoutError(f"launched {dist.get_world_size()} processes but the layout was checked for {sizes.world}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    global _HOST_WORLD
    _HOST_WORLD = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    with _lm_sub_world(sizes.vision_ranks):
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tp,
            pipeline_model_parallel_size=par.pp,
            context_parallel_size=par.cp,
            expert_model_parallel_size=par.ep,
            expert_tensor_parallel_size=expert_tp(par),
            create_gloo_process_groups=True,
        )
    from parallel import context

    if dist.get_rank() >= sizes.vision_ranks:
        context.setup(parallel_state.get_context_parallel_group())


@contextlib.contextmanager
def _lm_sub_world(offset: int):
    """megatron's groups over the LM ranks only (global ranks offset .. world - 1) under placement=split.

    megatron 0.16 builds every group from `torch.distributed.get_world_size()` and a RankGenerator whose
    rank_offset it leaves at 0; here both see the LM ranks. Every rank still runs the group creation (new_group
    is collective over the world); the ViT ranks belong to none of the groups, so megatron's state stays empty
    there and they never ask it."""
    if not offset:
        yield
        return
    from megatron.core import parallel_state

    world_size, rank_generator = dist.get_world_size, parallel_state.RankGenerator
    lm_world = world_size() - offset
    dist.get_world_size = lambda group=None: lm_world if group is None else world_size(group)
    parallel_state.RankGenerator = lambda *args, rank_offset=0, **kwargs: rank_generator(
        *args, rank_offset=offset, **kwargs
    )
    try:
        yield
    finally:
        dist.get_world_size, parallel_state.RankGenerator = world_size, rank_generator


def host_world_group():
    """A group over the whole world whose collectives take CPU tensors, so a small agreement between ranks never
    waits on a device's queue: the default group when it is gloo, else the gloo group init_process_groups made."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if _HOST_WORLD is None:
        raise RuntimeError("host_world_group: the process groups were not made by parallel.layout.init_process_groups")
    return _HOST_WORLD


def destroy_process_groups() -> None:
    from megatron.core import parallel_state

    from parallel import context

    global _HOST_WORLD
    _HOST_WORLD = None
    context.teardown()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
