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
from keye_train.training.optim import apply_freezing, build_optimizer, wrap_ddp
from parallel import cpu_compat
from parallel.layout import check_batch, check_layout, init_process_groups, require_colocated, resolve_backend
from parallel.placement import ColocatedPlacement


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
    placement: ColocatedPlacement


def start_rank(cfg) -> RankContext:
    """Check the layout for the launched world, start megatron's groups and seed the RNGs."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.install()
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, world)
    require_colocated(cfg.parallel)
    num_microbatches = check_batch(cfg.train, sizes)
    init_process_groups(cfg.parallel, sizes, resolve_backend(cfg.parallel, on_gpu))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    if on_gpu:  # megatron's model-parallel CUDA RNG streams (TP-aware dropout and init)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    return RankContext(
        device,
        resolve_dtype(cfg.train.dtype, on_gpu),
        sizes.record(),
        num_microbatches,
        ColocatedPlacement(),
    )


@dataclass
class TrainModel:
    """The rank's model parts, their DDP wrappers and the optimizer over them."""

    parts: ModelParts
    lm_chunk: torch.nn.Module
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
    distopt = cfg.parallel.distributed_optimizer
    lm_chunk = wrap_ddp(parts.lm, distopt)
    vision_chunk = wrap_ddp(parts.vision, distopt) if parts.vision is not None else None
    chunks = [c for c in (lm_chunk, vision_chunk) if isinstance(c, DistributedDataParallel)]
    return TrainModel(parts, lm_chunk, vision_chunk, build_optimizer(chunks, cfg.optim, ctx.dtype, distopt))


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
