"""Megatron layer specs for the LM and the ViT, built from megatron-core modules plus our attention slot."""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from keye_train.config import LMConfig
from keye_train.model.attention import VarlenCoreAttention
from keye_train.model.dsa import DSACoreAttention, DSASelfAttention
from keye_train.model.experts import grouped_experts_spec
from keye_train.model.norms import LayerNorm, RMSNorm


def _layer(
    norm, attn_mask_type: AttnMaskType, qk_norm, mlp, attention=SelfAttention, core_attention=VarlenCoreAttention
) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=attention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _block(layer: ModuleSpec, final_norm, num_layers: int) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm),
    )


def lm_block_spec(config, lm: LMConfig, pp_rank: int) -> ModuleSpec:
    """Qwen3-MoE decoder layers of one pipeline stage: RMSNorm, causal GQA with per-head QK RMSNorm (with a
    lightning indexer unless DSA is off), routed SwiGLU experts; final RMSNorm. The experts are megatron's
    SequentialMLP, or with `config.moe_grouped_gemm` (model.lm.experts_impl) our grouped GEMM."""
    moe = get_moe_module_spec_for_backend(
        backend=LocalSpecProvider(), num_experts=lm.num_experts, moe_grouped_gemm=False
    )
    if config.moe_grouped_gemm:
        moe.submodules.experts = grouped_experts_spec()
    if lm.dsa.mode == "dense":
        layer = _layer(
            RMSNorm,
            AttnMaskType.causal,
            RMSNorm,
            moe,
            core_attention=ModuleSpec(module=VarlenCoreAttention, params={"backend": lm.attention_backend}),
        )
    else:
        layer = _layer(
            RMSNorm,
            AttnMaskType.causal,
            RMSNorm,
            moe,
            attention=DSASelfAttention,
            core_attention=ModuleSpec(module=DSACoreAttention, params={"lm": lm}),
        )
    return _block(layer, RMSNorm, get_num_layers_to_build(config, pp_rank=pp_rank))


def vit_block_spec(config) -> ModuleSpec:
    """SigLIP encoder: pre-LN layers with biases, bidirectional attention, tanh-GELU MLP; post-LayerNorm."""
    mlp = ModuleSpec(
        module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )
    layer = _layer(LayerNorm, AttnMaskType.no_mask, IdentityOp, mlp)
    return _block(layer, LayerNorm, config.num_layers)


def recompute_options(recompute: str, modules=(), vit: bool = False) -> dict:
    """TransformerConfig fields for a recompute setting: "full" is megatron's full activation recomputation, one
    layer per checkpoint (each layer keeps its input and re-runs its forward in backward); "selective" re-runs only
    `modules` (megatron's recompute_modules) that the layers have: the ViT (`vit`) only its norms and core
    attention (megatron 0.16.1's dense-MLP recompute re-enters its checkpoints in the ViT's backward; use
    parallel.vision.recompute=full for a ViT that must keep less)."""
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if recompute == "selective":
        keep = ("layernorm", "core_attn") if vit else ("moe", "moe_act", "layernorm", "core_attn")
        names = [str(m) for m in modules if str(m) in keep]
        return {"recompute_granularity": "selective", "recompute_modules": names} if names else {}
    return {}
