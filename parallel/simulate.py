"""Replay a workload through a placement of the ViT and the LM: step time, bubble fraction, per-role utilization.

Placements (issue 18):
- `pp0`: the ViT on the LM's first pipeline stage (today's `colocated`). Every TP rank of stage 0 encodes its
  replica's whole pack (the tower is unsharded), inside the stage's forward; its backward follows the stage's.
- `split`: V ranks (groups of `vit_tp`) run only the ViT, with their own DP; the LM runs on the other ranks. The
  frames of micro-batch m of every replica are dealt over the ViT groups (level 1); the embeddings go to the
  stage-0 ranks by p2p, the gradients come back after stage 0's backward of m. ViT ranks may run ahead.
- `spread`: every rank, whatever its stage, encodes a share of the step's frames (level 1 over all ranks); an
  all-to-all takes the embeddings of micro-batch m to the stage-0 ranks that own each sample, and the gradients
  back. ViT chunks are fillers: a rank runs them while its pipeline schedule has nothing ready (warm-up and
  cool-down bubbles, waits), the 1F1B work first.
Under split and spread the ViT's forward of micro-batch m waits for the backward of m - (min(pp, M) + 1): the
activations it keeps stay those of a bounded window (`keye_train/planning/memory.py::memory_by_placement`).

The LM runs megatron's 1F1B (warm-up of pp - k - 1 forwards on stage k, steady one-forward-one-backward,
cool-down) on a discrete-event timeline (`parallel/timeline.py`), one resource per TP group. Per micro-batch and
stage, from the cost model (`parallel/costs.py`): the stage's layers (forward; backward + the recompute's forward)
divided by tp x the TP efficiency, plus the EP all-to-all (dispatch + combine per layer and pass, the node-local
and cross-node shares at their link rates), the LM head on the last stage, and the activation p2p between
stages. After the pipeline: the optimizer step (seconds per locally held parameter) and the ViT's gradient
reduction over its replicas (exposed; the LM's is taken as overlapped with the backward, alike in every
placement). The simulator does not model memory (see `keye_train/planning`), the frozen-ViT run-ahead beyond
what the dependencies allow, or network contention between concurrent transfers.

Legality: a layout needs the LM's ranks divisible by tp x pp and by etp x ep x pp, `num_experts % ep == 0`, and
the global batch divisible by the LM's DP size. Split takes the largest multiple of its DP size not above the
asked global batch (and says so); throughput (tokens/s) compares placements, not step time alone.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace

from parallel import balance, costs, timeline

PLACEMENTS = ("pp0", "split", "spread")
BF16 = 2


@dataclass(frozen=True)
class LMLayout:
    tp: int
    pp: int
    ep: int
    etp: int | None = None  # None: tp
    name: str = ""

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def grid(self) -> int:
        """The LM's rank count must be a multiple of this."""
        return math.lcm(self.tp * self.pp, self.expert_tp * self.ep * self.pp)

    def label(self) -> str:
        return self.name or f"tp{self.tp}_pp{self.pp}_ep{self.ep}" + (f"_etp{self.etp}" if self.etp else "")


@dataclass(frozen=True)
class ModelDims:
    """What the simulator needs of the model (defaults: keye_vl2_30b_a3b; `keye-train plan` passes counts)."""

    lm_layers: int = 48
    lm_hidden: int = 2048
    num_experts: int = 128
    moe_topk: int = 8
    vit_heads: int = 16
    merge: int = 2
    vit_params: float = 4.13e8  # ViT + projector
    lm_dense_params: float = 1.55e9  # attention, norms, router, embedding, head
    lm_expert_params: float = 2.90e10


@dataclass(frozen=True)
class Pack:
    """One packed sequence: tokens per document (visual tokens included), patches per image or frame."""

    docs: tuple
    frames: tuple = ()

    @property
    def tokens(self) -> int:
        return sum(self.docs)

    @property
    def patches(self) -> int:
        return sum(self.frames)


