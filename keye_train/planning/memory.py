"""Memory per rank of a layout, derived from the parameter counts and the layout's sharding."""

from __future__ import annotations

from keye_train.config import ModelConfig, ParallelConfig, TrainConfig, loss_chunk_tokens
from keye_train.planning.parameters import count_parameters

GIB = 1024**3

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
    final_norm = model.lm.hidden_size if lm["norms"] else 0  # `trained_counts` zeroes a frozen LM's norms
    per_layer_dense = (lm["attention"] / sizes.tp + lm["indexer"] + lm["router"] + (lm["norms"] - final_norm)) / layers
    per_layer_experts = lm["experts"] / (sizes.ep * sizes.etp) / layers
    stage_layers = layers // sizes.pp
    dense = per_layer_dense * stage_layers
    if first:
        dense += lm["embedding"] / sizes.tp + counts["vit"] + counts["projector"]
    if last:
        dense += lm["output_head"] / sizes.tp + final_norm
    return dense, per_layer_experts * stage_layers


def lm_layer_bytes(lm, recompute: str, modules=()) -> tuple[float, float]:
    """(kept, working) bytes per token of one LM layer: kept until its backward, and held while it recomputes.

    bf16 values per token: attention 2h (norm in/out) + q + k + v + q-sized core output; MoE 2h (norm in/out) +
    topk * (h dispatched + 2f fc1 out + f SwiGLU out) + 2E fp32 router values. Selective recompute drops a norm's
    output (layernorm), the SwiGLU output (moe_act), or the whole MoE block but its input (moe)."""
    h, f, k = lm.hidden_size, lm.moe_ffn_hidden_size, lm.moe_topk
    norm_out = 2 * h
    attention = 2 * h + norm_out + 2 * 2 * lm.num_heads * lm.head_dim + 2 * 2 * lm.num_kv_heads * lm.head_dim
    moe_inner = 2 * k * (h + 3 * f) + 4 * 2 * lm.num_experts
    moe = 2 * h + norm_out + moe_inner
    if recompute == "full":
        return 2 * h, attention + moe
    if recompute != "selective":
        return attention + moe, 0.0
    names = {str(m) for m in modules}
    kept, working = attention + moe, 0.0
    if "layernorm" in names:
        kept, working = kept - 2 * norm_out, norm_out
    if "moe" in names:
        kept, working = kept - moe_inner, max(working, moe_inner)
    elif "moe_act" in names:
        kept, working = kept - 2 * k * f, max(working, 2 * k * f)
    return kept, working


def vit_patch_bytes(vit, recompute: str, modules=()) -> tuple[float, float]:
    """(kept, working) bytes per patch of one ViT layer: bf16 norms, qkv, core out, fc1 and GELU out (8hv + 2fv)."""
    per_layer = 2 * (8 * vit.hidden_size + 2 * vit.ffn_hidden_size)
    if recompute == "full":
        return 2 * vit.hidden_size, per_layer
    if recompute == "selective" and "layernorm" in {str(m) for m in modules}:
        return per_layer - 2 * 2 * vit.hidden_size, 2 * vit.hidden_size
    return per_layer, 0.0


def context_parallel_layer_bytes(lm, seq_length: int, sizes) -> float:
    """Bytes one LM layer keeps for backward under context parallelism beyond its local rows (per rank).

    The K/V all-gather (model/context_parallel.py) gives each rank the whole sequence's K and V of its TP heads,
    bf16, 2 * 2 * (Hkv / tp) * d per token, which attention keeps for its backward; dense and warm-up attention
    also copy every query segment's keys into one buffer for the varlen kernel (about the sequence once more);
    DSA gathers the indexer keys too (fp32 D_I per token). 0 without CP."""
    cp = getattr(sizes, "cp", 1)
    if cp == 1:
        return 0.0
    kv = 2 * 2 * (lm.num_kv_heads / sizes.tp) * lm.head_dim * seq_length
    if lm.dsa.mode == "sparse":
        return kv + 4 * lm.dsa.index_head_dim * seq_length
    extra = kv * (1 + 1 / (2 * cp))  # the segments' key prefixes: each document plus one chunk
    return kv + extra + (4 * lm.dsa.index_head_dim * seq_length if lm.dsa.mode == "warmup" else 0.0)


