"""Choosing where the ViT runs: workload profiles, the cost-model comparison of pp0 / split / spread, and the
memory each placement puts on stage 0 (`keye-train plan ... parallel.placement=auto`).

Profiles come from shards (the data pipeline's planner packs an index without decoding a byte; each planned
sample's frames are re-derived from its probed metadata under the stage budget) or are synthetic
(`synthetic_profile`: patches and tokens per sample, for the hour-long cases no corpus here holds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from parallel import costs
from parallel.simulate import LMLayout, ModelDims, Pack, Settings, Workload, compare, with_recompute

# the config's name of each placement, and the simulator's
CONFIG_TO_SIM = {"colocated": "pp0", "split": "split", "spread": "spread"}
SIM_TO_CONFIG = {v: k for k, v in CONFIG_TO_SIM.items()}


# ---- profiles ----------------------------------------------------------------------------------------------------


def sample_frames(entry: dict, budget, tokenizer) -> list[int]:
    """Patches per image / video frame of one indexed sample under `budget` (as the decoder will cut them)."""
    from data_pipeline.encode import MERGE
    from data_pipeline.sizing import FACTOR, plan_video

    frames: list[int] = []
    media = entry["media"].values()
    videos = sum(m["type"] == "video" for m in media)
    for meta in media:
        if meta["type"] == "image":
            h, w = budget.image.resize(meta["height"], meta["width"])
            frames.append((h // FACTOR) * (w // FACTOR) * MERGE * MERGE)
        else:
            plan = plan_video(meta["duration"], meta["fps"], meta["height"], meta["width"], budget.video, videos)
            frames += [plan.tokens_per_frame * MERGE * MERGE] * len(plan.times)
    return frames


def profile_from_shards(
    data, seq_length: int, packs: int, global_batch: int, seed: int = 0, name: str = ""
) -> Workload:
    """`packs` packs planned from `data.shards` (a DataConfig) at `seq_length`, no media read."""
    from data_pipeline.loader import data_sources, media_budget
    from data_pipeline.planner import PackingConfig, PackPlanner
    from data_pipeline.shards import ShardMixture
    from data_pipeline.tokenizer import KeyeTokenizer

    tokenizer = KeyeTokenizer(data.tokenizer)
    roots, weights = data_sources(data)
    shards = ShardMixture(roots, tokenizer.fingerprint, verify=False)
    budget = media_budget(data)
    config = PackingConfig(
        seq_length=seq_length,
        open_packs=data.open_packs,
        long_sample_tokens=data.long_sample_tokens,
        long_short_ratio=tuple(data.long_short_ratio),
        source_weights=weights if len(roots) > 1 else (),
    )
    planner = PackPlanner(shards, tokenizer, budget, config, seed)
    out = []
    for _ in range(packs):
        pack = planner.next_pack()
        docs, frames = [], []
        for s in pack.samples:
            docs.append(s.tokens)
            if s.part < 0 and s.patches:
                frames += sample_frames(shards.entry(s.shard, s.sample), budget, tokenizer)
        out.append(Pack(tuple(docs), tuple(frames)))
    return Workload(name or f"shards:{roots[0]}", seq_length, global_batch, tuple(out), note="planned from shards")


@dataclass(frozen=True)
class SampleKind:
    """A synthetic sample: `frames` frames of `frame_patches` patches (an image: 1 frame), `text` text tokens."""

    weight: float
    frames: int
    frame_patches: int
    text: int

    def tokens(self, merge: int = 2) -> int:
        return self.text + self.frames * (self.frame_patches // (merge * merge) + (6 if self.frames > 1 else 2))


def synthetic_profile(
    name: str, kinds: list[SampleKind], seq_length: int, global_batch: int, packs: int = 64, seed: int = 0, note=""
) -> Workload:
    """Packs of `seq_length` filled first-fit with samples drawn by weight (a sample longer than a pack is cut
    to fit: its frames first)."""
    rng = random.Random(seed)
    weights = [k.weight for k in kinds]
    out = []
    for _ in range(packs):
        docs, frames, room = [], [], seq_length
        misses = 0
        while room > 0 and misses < 8:
            kind = rng.choices(kinds, weights)[0]
            n = kind.frames
            per_frame = kind.frame_patches // 4 + (6 if n > 1 else 2)
            while n > 0 and kind.text + n * per_frame > room:
                n -= 1
            if n == 0 and kind.frames:
                misses += 1
                continue
            tokens = min(room, kind.text + n * per_frame)
            if tokens <= 0:
                misses += 1
                continue
            docs.append(tokens)
            frames += [kind.frame_patches] * n
            room -= tokens
        if room > 0:
            docs.append(room)  # the packer's trailing padding document
        out.append(Pack(tuple(docs), tuple(frames)))
    return Workload(name, seq_length, global_batch, tuple(out), note=note, seed=seed)


# patches per frame: images up to 4096 (64 x 64), video frames 256-1024 (64-256 merged tokens)
STANDARD_MIXES = {
    "image_heavy": dict(
        kinds=[
            SampleKind(6, 1, 1024, 120),
            SampleKind(3, 1, 4096, 200),
            SampleKind(1, 1, 16384, 300),
            SampleKind(2, 0, 0, 2000),
        ],
        seq_length=32768,
        global_batch=1024,
        note="Stage 1 32K: recaptioned images (1K-16K patches each), some text",
    ),
    "mixed": dict(
        kinds=[SampleKind(4, 1, 2304, 150), SampleKind(3, 30, 1024, 200), SampleKind(3, 0, 0, 3000)],
        seq_length=32768,
        global_batch=1024,
        note="Stage 1 32K: images, 15 s clips (30 frames x 1024 patches), text",
    ),
    "video_heavy": dict(
        kinds=[SampleKind(8, 30, 1024, 250), SampleKind(1, 1, 2304, 150), SampleKind(1, 0, 0, 1500)],
        seq_length=32768,
        global_batch=1024,
        note="Stage 1 32K: 15 s clips at the 24K video budget (30 x 1024 patches), like the demo corpus",
    ),
    "long_video": dict(
        kinds=[SampleKind(8, 900, 256, 400), SampleKind(2, 0, 0, 3000)],
        seq_length=65536,
        global_batch=512,
        note="Stage 2 64K: 15 min videos at the 64K budget (900 frames x 256 patches)",
    ),
    "hour_video": dict(
        kinds=[SampleKind(9, 2880, 256, 600), SampleKind(1, 0, 0, 8000)],
        seq_length=262144,
        global_batch=128,
        note="Stage 3 256K: hour-long videos at the 180K budget (2880 frames x 256 patches), dense attention",
    ),
}


def standard_profile(name: str, packs: int = 64, seed: int = 0) -> Workload:
    spec = dict(STANDARD_MIXES[name])
    return synthetic_profile(name, spec.pop("kinds"), packs=packs, seed=seed, **spec)


# ---- the choice ----------------------------------------------------------------------------------------------------


def model_dims(model) -> ModelDims:
    from keye_train.planning.parameters import count_parameters

    counts = count_parameters(model)
    lm = counts["lm_parts"]
    return ModelDims(
        lm_layers=model.lm.num_layers,
        lm_hidden=model.lm.hidden_size,
        num_experts=model.lm.num_experts,
        moe_topk=model.lm.moe_topk,
        vit_heads=model.vit.num_heads,
        merge=model.projector.merge,
        vit_params=float(counts["vit"] + counts["projector"]),
        lm_dense_params=float(counts["lm"] - lm["experts"]),
        lm_expert_params=float(lm["experts"]),
    )


def layout_of(par) -> LMLayout:
    return LMLayout(par.tp, par.pp, par.ep, par.etp)


def settings_of(par, trains_vit: bool = True) -> Settings:
    vision = par.vision.recompute if par.vision.recompute is not None else par.recompute
    return with_recompute(Settings(vit_trains=trains_vit), str(par.recompute), par.recompute_modules, str(vision))


def choose(
    rates: costs.Rates,
    gpus: int,
    layout: LMLayout,
    workload: Workload,
    dims: ModelDims,
    settings: Settings,
    vit_tp: int = 1,
    min_gain: float = 1.02,
) -> dict:
    """Compare the placements; the pick is the fastest by tokens/s, pp0 unless another beats it by min_gain."""
    results = compare(rates, gpus, layout, workload, dims, settings, vit_tp=vit_tp)
    base = results["pp0"]
    best, why = "pp0", "the baseline"
    for name in ("split", "spread"):
        r = results[name]
        if (
            r.legal
            and base.legal
            and r.tokens_per_s > results[best].tokens_per_s
            and (r.tokens_per_s >= min_gain * base.tokens_per_s)
        ):
            best = name
    if best == "pp0":
        others = [n for n in ("split", "spread") if results[n].legal]
        why = f"no placement beats pp0 by {min_gain:.2f}x" if others else "split and spread are not legal here"
    else:
        why = f"{results[best].tokens_per_s / base.tokens_per_s:.2f}x colocated's tokens/s"
    return {"results": results, "choice": best, "why": why}
