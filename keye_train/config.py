"""Typed configuration: structured dataclasses that Hydra composes and checks.

Model presets (`tiny`, `keye_vl2_30b_a3b`) are Python factories registered in Hydra's ConfigStore;
recipes in `recipes/` are YAML overrides on top of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from data_pipeline.tokenizer import TokenIds


@dataclass
class ViTConfig:
    num_layers: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    ffn_hidden_size: int = 4304
    patch_size: int = 14
    pos_grid: int = 27  # learned position table is pos_grid x pos_grid, interpolated per image
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6


@dataclass
class ProjectorConfig:
    merge: int = 2  # merge x merge patches -> one LM token
    norm_eps: float = 1e-5


@dataclass
class DSAConfig:
    """DeepSeek Sparse Attention on the LM's GQA layers (kernels/dsa.py, dsa.md).

    mode: dense (plain attention, no indexer), warmup (dense attention; the indexer learns the head-summed dense
    distribution by KL) or sparse (every KV group attends to the indexer's shared top-k set; KL on that set)."""

    mode: str = "dense"
    index_heads: int = 16  # H_I; 16 x 64 matches the released checkpoint's parameter count (model.md §10)
    index_head_dim: int = 64  # D_I; M-RoPE sections are the LM's scaled by D_I / head_dim
    topk: int = 2048
    loss_coeff: float = 1.0  # lambda on the mean per-token indexer KL of each layer (the paper does not give it)
    backend: str = "auto"  # auto | torch | triton
    memory_budget_mb: int = 256  # working set of one chunk of query rows in the torch reference
    metric_rows: int = 16  # query rows per layer and micro-batch sampled for recall / overlap (0: off)
    verify_tp_topk: bool = False  # all-gather a checksum of the selection across TP ranks and fail on mismatch


DSA_MODES = ("dense", "warmup", "sparse")
EXPERTS_IMPLS = ("auto", "grouped", "sequential")
LOSS_IMPLS = ("chunked", "megatron")


@dataclass
class LMConfig:
    num_layers: int = 48
    hidden_size: int = 2048
    num_heads: int = 32
    num_kv_heads: int = 4
    head_dim: int = 128
    num_experts: int = 128
    moe_topk: int = 8
    moe_ffn_hidden_size: int = 768
    moe_aux_loss_coeff: float = 1e-3
    vocab_size: int = 151936
    max_position_embeddings: int = 262144
    rope_theta: float = 1e7  # Qwen3-30B-A3B-Thinking-2507; Keye's own value is not published
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])
    norm_eps: float = 1e-6
    experts_impl: str = "auto"  # grouped (one grouped GEMM over the local experts) | sequential (loop) | auto
    loss_impl: str = "chunked"  # chunked (LM head + CE per chunk of tokens, no full logits) | megatron
    loss_chunk_tokens: int = 4096  # tokens per chunk of the chunked LM head + CE
    dsa: DSAConfig = field(default_factory=DSAConfig)


