"""The Qwen3-MoE language model as a megatron-core GPTModel with our layer spec and M-RoPE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from keye_train.config import LMConfig, ParallelConfig, loss_chunk_tokens, resolve_experts_impl
from keye_train.model.lm_head import ChunkedLossGPTModel
from keye_train.model.megatron_compat import allow_missing_transformer_engine, install_fused_rope
from keye_train.model.specs import lm_block_spec, recompute_options


def lm_transformer_config(
    lm: LMConfig, par: ParallelConfig, dtype: torch.dtype, on_gpu: bool, fused: bool = False
) -> TransformerConfig:
    """`fused` (model.fusion): our Triton M-RoPE and megatron's residual add under torch.compile."""
    if fused:
        install_fused_rope()
    sequence_parallel = par.sequence_parallel if par.sequence_parallel is not None else par.tp > 1
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_heads,
        num_query_groups=lm.num_kv_heads,
        kv_channels=lm.head_dim,
        ffn_hidden_size=lm.moe_ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_moe_experts=lm.num_experts,
        moe_router_topk=lm.moe_topk,
        moe_ffn_hidden_size=lm.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,  # top-k on logits, softmax over k == renormalised top-k
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=lm.moe_aux_loss_coeff,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_grouped_gemm=resolve_experts_impl(lm, on_gpu) == "grouped",  # our GroupedExperts (specs.py)
        mrope_section=list(lm.mrope_section),
        rotary_interleaved=False,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        context_parallel_size=par.cp,  # our attention slot does CP (model/context_parallel.py)
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.tp if par.etp is None else par.etp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,  # weights come from keye_train.model.init (layout-invariant)
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **recompute_options(par.recompute, par.recompute_modules),
    )


def build_lm(lm: LMConfig, config: TransformerConfig, pre_process: bool, post_process: bool) -> GPTModel:
    """The LM stage; with model.lm.loss_impl=chunked its loss skips the full logits (keye_train/model/lm_head.py)."""
    allow_missing_transformer_engine()
    model = ChunkedLossGPTModel(
        config=config,
        transformer_layer_spec=lm_block_spec(config, lm, parallel_state.get_pipeline_model_parallel_rank()),
        vocab_size=lm.vocab_size,
        max_sequence_length=lm.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="mrope",
        rotary_base=int(lm.rope_theta),
        scatter_embedding_sequence_parallel=False,  # visual tokens are merged first, then scattered
    )
    model.loss_chunk_tokens = loss_chunk_tokens(lm)
    return model