def trains(trainable, *parts: str) -> bool:
    """Whether stage.trainable (None: everything) trains any of `parts` (lm, indexer, vit, projector)."""
    return trainable is None or bool(set(parts) & {str(t) for t in trainable})


def trained_counts(counts: dict, trainable) -> dict:
    """`count_parameters`' counts with the parts stage.trainable freezes set to 0: a frozen parameter has no
    main grad in megatron's DDP buffers and no fp32 master or Adam moments in the (distributed) optimizer."""
    out = dict(counts, lm_parts=dict(counts["lm_parts"]))
    for part in ("vit", "projector"):
        if not trains(trainable, part):
            out[part] = 0
    if not trains(trainable, "lm"):
        indexer = counts["lm_parts"]["indexer"] if trains(trainable, "indexer") else 0
        out["lm_parts"] = {name: indexer if name == "indexer" else 0 for name in counts["lm_parts"]}
    return out


def indexer_layer_bytes(lm, tp: int = 1, trainable=None) -> float:
    """Bytes per token one DSA layer's lightning indexer keeps for its backward while it trains (model/dsa.py),
    fp32: the q_proj output (H_I D_I + H_I) and the normalised queries (H_I D_I) of its RMSNorm, the key's
    LayerNorm input (D_I), the RoPE cos/sin of queries and key (2 D_I), and the KL's gradients, computed in its
    forward (H_I D_I + H_I + D_I; kernels/dsa_reference.py). Its input is the attention's norm output, counted by
    `lm_layer_bytes`, except under sequence parallelism, where it is gathered (2h bf16 over the whole sequence).
    The indexer is replicated over TP: none of it is divided by tp. 0 without DSA or when it does not train."""
    if lm.dsa.mode == "dense" or not trains(trainable, "lm", "indexer"):
        return 0.0
    heads, dim = lm.dsa.index_heads, lm.dsa.index_head_dim
    gathered_input = 2 * lm.hidden_size if tp > 1 else 0.0
    return 4 * (3 * heads * dim + 2 * heads + 4 * dim) + gathered_input


def sparse_layer_bytes(lm, tp: int = 1) -> float:
    """Bytes per local token one sparse DSA layer keeps beyond dense attention: the top-k indices (int32; every TP
    rank selects for the whole sequence) and the attention's fp32 LSE per query head of the TP rank."""
    return 4 * lm.dsa.topk + 4 * lm.num_heads / tp if lm.dsa.mode == "sparse" else 0.0


