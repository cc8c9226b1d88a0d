"""Model configuration: the SigLIP ViT, the 2x2 merge projector and the Qwen3-MoE LM with DSA, plus presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import List

from data_pipeline.tokenizer import TokenIds


class DSAMode(StrEnum):
    dense = "dense"  # plain attention, no indexer
    warmup = "warmup"  # dense attention; the indexer learns the head-summed dense distribution by KL
    sparse = "sparse"  # every KV group attends to the indexer's shared top-k set; KL on that set


class ExpertsImpl(StrEnum):
    auto = "auto"  # grouped on CUDA, the per-expert loop on the CPU
    grouped = "grouped"  # one grouped GEMM over the local experts (keye_train/model/experts.py)
    sequential = "sequential"  # megatron's SequentialMLP loop


class LossImpl(StrEnum):
    chunked = "chunked"  # LM head + cross-entropy per chunk of tokens: no full logits (keye_train/model/lm_head.py)
    megatron = "megatron"  # megatron's logits + vocab-parallel cross-entropy


class AttentionBackend(StrEnum):
    auto = (
        "auto"  # cuDNN for long documents and FlashAttention varlen for the rest, on CUDA (kernels/dense_attention.py)
    )
    cudnn = "cudnn"
    flash = "flash"  # FlashAttention varlen for every document


class DSABackend(StrEnum):
    auto = "auto"  # Triton on CUDA tensors, the torch reference otherwise
    torch = "torch"
    triton = "triton"


class Fusion(StrEnum):
    auto = "auto"  # on CUDA: Triton RoPE (kernels/rope.py), bias+GELU and bias+residual under torch.compile
    off = "off"  # megatron's unfused elementwise ops everywhere (the CPU always runs these)


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
    """DeepSeek Sparse Attention on the LM's GQA layers (kernels/dsa.py; docs/architecture.md)."""

    mode: DSAMode = DSAMode.dense
    index_heads: int = 16  # H_I; 16 x 64 reproduces the released checkpoint's parameter count
    index_head_dim: int = 64  # D_I; M-RoPE sections are the LM's scaled by D_I / head_dim
    topk: int = 2048
    loss_coeff: float = 1.0  # lambda on the mean per-token indexer KL of each layer (the paper does not give it)
    backend: DSABackend = DSABackend.auto
    memory_budget_mb: int = 256  # working set of one chunk of query rows in the torch reference
    metric_rows: int = 16  # query rows per layer and micro-batch sampled for recall / overlap (0: off)
    verify_tp_topk: bool = False  # all-gather a checksum of the selection across TP ranks and fail on mismatch

    def __post_init__(self):
        for key in ("index_heads", "index_head_dim", "topk", "memory_budget_mb"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.lm.dsa.{key}={getattr(self, key)} must be >= 1")
        if self.loss_coeff < 0 or self.metric_rows < 0:
            raise ValueError("model.lm.dsa.loss_coeff and model.lm.dsa.metric_rows must be >= 0")


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
    attention_backend: AttentionBackend = AttentionBackend.auto  # dense attention on CUDA (the CPU runs the loop)
    experts_impl: ExpertsImpl = ExpertsImpl.auto
    loss_impl: LossImpl = LossImpl.chunked
    loss_chunk_tokens: int = 4096  # tokens per chunk of the chunked LM head + CE
    dsa: DSAConfig = field(default_factory=DSAConfig)

    def __post_init__(self):
        if self.loss_chunk_tokens < 1:
            raise ValueError(f"model.lm.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 1")
        if self.dsa.mode != DSAMode.dense:
            indexer_mrope_section(self)


@dataclass
class ModelConfig:
    name: str = "keye_vl2_30b_a3b"
    vit: ViTConfig = field(default_factory=ViTConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    tokens: TokenIds = field(default_factory=TokenIds)  # a run takes them from data.tokenizer
    init_std: float = 0.02
    fusion: Fusion = Fusion.auto


def indexer_mrope_section(lm: LMConfig) -> list[int]:
    """The LM's M-RoPE sections scaled to the indexer head (full D_I rotated): [16, 24, 24] -> [8, 12, 12]."""
    dsa = lm.dsa
    scaled = [s * dsa.index_head_dim / lm.head_dim for s in lm.mrope_section]
    if any(v != int(v) for v in scaled) or sum(scaled) * 2 != dsa.index_head_dim:
        raise ValueError(
            f"model.lm.dsa.index_head_dim={dsa.index_head_dim}: the M-RoPE sections "
            f"{list(lm.mrope_section)} do not scale to it evenly (head_dim {lm.head_dim})"
        )
    return [int(v) for v in scaled]


def resolve_experts_impl(lm: LMConfig, on_gpu: bool) -> str:
    """model.lm.experts_impl with auto resolved: grouped GEMM on CUDA, the per-expert loop on the CPU."""
    if lm.experts_impl == ExpertsImpl.auto:
        return "grouped" if on_gpu else "sequential"
    return str(lm.experts_impl)


def loss_chunk_tokens(lm: LMConfig) -> int | None:
    """Tokens per chunk of the chunked LM head + CE, or None for megatron's (model.lm.loss_impl)."""
    return lm.loss_chunk_tokens if lm.loss_impl == LossImpl.chunked else None


def keye_vl2_30b_a3b() -> ModelConfig:
    return ModelConfig(name="keye_vl2_30b_a3b")


def tiny() -> ModelConfig:
    """Same topology and code paths as the full model, scaled for CPU tests."""
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


MODEL_PRESETS = {"tiny": tiny, "keye_vl2_30b_a3b": keye_vl2_30b_a3b}