@dataclass(frozen=True)
class Workload:
    name: str
    seq_length: int
    global_batch: int
    packs: tuple  # a pool; a step takes global_batch of them (cycling, in a seeded order)
    note: str = ""
    seed: int = 0

    def step_packs(self, count: int) -> list[Pack]:
        order = list(range(len(self.packs)))
        random.Random(self.seed).shuffle(order)
        return [self.packs[order[i % len(order)]] for i in range(count)]


@dataclass(frozen=True)
class Settings:
    lm_recompute: float = 0.4  # share of a layer's forward re-run in backward: full 1.0, selective [moe, norms] ~0.4
    vit_recompute: float = 1.0  # parallel.vision.recompute=full
    vit_trains: bool = True  # False: a frozen ViT (no ViT backward, no embedding gradients)
    gpus_per_node: int = 8
    items_per_rank: int = 32  # level 1 merges a video's equal frames into chunks beyond this many items per rank


@dataclass(frozen=True)
class Plan:
    placement: str
    vit_ranks: int = 0
    vit_tp: int = 1
    vit_over_tp: bool = False  # pp0 only: stage 0's TP ranks share the pack's frames (data-parallel) instead of
    # each encoding all of them (today's unsharded tower): a stronger baseline than the code trains now

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of {PLACEMENTS}")


@dataclass
class Result:
    placement: str
    gpus: int
    layout: str
    vit_ranks: int
    vit_tp: int
    legal: bool
    reason: str = ""
    dp: int = 0
    global_batch: int = 0
    micro_batches: int = 0
    step_time_s: float = float("nan")
    pipeline_s: float = float("nan")
    tail_s: float = 0.0
    tokens_per_s: float = float("nan")
    bubble: float = float("nan")
    utilization: dict = field(default_factory=dict)
    vit_busy_share: float = float("nan")  # the ViT's share of all GPU-seconds busy
    level1_imbalance: float = float("nan")  # worst max/mean of the ViT loads over micro-batches

    def row(self) -> dict:
        return {k: v for k, v in vars(self).items()}


# ---- legality -----------------------------------------------------------------------------------------------------


