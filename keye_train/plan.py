"""`keye-train plan`: parameter counts and per-rank memory of a layout, without allocating the model.

Parameters are counted on the real modules, built on the meta device (shapes only, no storage) inside a
throw-away 1-rank gloo group. Memory per rank is derived from those counts and the layout's sharding.
"""

from __future__ import annotations

import contextlib
import torch

from keye_train.config import ModelConfig, ParallelConfig, TrainConfig

GIB = 1024 ** 3
LM_PARTS = ("embedding", "attention", "indexer", "router", "experts", "norms", "output_head")

# Bytes per parameter element (bf16 weights on GPU, fp32 main grads, Adam: fp32 master + 2 fp32 moments).
PARAM_BYTES = 2
GRAD_BYTES = 4
OPTIMIZER_BYTES = 12


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts


@contextlib.contextmanager
def _single_rank_megatron():
    """A private 1-rank gloo world with megatron's groups (all of size 1), destroyed on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        raise RuntimeError("count_parameters builds its own 1-rank process group; call it before "
                           "torch.distributed is initialised (e.g. from `keye-train plan`)")
    from parallel import cpu_compat

    cpu_compat.install_if_needed()  # megatron asks torch.cuda for a device while building
    from parallel.layout import init_single_process

    init_single_process("gloo")
    try:
        parallel_state.initialize_model_parallel()
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _build_on_meta(model: ModelConfig):
    """The unsharded LM (all stages) and vision tower, as meta tensors."""
    from keye_train.model.lm import build_lm, lm_transformer_config
    from keye_train.model.vision import VisionTower, vit_transformer_config
    from parallel import placement

    with _single_rank_megatron(), torch.device("meta"):
        lm = build_lm(model.lm, lm_transformer_config(model.lm, ParallelConfig(), torch.bfloat16, on_gpu=False),
                      pre_process=True, post_process=True)
        # In a 1-rank world megatron's own groups are the singleton groups the tower expects.
        vision = VisionTower(model, vit_transformer_config(model.vit, torch.bfloat16, on_gpu=False), placement.lm_process_groups())
    return lm, vision


def lm_part_of(name: str) -> str:
    """Part of a megatron GPTModel parameter name (norm weights, QK norms included, count as norms)."""
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "output_head"
    if ".indexer." in name:
        return "indexer"
    if "layernorm" in name:
        return "norms"
    if ".mlp.router." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    if ".self_attention." in name:
        return "attention"
    raise ValueError(f"unclassified LM parameter {name}")


_COUNTS: dict[str, dict] = {}  # repr(ModelConfig) -> counts; a build takes seconds at full size


def _count(model: ModelConfig) -> dict:
    lm, vision = _build_on_meta(model)
    lm_parts = dict.fromkeys(LM_PARTS, 0)
    for name, param in lm.named_parameters():
        lm_parts[lm_part_of(name)] += param.numel()
    vit = sum(p.numel() for p in vision.encoder.parameters())
    projector = sum(p.numel() for p in vision.projector.parameters())
    lm_total = sum(lm_parts.values())

    # Active per token (model.md section 2): top-k of the experts; everything else of the LM counts in full,
    # embeddings and head included. The ViT is left out (it runs only on visual inputs).
    active_parts = dict(lm_parts)
    active_parts["experts"] = lm_parts["experts"] * model.lm.moe_topk // model.lm.num_experts
    return {
        "vit": vit,
        "projector": projector,
        "lm": lm_total,
        "total": vit + projector + lm_total,
        "lm_parts": lm_parts,
        "active": sum(active_parts.values()),
        "active_parts": active_parts,
    }


def count_parameters(model: ModelConfig) -> dict:
    """Parameter counts of the whole model (unsharded), split by part, plus active LM parameters per token.

    Keys: vit, projector, lm, total (ints); lm_parts and active_parts ({part: int} over LM_PARTS); active.
    """
    key = repr(model)
    if key not in _COUNTS:
        _COUNTS[key] = _count(model)
    result = _COUNTS[key]
    return {k: dict(v) if isinstance(v, dict) else v for k, v in result.items()}


# ---------------------------------------------------------------------------------------------------------------
# Memory per rank


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


# ---------------------------------------------------------------------------------------------------------------
# Printing


def _print_layout(cfg, sizes) -> None:
    par = cfg.parallel
    sp = par.sequence_parallel if par.sequence_parallel is not None else sizes.tp > 1
    print(f"model {cfg.model.name}: seq_length {cfg.train.seq_length}, global_batch {cfg.train.global_batch}")
    print(f"layout: world {sizes.world} = tp {sizes.tp} x pp {sizes.pp} x dp {sizes.dp}; "
          f"ep {sizes.ep}, etp {sizes.etp}, expert_dp {sizes.expert_dp}; sequence_parallel {sp}; "
          f"distributed_optimizer {par.distributed_optimizer}")
    print(f"  {cfg.model.lm.num_layers // sizes.pp} LM layers per stage, "
          f"{cfg.model.lm.num_experts // sizes.ep} experts per rank, "
          f"{max(1, cfg.train.global_batch // sizes.dp)} micro-batches per DP rank; vision tower on stage 0")


def _print_parameters(counts: dict) -> None:
    print("\nparameters")
    rows = [("vit", counts["vit"]), ("projector", counts["projector"])]
    rows += [(f"lm.{part}", n) for part, n in counts["lm_parts"].items()]
    rows += [("lm", counts["lm"]), ("total", counts["total"]), ("active per token (LM)", counts["active"])]
    for name, n in rows:
        print(f"  {name:<24}{n:>18,}")


def _print_memory(memory: dict) -> None:
    print("\nmemory per rank, GiB (bf16 params, fp32 grads, Adam fp32 master + moments)")
    stages = list(memory)
    print(f"  {'':<14}" + "".join(f"{s:>14}" for s in stages))
    for item in ("params", "grads", "optimizer", "activations", "total"):
        print(f"  {item:<14}" + "".join(f"{memory[s][item] / GIB:>14.2f}" for s in stages))


def token_budget(train: TrainConfig) -> int:
    """Tokens a stage trains on: steps x global batch (packed sequences) x sequence length."""
    return train.steps * train.global_batch * train.seq_length


def _tokens(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def print_chain_budget(names: list[str], configs: list) -> None:
    """One row per stage: its recipe's length, steps, batch and token budget; then the chain's total."""
    print(f"{'stage':<22}{'seq_length':>11}{'steps':>9}{'global_batch':>14}{'tokens':>28}")
    for name, cfg in zip(names, configs):
        t = cfg.train
        print(f"{name:<22}{t.seq_length:>11,}{t.steps:>9,}{t.global_batch:>14,}"
              f"{token_budget(t):>22,} {_tokens(token_budget(t)):>5}")
    total = sum(token_budget(c.train) for c in configs)
    print(f"{'total':<56}{total:>22,} {_tokens(total):>5}")


def print_plan(cfg, sizes) -> None:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    counts = count_parameters(cfg.model)
    _print_layout(cfg, sizes)
    budget = token_budget(cfg.train)
    print(f"token budget: {cfg.train.steps} steps x {cfg.train.global_batch} x {cfg.train.seq_length} = "
          f"{budget:,} tokens ({_tokens(budget)})")
    _print_parameters(counts)
    _print_memory(memory_per_rank(cfg.model, cfg.parallel, cfg.train, sizes))