def activation_bytes(
    model: ModelConfig,
    train: TrainConfig,
    sizes,
    first: bool,
    last: bool,
    parallel: ParallelConfig | None = None,
    trainable=None,
) -> float:
    """Rough activation memory kept for backward on one rank (flash-style attention).

    One micro-batch is one packed sequence of s = seq_length tokens (per layer: `lm_layer_bytes`); sequence + tensor
    parallelism divide the LM's share by tp. A layer that recomputes keeps its input and holds its working set
    while it re-runs in backward, one layer at a time.
    First stage, worst case of an all-visual pack (s merged tokens = 4s patches), not TP-sharded: the ViT
    (`vit_patch_bytes`, under parallel.vision.recompute or else parallel.recompute); projector 16*hv per token.
    Last stage: megatron's head keeps fp32 + bf16 logits (6*s*V/tp bytes); the chunked head (model.lm.loss_impl)
    keeps 8 bytes per token and holds (8*chunk*V + 6*V*h)/tp while a chunk runs.
    The 1F1B schedule keeps min(pp, micro-batches) micro-batches in flight on the first stage, one on the last.
    Context parallelism (parallel.cp) divides the LM's tokens per rank by cp and adds the gathered K/V of every
    layer (`context_parallel_layer_bytes`; with full recompute only the running layer's); the ViT and projector
    run on the whole pack on every CP rank, so their share does not shrink. Sparse DSA layers also keep their
    top-k indices (`sparse_layer_bytes`); a DSA layer whose indexer trains keeps the indexer's own tensors
    (`indexer_layer_bytes`, local tokens, not TP-split).
    trainable: stage.trainable (None: everything). A frozen LM still keeps its activations: the LM loss's backward
    runs through it to reach each layer's indexer KL (model/dsa.py IndexerLossInjector; the first stage's input
    is made to require grad). A frozen ViT keeps nothing (no backward reaches it); a frozen ViT under a trained
    projector keeps only the projector's.
    """
    from keye_train.model.builder import vision_recompute

    parallel = parallel or ParallelConfig()
    lm, vit = model.lm, model.vit
    s = train.seq_length
    cp = getattr(sizes, "cp", 1)
    local = s / cp  # the LM's tokens on this rank
    stage_layers = lm.num_layers // sizes.pp
    layer_kept, layer_working = lm_layer_bytes(lm, parallel.recompute, parallel.recompute_modules)
    kept, working = layer_kept * local * stage_layers / sizes.tp, layer_working * local / sizes.tp
    own = sparse_layer_bytes(lm, sizes.tp) + indexer_layer_bytes(lm, sizes.tp, trainable)
    gathered = context_parallel_layer_bytes(lm, s, sizes) + own * local
    if parallel.recompute == "full":
        working += gathered  # only the recomputing layer holds them
    else:
        kept += gathered * stage_layers
    if first:
        patches = 4 * s
        patch_kept, patch_working = vit_patch_bytes(vit, vision_recompute(parallel), parallel.recompute_modules)
        if trains(trainable, "vit"):
            kept += patch_kept * patches * vit.num_layers
            working = max(working, patch_working * patches)
        if trains(trainable, "vit", "projector"):
            kept += 2 * s * 16 * vit.hidden_size
    if last:
        chunk = loss_chunk_tokens(lm)
        if chunk is None:
            kept += (4 + 2) * local * lm.vocab_size / sizes.tp
        else:
            kept += 8 * local
            working = max(
                working, (8 * min(chunk, local) * lm.vocab_size + 6 * lm.vocab_size * lm.hidden_size) / sizes.tp
            )
    microbatches = max(1, train.global_batch // sizes.dp)
    in_flight = min(sizes.pp, microbatches) if first else 1
    return kept * in_flight + working


def memory_per_rank(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, sizes, trainable=None) -> dict:
    """Bytes per rank on the first and the last pipeline stage (the two heaviest).

    Returns {"first_stage": {...}, "last_stage": {...}}, each with params, grads, optimizer, activations,
    total (bytes) and dense_params, expert_params (elements). With the distributed optimizer, optimizer
    state of dense parameters is sharded over DP x CP (megatron's dense data-parallel group includes CP) and of
    expert parameters over expert-DP. trainable: stage.trainable; grads and optimizer state count the trained
    parameters only (`trained_counts`), and it shapes the activations (`activation_bytes`).
    """
    counts = count_parameters(model)
    learned = trained_counts(counts, trainable)
    stages = {}
    for key, first, last in (("first_stage", True, sizes.pp == 1), ("last_stage", sizes.pp == 1, True)):
        dense, experts = _stage_param_elements(model, counts, sizes, first, last)
        trained_dense, trained_experts = _stage_param_elements(model, learned, sizes, first, last)
        dense_shards = sizes.dp * getattr(sizes, "cp", 1) if parallel.distributed_optimizer else 1
        expert_shards = sizes.expert_dp if parallel.distributed_optimizer else 1
        row = {
            "params": (dense + experts) * PARAM_BYTES,
            "grads": (trained_dense + trained_experts) * GRAD_BYTES,
            "optimizer": (trained_dense / dense_shards + trained_experts / expert_shards) * OPTIMIZER_BYTES,
            "activations": activation_bytes(model, train, sizes, first, last, parallel, trainable),
        }
        row["total"] = sum(row.values())
        row.update(dense_params=dense, expert_params=experts)
        stages[key] = row
    return stages


def memory_by_placement(
    model: ModelConfig,
    parallel: ParallelConfig,
    train: TrainConfig,
    sizes,
    placement: str,
    vision_ranks: int = 0,
    vision_tp: int = 1,
) -> dict:
    """Bytes per rank by role when the ViT is placed by `placement` (colocated | split | spread): the
    `memory_per_rank` rows with the vision tower moved to the ranks that run it. `sizes` is the LM's layout
    (its dp counts LM ranks only). Roles: first_stage, last_stage, and under split `vision` (a ViT rank).

    - colocated: `memory_per_rank` as it is (the tower and an all-visual pack's ViT activations, for every
      micro-batch in flight, on every first-stage rank).
    - spread: every rank holds a ViT replica (optimizer state sharded over all ranks) and keeps its share of
      the patches (4 x seq_length per pack, world / dp ranks per pack) of the micro-batches in flight until the
      ViT's backward, plus the working set of one share while it recomputes.
    - split: LM ranks hold no ViT; a ViT rank holds the tower / vision_tp (optimizer state over the ViT DP) and
      its share of the micro-batches in flight, each micro-batch's packs dealt over the ViT groups.
    In flight: min(pp, micro-batches) + 1, the window the simulator (`parallel/simulate.py`) lets the ViT run
    ahead of its backward.
    """
    from keye_train.model.builder import vision_recompute

    base = memory_per_rank(model, parallel, train, sizes)
    if placement == "colocated":
        return base
    counts = count_parameters(model)
    vit_elements = counts["vit"] + counts["projector"]
    vit, s = model.vit, train.seq_length
    kept_per_patch, working_per_patch = vit_patch_bytes(vit, vision_recompute(parallel), parallel.recompute_modules)
    kept_per_patch = kept_per_patch * vit.num_layers + 2 * 16 * vit.hidden_size / 4  # + projector, per patch
    microbatches = max(1, train.global_batch // sizes.dp)
    pack_patches = 4 * s  # an all-visual pack (the activation rule's worst case)
    world = sizes.world
    shards = {"dense": sizes.dp if parallel.distributed_optimizer else 1}

    def without_vit(row: dict, first: bool, last: bool) -> dict:
        dense = row["dense_params"] - (vit_elements if first else 0)
        experts = row["expert_params"]
        expert_shards = sizes.expert_dp if parallel.distributed_optimizer else 1
        out = {
            "params": (dense + experts) * PARAM_BYTES,
            "grads": (dense + experts) * GRAD_BYTES,
            "optimizer": (dense / shards["dense"] + experts / expert_shards) * OPTIMIZER_BYTES,
            "activations": activation_bytes(model, train, sizes, False, last, parallel),
        }
        out["total"] = sum(out.values())
        out.update(dense_params=dense, expert_params=experts)
        return out

    def with_vit(row: dict, elements: float, optimizer_shards: int, kept: float, working: float) -> dict:
        out = dict(row)
        out["params"] += elements * PARAM_BYTES
        out["grads"] += elements * GRAD_BYTES
        out["optimizer"] += elements / optimizer_shards * OPTIMIZER_BYTES
        out["activations"] = out["activations"] + kept + working
        out["total"] = out["params"] + out["grads"] + out["optimizer"] + out["activations"]
        out["vit_params"] = elements
        return out

    rows = {
        key: without_vit(row, first=key == "first_stage", last=key == "last_stage" or sizes.pp == 1)
        for key, row in base.items()
    }
    in_flight = min(sizes.pp, microbatches) + 1
    if placement == "spread":
        share = pack_patches * sizes.dp / world  # one micro-batch's patches per rank
        opt_shards = world if parallel.distributed_optimizer else 1
        return {
            key: with_vit(row, vit_elements, opt_shards, kept_per_patch * share * in_flight, working_per_patch * share)
            for key, row in rows.items()
        }
    if placement != "split":
        raise ValueError(f"placement {placement!r} is not colocated, split or spread")
    if vision_ranks < 1 or vision_ranks % vision_tp:
        raise ValueError(f"split needs vision ranks ({vision_ranks}) that vision tp ({vision_tp}) divides")
    groups = vision_ranks // vision_tp
    share = pack_patches * sizes.dp / groups / vision_tp  # per ViT rank and micro-batch (TP splits the work)
    empty = {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "activations": 0.0, "dense_params": 0.0, "expert_params": 0}
    vision = with_vit(
        empty,
        vit_elements / vision_tp,
        groups if parallel.distributed_optimizer else 1,
        kept_per_patch * share * in_flight,
        working_per_patch * share,
    )
    return {**rows, "vision": vision}


def rollout_cache_bytes(lm, rollout, sizes) -> float:
    """Bytes of the rollout engine's KV cache on one rank (posttrain/rollout/cache.py): per LM layer of the stage,
    K and V [slots, capacity, Hkv / tp, D] in bf16 and, with DSA, the fp32 indexer keys [slots, capacity, D_I]."""
    per_row = 2 * 2 * (lm.num_kv_heads // sizes.tp) * lm.head_dim
    if lm.dsa.mode != "dense":
        per_row += 4 * lm.dsa.index_head_dim
    return (lm.num_layers // sizes.pp) * rollout.slots * rollout.capacity * per_row


def teacher_bytes(cfg, sizes) -> float:
    """bf16 weights on one rank of the largest in-process MOPD teacher (one resident at a time, under the student's
    layout with PP 1: mopd/teachers.py)."""
    from keye_train.config.model import MODEL_PRESETS

    largest = 0.0
    for teacher in cfg.mopd.teachers:
        model = cfg.model if teacher.model == "student" else MODEL_PRESETS[teacher.model]()
        dense, experts = _stage_param_elements(model, count_parameters(model), sizes, first=True, last=True)
        largest = max(largest, (dense + experts) * PARAM_BYTES)
    return largest


def plan_memory(cfg, sizes) -> dict:
    """`memory_per_rank` plus, for RL stages (rl.enabled), a `rollout` column: the training state (params, grads,
    optimizer, all kept while the engine decodes) with the KV cache (`rollout_cache_bytes`) and one prefill chunk's
    layer working set (rollout.prefill_tokens, forward only) as its activations. In-process MOPD adds the resident
    teacher's weights to every column (item `teacher`)."""
    memory = memory_per_rank(cfg.model, cfg.parallel, cfg.train, sizes, cfg.stage.trainable)
    if not cfg.rl.enabled:
        return memory
    first = memory["first_stage"]
    kept, working = lm_layer_bytes(cfg.model.lm, "full")
    rollout = {key: first[key] for key in ("params", "grads", "optimizer", "dense_params", "expert_params")}
    rollout["activations"] = rollout_cache_bytes(cfg.model.lm, cfg.rollout, sizes) + (
        cfg.rollout.prefill_tokens * (kept + working) / sizes.tp
    )
    memory = {**memory, "rollout": rollout}
    teacher = teacher_bytes(cfg, sizes) if cfg.mopd.enabled else None
    for row in memory.values():
        if teacher is not None:
            row["teacher"] = teacher
        row["total"] = row["params"] + row["grads"] + row["optimizer"] + row["activations"] + (teacher or 0.0)
    return memory