def layout_check(gpus: int, layout: LMLayout, dims: ModelDims, global_batch: int) -> tuple[bool, str, int, int]:
    """(legal, why not, dp, global batch used) for an LM on `gpus` ranks."""
    if dims.num_experts % layout.ep:
        return False, f"ep {layout.ep} does not divide {dims.num_experts} experts", 0, 0
    if gpus <= 0 or gpus % layout.grid:
        return False, f"{gpus} LM ranks are not a multiple of {layout.grid} (tp*pp, etp*ep*pp)", 0, 0
    if dims.lm_layers % layout.pp:
        return False, f"pp {layout.pp} does not divide {dims.lm_layers} layers", 0, 0
    dp = gpus // (layout.tp * layout.pp)
    used = (global_batch // dp) * dp
    if used == 0:
        return False, f"global batch {global_batch} < LM DP {dp}", dp, 0
    return True, "", dp, used


def split_ranks(gpus: int, layout: LMLayout, dims: ModelDims, vit_tp: int = 1, max_share: float = 0.5) -> list[int]:
    """The ViT rank counts that leave a legal LM (at most max_share of the ranks)."""
    out = []
    for v in range(vit_tp, int(gpus * max_share) + 1, vit_tp):
        if layout_check(gpus - v, layout, dims, 1 << 30)[0] and dims.vit_heads % vit_tp == 0:
            out.append(v)
    return out


# ---- per-micro-batch costs -------------------------------------------------------------------------------------------


def _alltoall_s(rates: costs.Rates, nbytes: float, peers: int, peers_in_node: int) -> float:
    """An all-to-all where each rank sends `nbytes` in all, evenly over `peers` ranks (itself included)."""
    if peers <= 1 or nbytes <= 0:
        return 0.0
    away = nbytes * (peers - 1) / peers
    off_node = away * max(0, peers - peers_in_node) / (peers - 1)
    on_node = away - off_node
    return max(rates.intra_node.time(on_node), rates.inter_node.time(off_node))


def lm_stage_seconds(
    rates: costs.Rates, dims: ModelDims, layout: LMLayout, settings: Settings, pack: Pack, stage: int
) -> tuple[float, float]:
    """(forward, backward incl. recompute) of one stage of one TP group on `pack`."""
    lm, rc = rates.lm, settings.lm_recompute
    layers = dims.lm_layers / layout.pp
    speed = layout.tp * rates.tp_efficiency if layout.tp > 1 else 1.0
    docs = list(pack.docs)
    fwd = lm.layer_fwd(docs)
    bwd = max(0.0, lm.layer_fwd_bwd(docs) - fwd) + rc * fwd
    f, b = layers * fwd / speed, layers * bwd / speed
    if stage == layout.pp - 1:  # embedding is small; the head + CE are on the last stage, vocab-split over TP
        hf = lm.ends_fwd(docs)
        f += hf / speed
        b += max(0.0, lm.ends_fwd_bwd(docs) - hf) / speed
    if layout.ep > 1:  # dispatch + combine of top-k rows per layer and pass
        nbytes = 2 * pack.tokens / layout.tp * dims.moe_topk * dims.lm_hidden * BF16
        peers_in_node = min(layout.ep, max(1, settings.gpus_per_node // layout.expert_tp))
        a2a = _alltoall_s(rates, nbytes, layout.ep, peers_in_node)
        f += layers * a2a
        b += layers * a2a * (2.0 if rc > 0 else 1.0)  # selective/full recompute re-runs the MoE's dispatch
    return f, b


def activation_p2p_s(rates: costs.Rates, dims: ModelDims, layout: LMLayout, pack: Pack, inter_node: bool) -> float:
    """One stage's output (sequence-parallel shard) to the next stage."""
    return rates.link(inter_node).time(pack.tokens / layout.tp * dims.lm_hidden * BF16)


def vit_frame_seconds(rates: costs.Rates, settings: Settings, patches: int) -> tuple[float, float]:
    """(forward, backward incl. recompute) of one frame through the whole tower, per-call fixed costs excluded."""
    v, rc = rates.vit, settings.vit_recompute

    def bare(term: costs.Term) -> float:
        return term([patches]) - term.fixed_s

    fwd = v.layers * bare(v.layer_fwd) + bare(v.ends_fwd)
    total = v.layers * (bare(v.layer_fwd_bwd) + rc * bare(v.layer_fwd)) + bare(v.ends_fwd_bwd)
    return fwd, max(0.0, total - fwd)


def vit_call_fixed(rates: costs.Rates, settings: Settings) -> tuple[float, float]:
    v, rc = rates.vit, settings.vit_recompute
    fwd = v.layers * v.layer_fwd.fixed_s + v.ends_fwd.fixed_s
    total = v.layers * (v.layer_fwd_bwd.fixed_s + rc * v.layer_fwd.fixed_s) + v.ends_fwd_bwd.fixed_s
    return fwd, max(0.0, total - fwd)


def vit_pack_seconds(rates: costs.Rates, settings: Settings, pack: Pack) -> tuple[float, float]:
    if not pack.frames:
        return 0.0, 0.0
    f0, b0 = vit_call_fixed(rates, settings)
    f = b = 0.0
    for p, n in Counter(pack.frames).items():
        ff, bb = vit_frame_seconds(rates, settings, p)
        f, b = f + n * ff, b + n * bb
    return f + f0, b + b0


def pack_cost(rates, dims, layout, settings, pack: Pack, placement: str) -> float:
    """Level 2's cost of a pack on a replica: its slowest stage's forward + backward (the ViT on stage 0 under
    pp0; elsewhere the ViT is balanced over other ranks by level 1)."""
    stages = [sum(lm_stage_seconds(rates, dims, layout, settings, pack, k)) for k in range(layout.pp)]
    if placement == "pp0":
        stages[0] += sum(vit_pack_seconds(rates, settings, pack))
    return max(stages)


def pipeline_patch_cost(rates, dims, layout, settings, placement: str, frame_patches: int = 1024) -> float:
    """The data pipeline's linear `patch_cost` (a patch's compute in LM tokens) that approximates `pack_cost` on
    the bottleneck stage: under pp0 a patch costs the ViT's per-patch seconds against the stage's per-token
    seconds; under split and spread the ViT is not on the replica (0)."""
    if placement != "pp0":
        return 0.0
    f, b = vit_frame_seconds(rates, settings, frame_patches)
    per_patch = (f + b) / frame_patches
    t = 4096
    per_token = sum(lm_stage_seconds(rates, dims, layout, settings, Pack((t,)), 0)) / t
    return per_patch / per_token if per_token > 0 else 0.0


# ---- level 1 items ---------------------------------------------------------------------------------------------------


def _items(packs: list[Pack], rates, settings, ranks: int) -> list[tuple[float, float, int]]:
    """(forward s, backward s, patches) per item of the frames of `packs`; runs of equal frames of one pack are
    merged into chunks when there would be more than items_per_rank items per rank."""
    frames = [(p, f) for p in packs for f in p.frames]
    limit = max(1, settings.items_per_rank * ranks)
    group = max(1, math.ceil(len(frames) / limit))
    out = []
    memo: dict = {}
    for pack in packs:
        run, size = 0, None
        for f in list(pack.frames) + [None]:
            if f == size and run < group:
                run += 1
                continue
            if size is not None:
                if size not in memo:
                    memo[size] = vit_frame_seconds(rates, settings, size)
                ff, bb = memo[size]
                out.append((ff * run, bb * run, size * run))
            run, size = 1, f
    return out


def _deal_frames(packs, rates, settings, groups: int, members: int, speed: float):
    """Level 1 over groups x members ranks; per group (fwd s, bwd s, embedding bytes out) and the imbalance."""
    items = _items(packs, rates, settings, groups * members)
    ranks = groups * members
    assignment, load = balance.assign_frames([f + b for f, b, _ in items], ranks)
    f0, b0 = vit_call_fixed(rates, settings)
    per_group = []
    for g in range(groups):
        mine = assignment[g * members : (g + 1) * members]
        fwd = max((sum(items[i][0] for i in ix) for ix in mine), default=0.0)
        bwd = max((sum(items[i][1] for i in ix) for ix in mine), default=0.0)
        patches = sum(items[i][2] for ix in mine for i in ix)
        busy = any(ix for ix in mine)
        per_group.append(((fwd + f0) / speed if busy else 0.0, (bwd + b0) / speed if busy else 0.0, patches))
    mean = sum(load) / len(load) if load else 0.0
    imbalance = max(load) / mean if mean > 0 else 1.0
    return per_group, imbalance


# ---- the timeline ----------------------------------------------------------------------------------------------------


def one_f_one_b(stage: int, stages: int, micro: int) -> list[tuple[str, int]]:
    """megatron's 1F1B order on `stage`: ("F", m) / ("B", m)."""
    warm = min(stages - stage - 1, micro)
    order = [("F", m) for m in range(warm)]
    for i in range(micro - warm):
        order += [("F", warm + i), ("B", i)]
    order += [("B", m) for m in range(micro - warm, micro)]
    return order


def simulate(
    rates: costs.Rates,
    gpus: int,
    layout: LMLayout,
    workload: Workload,
    plan: Plan,
    dims: ModelDims = ModelDims(),
    settings: Settings = Settings(),
) -> Result:
    lm_ranks = gpus - (plan.vit_ranks if plan.placement == "split" else 0)
    name = "pp0_vit_dp" if plan.placement == "pp0" and plan.vit_over_tp else plan.placement
    result = Result(name, gpus, layout.label(), plan.vit_ranks, plan.vit_tp, False)
    if plan.placement == "split":
        if not 0 < plan.vit_ranks < gpus or plan.vit_ranks % plan.vit_tp or dims.vit_heads % plan.vit_tp:
            result.reason = f"{plan.vit_ranks} ViT ranks (vit tp {plan.vit_tp}) do not fit {gpus} GPUs"
            return result
    elif plan.vit_ranks:
        result.reason = f"{plan.placement} takes no dedicated ViT ranks"
        return result
    legal, why, dp, batch = layout_check(lm_ranks, layout, dims, workload.global_batch)
    if not legal:
        result.reason = ("split: " if plan.placement == "split" else "") + why
        return result
    if batch != workload.global_batch:
        result.reason = f"global batch {workload.global_batch} -> {batch} (a multiple of DP {dp})"
    micro = batch // dp
    pp = layout.pp
    packs = workload.step_packs(batch)
    # level 2: packs over replicas by the placement's cost, each replica's in the step's order, as the trainer
    # runs them (the data pipeline's deal keeps it)
    cost = [pack_cost(rates, dims, layout, settings, p, plan.placement) for p in packs]
    replicas = [[packs[i] for i in ix] for ix in balance.deal_equal_counts(cost, dp)]

    tasks: list[timeline.Task] = []
    orders: dict = {}
    trains = settings.vit_trains

    def pp0_vit(pack: Pack) -> tuple[float, float]:
        if not plan.vit_over_tp or layout.tp == 1:
            return vit_pack_seconds(rates, settings, pack)
        per_group, _ = _deal_frames([pack], rates, settings, 1, layout.tp, 1.0)
        return per_group[0][0], per_group[0][1]

    # megatron's rank order puts pp outermost: a stage is a block of lm_ranks / pp ranks, so adjacent stages sit
    # on different nodes once a stage fills a node
    stage_crosses = lm_ranks // pp >= settings.gpus_per_node
    for d in range(dp):
        for k in range(pp):
            res = ("lm", d, k)
            order = []
            for kind, m in one_f_one_b(k, pp, micro):
                pack = replicas[d][m]
                f, b = lm_stage_seconds(rates, dims, layout, settings, pack, k)
                hop = activation_p2p_s(rates, dims, layout, pack, stage_crosses)
                key = (kind, d, k, m)
                if kind == "F":
                    deps = [(("F", d, k - 1, m), hop)] if k > 0 else []
                    if k == 0 and plan.placement == "pp0" and pack.frames:
                        vf, vb = pp0_vit(pack)
                        tasks.append(timeline.Task(("vitF", d, m), res, vf, [], kind="vit"))
                        order.append(("vitF", d, m))
                        deps.append((("vitF", d, m), 0.0))
                    elif k == 0 and plan.placement != "pp0":
                        deps.append((("sync_f", m), 0.0))
                    tasks.append(timeline.Task(key, res, f, deps, kind="lm"))
                    order.append(key)
                else:
                    deps = [(("F", d, k, m), 0.0)]
                    if k < pp - 1:
                        deps.append((("B", d, k + 1, m), hop))
                    tasks.append(timeline.Task(key, res, b, deps, kind="lm"))
                    order.append(key)
                    if k == 0 and plan.placement == "pp0" and pack.frames and trains:
                        vf, vb = pp0_vit(pack)
                        tasks.append(timeline.Task(("vitB", d, m), res, vb, [(key, 0.0)], kind="vit"))
                        order.append(("vitB", d, m))
            orders[res] = order

    imbalance = 1.0
    if plan.placement in ("split", "spread"):
        # deadlines: when stage 0 would start each micro-batch with no ViT at all (a first, LM-only pass)
        lm_only = [replace(t, deps=[dep for dep in t.deps if dep[0][0] != "sync_f"]) for t in tasks if t.kind == "lm"]
        bare = timeline.run(lm_only, orders)
        due = [min(bare.tasks[("F", d, 0, m)].start for d in range(dp)) for m in range(micro)]
        if plan.placement == "split":
            # a group of vit_tp ranks runs each of its frames tensor-parallel
            groups, members = plan.vit_ranks // plan.vit_tp, 1
            speed = plan.vit_tp * rates.tp_efficiency if plan.vit_tp > 1 else 1.0
            group_res = [("vit", g) for g in range(groups)]
        else:
            groups, members, speed = dp * pp, layout.tp, 1.0
            group_res = [("lm", d, k) for d in range(dp) for k in range(pp)]
        worst = 1.0
        window = min(pp, micro) + 1
        for m in range(micro):
            batch_m = [replicas[d][m] for d in range(dp)]
            per_group, imb = _deal_frames(batch_m, rates, settings, groups, members, speed)
            worst = max(worst, imb)
            visual_tokens = sum(p.patches for p in batch_m) / dims.merge**2
            recv = max(p.patches for p in batch_m) / dims.merge**2 / layout.tp * dims.lm_hidden * BF16
            send = max(g[2] for g in per_group) / dims.merge**2 * dims.lm_hidden * BF16 / members
            crosses = gpus > settings.gpus_per_node
            if plan.placement == "spread":
                xfer = max(_alltoall_s(rates, send, gpus, settings.gpus_per_node), rates.link(crosses).time(recv))
            else:
                xfer = max(rates.link(crosses).time(send), rates.link(crosses).time(recv))
            if visual_tokens == 0:
                xfer = 0.0
            fdeps = []
            # the ViT runs at most `window` micro-batches ahead of its backward (what it keeps for it)
            ahead = [(("sync_b", m - window), 0.0)] if trains and m >= window else []
            for g, (vf, _, _) in enumerate(per_group):
                task = timeline.Task(("vitF", g, m), group_res[g], vf, ahead, True, (m, 0), "vit", due[m] - xfer)
                tasks.append(task)
                fdeps.append((("vitF", g, m), 0.0))
            tasks.append(timeline.Task(("sync_f", m), None, xfer, fdeps, kind="xfer"))
            if trains:
                bdeps = [(("B", d, 0, m), 0.0) for d in range(dp)]
                tasks.append(timeline.Task(("sync_b", m), None, xfer, bdeps, kind="xfer"))
                # the window: this backward frees the room micro-batch m + window's forward needs
                later = due[m + window] - xfer - 2 * max(v[0] for v in per_group) if m + window < micro else math.inf
                for g, (_, vb, _) in enumerate(per_group):
                    task = timeline.Task(("vitB", g, m), group_res[g], vb, [(("sync_b", m), 0.0)], True, (m, 1), "vit")
                    task.deadline = later
                    tasks.append(task)
        imbalance = worst
        for r in group_res:
            orders.setdefault(r, [])
    tl = timeline.run(tasks, orders)

    # after the pipeline: the ViT's gradient reduction (exposed) and the optimizer step
    vit_grad = dims.vit_params * BF16
    if plan.placement == "pp0":
        vit_replicas, vit_shard = dp, dims.vit_params / dp
    elif plan.placement == "spread":
        vit_replicas, vit_shard = gpus, dims.vit_params / gpus
    else:
        vit_replicas = plan.vit_ranks // plan.vit_tp
        vit_shard = dims.vit_params / plan.vit_ranks
        vit_grad /= plan.vit_tp
    ring = 2 * (vit_replicas - 1) / vit_replicas * vit_grad if vit_replicas > 1 and trains else 0.0
    vit_sync = rates.link(gpus > settings.gpus_per_node).time(ring) if ring else 0.0
    expert_dp = max(1, lm_ranks // (layout.expert_tp * layout.ep * pp))
    lm_opt = rates.optimizer_s_per_param * (
        dims.lm_dense_params / (layout.tp * pp * dp)
        + dims.lm_expert_params / (layout.expert_tp * layout.ep * pp * expert_dp)
    )
    vit_opt = rates.optimizer_s_per_param * vit_shard if trains else 0.0
    tails = {}
    for res, end in tl.finish.items():
        tail = 0.0
        if res[0] == "lm":
            tail += lm_opt
            if plan.placement == "spread" or (plan.placement == "pp0" and res[2] == 0):
                tail += vit_sync + vit_opt
        else:
            tail += vit_sync + vit_opt
        tails[res] = end + tail
    step = max(tails.values()) if tails else tl.makespan
    # utilization: GPU-weighted busy share of the pipeline's span
    weight = {res: (layout.tp if res[0] == "lm" else plan.vit_tp) for res in tl.finish}
    gpu_seconds = sum(weight[r] * tl.busy.get(r, 0.0) for r in weight)
    vit_seconds = sum(weight[t.resource] * t.duration for t in tl.tasks.values() if t.kind == "vit")
    util: dict = {}
    for res in tl.finish:
        role = f"lm_stage{res[2]}" if res[0] == "lm" else "vit"
        util.setdefault(role, []).append(tl.utilization(res))
    result.legal = True
    result.dp, result.global_batch, result.micro_batches = dp, batch, micro
    result.pipeline_s, result.step_time_s, result.tail_s = tl.makespan, step, step - tl.makespan
    result.tokens_per_s = sum(p.tokens for p in packs) / step
    result.bubble = 1.0 - gpu_seconds / (gpus * tl.makespan) if tl.makespan > 0 else 0.0
    result.utilization = {role: sum(v) / len(v) for role, v in sorted(util.items())}
    result.vit_busy_share = vit_seconds / gpu_seconds if gpu_seconds else 0.0
    result.level1_imbalance = imbalance
    return result


def compare(
    rates: costs.Rates,
    gpus: int,
    layout: LMLayout,
    workload: Workload,
    dims: ModelDims = ModelDims(),
    settings: Settings = Settings(),
    vit_ranks: list[int] | None = None,
    vit_tp: int = 1,
    max_candidates: int = 6,
    max_share: float = 0.3,
) -> dict:
    """pp0 (and pp0_vit_dp, its ViT data-parallel over stage 0's TP ranks), split at up to max_candidates legal
    ViT rank counts up to max_share of the GPUs, thinned evenly (or `vit_ranks`), and spread:
    {"pp0", "pp0_vit_dp", "spread": Result, "split": the best legal split or an illegal Result with its reason,
    "split_all": [Result]}. Compare by tokens/s (split may train a smaller global batch)."""
    pp0 = simulate(rates, gpus, layout, workload, Plan("pp0"), dims, settings)
    pp0_dp = simulate(rates, gpus, layout, workload, Plan("pp0", vit_over_tp=True), dims, settings)
    spread = simulate(rates, gpus, layout, workload, Plan("spread"), dims, settings)
    candidates = vit_ranks
    if candidates is None:  # the legal counts up to max_share, thinned evenly to max_candidates (both ends kept)
        legal_counts = split_ranks(gpus, layout, dims, vit_tp, max_share)
        if len(legal_counts) > max_candidates > 1:
            step = (len(legal_counts) - 1) / (max_candidates - 1)
            legal_counts = sorted({legal_counts[round(i * step)] for i in range(max_candidates)})
        candidates = legal_counts
    splits = [simulate(rates, gpus, layout, workload, Plan("split", v, vit_tp), dims, settings) for v in candidates]
    legal = [s for s in splits if s.legal]
    if legal:
        best = max(legal, key=lambda r: r.tokens_per_s)
    else:
        best = Result("split", gpus, layout.label(), 0, vit_tp, False)
        best.reason = (
            splits[0].reason
            if splits
            else f"no ViT rank count leaves a legal LM: LM ranks must be a multiple of {layout.grid}"
            f" (tp*pp={layout.tp * layout.pp}, etp*ep*pp={layout.expert_tp * layout.ep * layout.pp})"
        )
    return {"pp0": pp0, "pp0_vit_dp": pp0_dp, "split": best, "spread": spread, "split_all": splits}


def with_recompute(settings: Settings, lm: str, modules=(), vit: str | None = None) -> Settings:
    """Settings from the config's recompute names: full 1.0, selective with moe ~0.4 (norms only ~0.05), none 0."""

    def share(mode: str, mods) -> float:
        if mode == "full":
            return 1.0
        if mode == "selective":
            names = {str(m) for m in mods}
            return (0.35 if "moe" in names else 0.12 if "moe_act" in names else 0.0) + (
                0.05 if "layernorm" in names else 0.0
            )
        return 0.0

    return replace(settings, lm_recompute=share(lm, modules), vit_recompute=share(vit or lm, modules))