@dataclass
class ModelConfig:
    name: str = "keye_vl2_30b_a3b"
    vit: ViTConfig = field(default_factory=ViTConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    tokens: TokenIds = field(default_factory=TokenIds)
    init_std: float = 0.02


@dataclass
class VisionParallelConfig:
    """The ViT's own layout under placement=split: the first `ranks` ranks of the world run it, in
    ranks / tp data-parallel replicas. Colocated placement runs it unsharded on the LM's first pipeline stage."""

    tp: int = 1
    ranks: int = 0


@dataclass
class ParallelConfig:
    placement: str = "colocated"  # colocated | split (ViT and LM on distinct ranks, rank-offset roles)
    vision: VisionParallelConfig = field(default_factory=VisionParallelConfig)
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel; None: same as tp
    sequence_parallel: Optional[bool] = None  # None: on whenever tp > 1 (MoE with TP needs it)
    distributed_optimizer: bool = True
    recompute: str = "none"  # none | full: each ViT and LM layer keeps only its input and re-runs in backward
    nproc: int = 1  # processes started by `keye-train` itself when not under torchrun
    backend: str = "auto"  # auto: nccl with CUDA, gloo on CPU


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10
    decay_style: str = "cosine"  # cosine | linear | constant


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 8  # packed sequences per optimizer step, across DP ranks
    seq_length: int = 512
    seed: int = 1234
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    nonfinite_policy: str = "skip"  # a NaN/Inf gradient or loss, or a loss spike: skip the update (and log), or abort
    max_nonfinite_skips: int = 3  # consecutive skipped steps (non-finite or spike) before the run aborts anyway
    loss_spike_factor: float = 0.0  # > 0: a loss above factor x the recent mean is a spike, handled by nonfinite_policy
    loss_spike_window: int = 50  # accepted steps in that recent mean
    hang_timeout_s: float = 0.0  # > 0: a step slower than this prints every rank's thread stacks
    inject_nonfinite_at_step: int = -1  # fault drill: poison rank 0's gradients at this step (-1: never)


@dataclass
class StageConfig:
    name: str = "pretrain"
    trainable: List[str] = field(default_factory=lambda: ["vit", "projector", "lm"])


@dataclass
class DataSource:
    shards: str = "???"  # a shard directory (keye-data build)
    weight: float = 1.0  # its share of the stage's tokens, relative to the other sources


@dataclass
class DataConfig:
    """Shards, tokenizer, the stage's media budget, packing and decode workers (see data_pipeline/)."""

    shards: str = "runs/demo/data/shards"  # a directory built by `keye-data build` / `keye-data demo`
    mixture: List[DataSource] = field(default_factory=list)  # several directories with token weights (replaces shards)
    tokenizer: str = "runs/demo/data/tokenizer.json"  # the HF tokenizer.json the shards were indexed with
    workers: int = 0  # decode processes per rank; 0 decodes inline (no per-sample timeout)
    prefetch_steps: int = 2
    decode_timeout_s: float = 120.0
    image_min_tokens: int = 4
    image_max_tokens: int = 20480
    video_fps: float = 2.0
    video_max_frames: int = 2880
    frame_min_tokens: int = 64
    frame_max_tokens: int = 256
    video_total_tokens: int = 24576  # Stage 1: 24K, Stage 2: 64K, Stage 3: 180K (184320)
    adaptive_video_budget: bool = True
    open_packs: int = 16
    max_pack_age: int = 1024  # samples admitted after a pack opened before it is closed anyway
    long_sample_tokens: int = 0  # > 0: long and short packs alternate in long_short_ratio
    long_short_ratio: List[int] = field(default_factory=lambda: [1, 1])
    patch_cost: float = 1.0  # a ViT patch's compute relative to an LM token, for DP balancing


@dataclass
class CheckpointConfig:
    interval: int = 50  # steps; the last step is always saved. 0: no checkpoints except on preemption
    keep_last: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in run_dir
    init_from: Optional[str] = None  # weights-only start from another checkpoint


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "keye-train"
    wandb_group: Optional[str] = None  # W&B run group; a chain sets it to its name, one run per stage
    log_interval: int = 1
    progress_bar: bool = True


@dataclass
class SlurmConfig:
    """sbatch settings (launch/slurm.py). Logs go to <run_dir>/logs unless log_dir is set."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "24:00:00"
    cpus_per_task: int = 32  # per node: one launcher task per node starts its GPUs' ranks
    mem: Optional[str] = None  # e.g. "0" for all of each node's memory
    job_name: Optional[str] = None  # default: the run_dir's name
    log_dir: Optional[str] = None
    signal_lead_s: int = 300  # SIGUSR1 this long before the time limit: checkpoint, exit, requeue
    requeue: bool = True
    setup: List[str] = field(default_factory=list)  # shell lines run first on the batch node (module load, venv)
    extra_sbatch: List[str] = field(default_factory=list)  # more "#SBATCH ..." options, e.g. "--exclusive"


@dataclass
class LaunchConfig:
    """Where the ranks run: `keye-train launch torchrun|slurm` (launch/)."""

    nodes: int = 1
    gpus_per_node: int = 8  # processes per node
    master_addr: Optional[str] = None  # torchrun multi-node: the rendezvous host (SLURM: the allocation's first node)
    master_port: int = 29500
    rdzv_id: Optional[str] = None  # default: the SLURM job id, or the run_dir's name
    max_restarts: int = 0  # torchrun restarts of a failed node group (each resumes from the last checkpoint)
    env: Dict[str, str] = field(default_factory=dict)  # exported on every node before the ranks start
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class KeyeTrainConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def keye_vl2_30b_a3b() -> ModelConfig:
    return ModelConfig(name="keye_vl2_30b_a3b")


def tiny() -> ModelConfig:
    """Same topology and code paths as the full model, scaled for CPU tests (model.md section 11)."""
    return ModelConfig(
        name="tiny",
        vit=ViTConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=128, pos_grid=4),
        lm=LMConfig(
            num_layers=4,
            hidden_size=128,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            num_experts=8,
            moe_topk=2,
            moe_ffn_hidden_size=64,
            rope_theta=1e6,
            mrope_section=[4, 6, 6],
            max_position_embeddings=32768,
            dsa=DSAConfig(index_heads=4, index_head_dim=16, topk=32),
        ),
    )


def indexer_mrope_section(lm: LMConfig) -> list[int]:
    """The LM's M-RoPE sections scaled to the indexer head (full D_I rotated): [16, 24, 24] -> [8, 12, 12]."""
    dsa = lm.dsa
    scaled = [s * dsa.index_head_dim / lm.head_dim for s in lm.mrope_section]
    if any(v != int(v) for v in scaled) or sum(scaled) * 2 != dsa.index_head_dim:
        raise ValueError(f"model.lm.dsa.index_head_dim={dsa.index_head_dim}: the M-RoPE sections "
                         f"{list(lm.mrope_section)} do not scale to it evenly (head_dim {lm.head_dim})")
    return [int(v) for v in scaled]


def check_train_config(train: TrainConfig) -> None:
    if train.nonfinite_policy not in ("skip", "abort"):
        raise ValueError(f"train.nonfinite_policy={train.nonfinite_policy!r}: choose skip or abort")
    if train.max_nonfinite_skips < 0 or train.hang_timeout_s < 0:
        raise ValueError("train.max_nonfinite_skips and train.hang_timeout_s must be >= 0")
    if train.loss_spike_factor < 0:
        raise ValueError(f"train.loss_spike_factor={train.loss_spike_factor} must be >= 0 (0: off)")
    if train.loss_spike_window < 1:
        raise ValueError(f"train.loss_spike_window={train.loss_spike_window} must be >= 1")


def check_checkpoint_config(checkpoint: CheckpointConfig) -> None:
    if checkpoint.interval < 0:
        raise ValueError(f"checkpoint.interval={checkpoint.interval} must be >= 0 (0: only on preemption)")


def resolve_experts_impl(lm: LMConfig, on_gpu: bool) -> str:
    """model.lm.experts_impl with auto resolved: grouped GEMM on CUDA, the per-expert loop on the CPU."""
    if lm.experts_impl not in EXPERTS_IMPLS:
        raise ValueError(f"model.lm.experts_impl={lm.experts_impl!r}: choose one of {', '.join(EXPERTS_IMPLS)}")
    if lm.experts_impl == "auto":
        return "grouped" if on_gpu else "sequential"
    return lm.experts_impl


def loss_chunk_tokens(lm: LMConfig) -> int | None:
    """Tokens per chunk of the chunked LM head + CE, or None for megatron's (model.lm.loss_impl)."""
    if lm.loss_impl not in LOSS_IMPLS:
        raise ValueError(f"model.lm.loss_impl={lm.loss_impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
    if lm.loss_chunk_tokens < 1:
        raise ValueError(f"model.lm.loss_chunk_tokens={lm.loss_chunk_tokens} must be >= 1")
    return lm.loss_chunk_tokens if lm.loss_impl == "chunked" else None


def check_model_config(model: ModelConfig) -> None:
    """Reject a bad model config before any rank starts, naming the key."""
    resolve_experts_impl(model.lm, on_gpu=False)
    loss_chunk_tokens(model.lm)
    dsa = model.lm.dsa
    if dsa.mode not in DSA_MODES:
        raise ValueError(f"model.lm.dsa.mode={dsa.mode!r}: choose one of {', '.join(DSA_MODES)}")
    for key in ("index_heads", "index_head_dim", "topk", "memory_budget_mb"):
        if getattr(dsa, key) < 1:
            raise ValueError(f"model.lm.dsa.{key}={getattr(dsa, key)} must be >= 1")
    if dsa.backend not in ("auto", "torch", "triton"):
        raise ValueError(f"model.lm.dsa.backend={dsa.backend!r}: choose auto, torch or triton")
    if dsa.loss_coeff < 0 or dsa.metric_rows < 0:
        raise ValueError("model.lm.dsa.loss_coeff and model.lm.dsa.metric_rows must be >= 0")
    if dsa.mode != "dense":
        indexer_mrope_section(model.lm)


MODEL_PRESETS = {"tiny": tiny, "keye_vl2_30b_a3b": keye_vl2_30b_a3b}
