"""Everything a rank needs before its first step: device and dtype, megatron's groups, the placement, the model
parts wrapped in megatron DDP and the (distributed) optimizer."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel

from keye_train.config import DType
from keye_train.model.builder import ModelParts, build_model, initialize_weights
from keye_train.training.optim import SharedNormOptimizer, apply_freezing, build_optimizer, chain_optimizers, wrap_ddp
from parallel import cpu_compat
from parallel.layout import check_batch, check_layout, init_process_groups, require_trainable, resolve_backend
from parallel.placement import ColocatedPlacement, placement_for


def resolve_dtype(name: DType, on_gpu: bool) -> torch.dtype:
    if name == DType.auto:
        return torch.bfloat16 if on_gpu else torch.float32
    return torch.bfloat16 if name == DType.bf16 else torch.float32


@dataclass
class RankContext:
    device: torch.device
    dtype: torch.dtype
    layout: dict  # the LayoutSizes as a dict; checkpoints record it
    num_microbatches: int  # per DP rank and step
    placement: ColocatedPlacement  # or SpreadPlacement / SplitPlacement (parallel/placement.py)


def start_rank(cfg) -> RankContext:
    """Check the layout for the launched world, start megatron's groups and seed the RNGs."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.install()
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, world)
    require_trainable(cfg.parallel, cfg.rl.enabled)
    num_microbatches = check_batch(cfg.train, sizes)
    init_process_groups(cfg.parallel, sizes, resolve_backend(cfg.parallel, on_gpu))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    if on_gpu:  # megatron's model-parallel CUDA RNG streams (TP-aware dropout and init)
        vision_only = dist.get_rank() < sizes.vision_ranks  # split's ViT ranks: in no megatron group, unsharded
        ranks = {"tp_rank": 0, "ep_rank": 0, "etp_rank": 0} if vision_only else {}
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed, **ranks)
    return RankContext(
        device,
        resolve_dtype(cfg.train.dtype, on_gpu),
        sizes.record(),
        num_microbatches,
        placement_for(cfg.parallel, sizes),
    )


@dataclass
class TrainModel:
    """The rank's model parts, their DDP wrappers and the optimizer over them."""

    parts: ModelParts
    lm_chunk: torch.nn.Module | None  # None on the ViT's own ranks (placement=split)
    vision_chunk: torch.nn.Module | None
    optimizer: object

    @property
    def ddp_chunks(self) -> list:
        return [c for c in (self.lm_chunk, self.vision_chunk) if isinstance(c, DistributedDataParallel)]

    def zero_grad(self) -> None:
        for chunk in self.ddp_chunks:
            chunk.zero_grad_buffer()
        with warnings.catch_warnings():  # megatron's distributed optimizer asks its shard views for .grad
            warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")
            self.optimizer.zero_grad()


def build_train_model(cfg, ctx: RankContext) -> TrainModel:
    """Build and initialise this rank's parts (layout-invariant seeds), freeze by stage, wrap, add the optimizer."""
    parts = build_model(cfg.model, cfg.parallel, ctx.dtype, ctx.device.type == "cuda", ctx.placement)
    initialize_weights(parts, cfg.model, cfg.train.seed)
    apply_freezing(parts, cfg.stage.trainable)
    return wrap_parts(parts, cfg.optim, ctx.dtype, cfg.parallel.distributed_optimizer, ctx.placement)


def wrap_parts(parts: ModelParts, optim, dtype: torch.dtype, distopt: bool, placement) -> TrainModel:
    """DDP around each part and one optimizer over them. placement=split: the ViT ranks' tower reduces over
    their own groups and both sides clip by the norm over the two modules."""
    own_vision_groups = placement.name in ("split", "spread")
    lm_chunk = wrap_ddp(parts.lm, distopt) if parts.lm is not None else None
    vision_chunk = None
    if parts.vision is not None:
        vision_chunk = wrap_ddp(parts.vision, distopt, placement.vision_groups() if own_vision_groups else None)
    if placement.name == "spread":  # the two modules reduce over different groups: one optimizer each, chained
        optimizer = chain_optimizers(
            [build_optimizer([chunk], optim, dtype, distopt) for chunk in (lm_chunk, vision_chunk)]
        )
    else:
        chunks = [c for c in (lm_chunk, vision_chunk) if isinstance(c, DistributedDataParallel)]
        optimizer = build_optimizer(chunks, optim, dtype, distopt)
    if placement.name == "split":
        optimizer = SharedNormOptimizer(optimizer, placement.hosts_lm())
    return TrainModel(parts, lm_chunk, vision_chunk, optimizer)


def build_rl_data(cfg, ctx: RankContext):
    """An RL or MOPD stage's (data source, model): the model first, because the rollout engine samples on its
    parts."""
    from data_pipeline.tokenizer import KeyeTokenizer
    from keye_train.posttrain.rl_data import RLDataSource

    tokenizer = KeyeTokenizer(cfg.data.tokenizer)
    cfg.model.tokens = tokenizer.ids
    model = build_train_model(cfg, ctx)
    log = lambda line: print(f"[rank {dist.get_rank()}] {line}", flush=True)  # noqa: E731
    if cfg.mopd.enabled:  # distillation: the same rollouts, scored by the routed teachers
        from keye_train.posttrain.mopd.data import MOPDDataSource

        return MOPDDataSource(cfg, model, ctx.placement, tokenizer, ctx, log=log), model
    return RLDataSource(cfg, model, ctx.placement, tokenizer, log=log), model
