"""Memory per rank of a layout, derived from the parameter counts and the layout's sharding."""

from __future__ import annotations

from keye_train.config import ModelConfig, ParallelConfig, TrainConfig
from keye_train.planning.parameters import count_parameters

GIB = 1024 ** 3

# Bytes per parameter element (bf16 weights on GPU, fp32 main grads, Adam: fp32 master + 2 fp32 moments).
PARAM_BYTES = 2
GRAD_BYTES = 4
OPTIMIZER_BYTES = 12


def _stage_param_elements(model: ModelConfig, counts: dict, sizes, first: bool, last: bool) -> tuple[float, float]:
    """(dense elements, expert elements) held by one rank of a pipeline stage.

    TP splits attention, embedding and output head; norms, the router and DSA indexers are replicated; experts are split
    over EP x expert-TP; layers are split evenly over PP; the vision tower (ViT + projector) is replicated on
    every rank of the first stage.
    """
    lm = counts["lm_parts"]
    layers = model.lm.num_layers
    final_norm = model.lm.hidden_size
    per_layer_dense = (lm["attention"] / sizes.tp + lm["indexer"] + lm["router"] + (lm["norms"] - final_norm)) / layers
    per_layer_experts = lm["experts"] / (sizes.ep * sizes.etp) / layers
    stage_layers = layers // sizes.pp
    dense = per_layer_dense * stage_layers
    if first:
        dense += lm["embedding"] / sizes.tp + counts["vit"] + counts["projector"]
    if last:
        dense += lm["output_head"] / sizes.tp + final_norm
    return dense, per_layer_experts * stage_layers


def activation_bytes(model: ModelConfig, train: TrainConfig, sizes, first: bool, last: bool,
                     recompute: str = "none") -> float:
    """Rough activation memory kept for backward on one rank (flash-style attention).

    One micro-batch is one packed sequence of s = seq_length tokens. Per token and LM layer, bf16 values:
      attention: 2h (norm in/out) + (q + k + v) + q-sized core output = 2h + 2*nq*d + 2*nkv*d
      MoE:       2h (norm in/out) + topk * (h dispatched + 2f fc1 out + f SwiGLU out), plus 2E fp32 router values
    Sequence + tensor parallelism divide all of it by tp. Last stage: fp32 + bf16 logits, s*V/tp.
    First stage, worst case of an all-visual pack (s merged tokens = 4s patches), not TP-sharded:
      ViT per patch and layer 8*hv + 2*fv (norms, qkv, core out, fc1 and GELU out); projector 16*hv per token.
    recompute="full": every layer keeps only its input (h per token, hv per patch) and one layer at a time
    holds its full set while it re-runs in backward.
    The 1F1B schedule keeps min(pp, micro-batches) micro-batches in flight on the first stage, one on the last.
    """
    lm, vit = model.lm, model.vit
    s = train.seq_length
    h, f, k = lm.hidden_size, lm.moe_ffn_hidden_size, lm.moe_topk
    attention = 2 * h + 2 * lm.num_heads * lm.head_dim + 2 * lm.num_kv_heads * lm.head_dim
    moe = 2 * h + k * (h + 3 * f)
    per_token_layer = 2 * (attention + moe) + 4 * 2 * lm.num_experts
    stage_layers = lm.num_layers // sizes.pp
    patches = 4 * s
    vit_per_patch_layer = 2 * (8 * vit.hidden_size + 2 * vit.ffn_hidden_size)
    if recompute == "full":
        kept = 2 * h * s * stage_layers / sizes.tp
        working = per_token_layer * s / sizes.tp
        if first:
            kept += 2 * vit.hidden_size * patches * vit.num_layers
            working = max(working, vit_per_patch_layer * patches)
    else:
        kept, working = per_token_layer * s * stage_layers / sizes.tp, 0.0
        if first:
            kept += vit_per_patch_layer * patches * vit.num_layers
    if first:
        kept += 2 * s * 16 * vit.hidden_size
    if last:
        kept += (4 + 2) * s * lm.vocab_size / sizes.tp
    microbatches = max(1, train.global_batch // sizes.dp)
    in_flight = min(sizes.pp, microbatches) if first else 1
    return kept * in_flight + working


def memory_per_rank(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, sizes) -> dict:
    """Bytes per rank on the first and the last pipeline stage (the two heaviest).

    Returns {"first_stage": {...}, "last_stage": {...}}, each with params, grads, optimizer, activations,
    total (bytes) and dense_params, expert_params (elements). With the distributed optimizer, optimizer
    state of dense parameters is sharded over DP and of expert parameters over expert-DP.
    """
    counts = count_parameters(model)
    stages = {}
    for key, first, last in (("first_stage", True, sizes.pp == 1), ("last_stage", sizes.pp == 1, True)):
        dense, experts = _stage_param_elements(model, counts, sizes, first, last)
        dense_shards = sizes.dp if parallel.distributed_optimizer else 1
        expert_shards = sizes.expert_dp if parallel.distributed_optimizer else 1
        row = {
            "params": (dense + experts) * PARAM_BYTES,
            "grads": (dense + experts) * GRAD_BYTES,
            "optimizer": (dense / dense_shards + experts / expert_shards) * OPTIMIZER_BYTES,
            "activations": activation_bytes(model, train, sizes, first, last, parallel.recompute),
        }
        row["total"] = sum(row.values())
        row.update(dense_params=dense, expert_params=experts)
        stages[key] = row
    return stages
