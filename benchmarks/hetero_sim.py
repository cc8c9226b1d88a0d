"""The heterogeneous ViT/LM placements on the simulator: pp0 (today's colocated), split and spread, over cluster
sizes and workload mixes, from the calibrated per-layer rates.

    python3 benchmarks/hetero_sim.py [--gpus 8,64,256,1024] [--mixes demo_shards,video_heavy,...] [--rates h200]

Workloads: `demo_shards` is planned from the `keye-data demo` corpus by the data pipeline's planner (no media
decoded; frames from the probed metadata under the Stage 1 budget); the others are synthetic mixes
(`keye_train/planning/placement.py::STANDARD_MIXES`: image-heavy to hour-long-video-heavy, patches and tokens per
sample). LM layouts come from recipes/parallel/*.yaml, DP scaled: 8 GPUs `ep8_node` (tp1 pp1 ep8, full recompute);
64+ GPUs `tp4_pp4_ep8` (selective [moe, layernorm], ViT full). Its expert TP 4 needs LM ranks in multiples of
128 (etp 4 x ep 8 x pp 4), so 64 GPUs and every split use it with etp 1 as well (`tp4_pp4_ep8_etp1`: multiples
of 32). Each mix keeps its stage's global batch (Stage 1: 1024 x 32K, Stage 2: 512 x 64K, Stage 3: 128 x 256K).
Rows: {gpus, mix, layout, placement, step_time_s, tokens_per_s, speedup_vs_pp0 (tokens/s), bubble, vit_ranks,
stage0_memory_gib, ...} to benchmarks/results/hetero_sim.json with the rates' provenance.
`pp0_vit_dp` is pp0 with the ViT data-parallel over stage 0's TP ranks (not what the code trains today: its tower
is unsharded, so each TP rank encodes the whole pack): a stronger baseline, shown for honesty.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_result  # noqa: E402
from parallel import costs  # noqa: E402
from parallel.simulate import LMLayout, compare  # noqa: E402

STAGE_RECIPE = {32768: "stage1_pretrain", 65536: "stage2_multitask", 262144: "stage3_longcontext"}


def layouts_for(gpus: int) -> list[tuple[str, LMLayout, list[str]]]:
    """(recipe parallel group, layout, overrides) per cluster size."""
    if gpus <= 8:
        return [("ep8_node", LMLayout(1, 1, 8, name="ep8_node"), ["parallel=ep8_node"])]
    out = [("tp4_pp4_ep8_etp1", LMLayout(4, 4, 8, 1), ["parallel=tp4_pp4_ep8", "parallel.etp=1"])]
    if gpus % 128 == 0:
        out.insert(0, ("tp4_pp4_ep8", LMLayout(4, 4, 8), ["parallel=tp4_pp4_ep8"]))
    return out


def config_for(seq_length: int, gpus: int, overrides: list[str], global_batch: int):
    from keye_train.config.compose import load_checked_config

    ov = [
        f"recipe={STAGE_RECIPE[seq_length]}",
        "launch=local",
        *overrides,
        f"parallel.nproc={gpus}",
        f"train.global_batch={global_batch}",
    ]
    return load_checked_config(ov, world=gpus, check_data=False)


def stage0_memory(cfg, sizes, result) -> float:
    """GiB on a first-stage LM rank under the row's placement (keye_train/planning/memory.py)."""
    from keye_train.planning.memory import GIB, memory_by_placement
    from parallel.layout import LayoutSizes

    name = {"pp0": "colocated", "pp0_vit_dp": "colocated"}.get(result.placement, result.placement)
    if name == "split":
        lm = result.gpus - result.vit_ranks
        tp, pp = sizes.tp, sizes.pp
        sizes = LayoutSizes(
            result.gpus,
            tp,
            pp,
            sizes.ep,
            sizes.etp,
            lm // (tp * pp),
            lm // (sizes.etp * sizes.ep * pp),
            result.vit_ranks,
        )
        train = dataclasses.replace(cfg.train, global_batch=result.global_batch)
        memory = memory_by_placement(cfg.model, cfg.parallel, train, sizes, "split", result.vit_ranks, result.vit_tp)
        return memory["first_stage"]["total"] / GIB, memory["vision"]["total"] / GIB
    memory = memory_by_placement(cfg.model, cfg.parallel, cfg.train, sizes, name)
    return memory["first_stage"]["total"] / GIB, None


def workloads(names: list[str], data: Path, packs: int):
    from keye_train.planning.placement import profile_from_shards, standard_profile

    out = []
    for name in names:
        if name == "demo_shards":
            import subprocess

            if not (data / "shards" / "index.json").exists():
                subprocess.run([sys.executable, "-m", "data_pipeline.cli", "demo", "--out", str(data)], check=True)
            cfg = config_for(32768, 128, ["parallel=tp4_pp4_ep8"], 1024)[0]
            cfg = dataclasses.replace(
                cfg,
                data=dataclasses.replace(cfg.data, shards=str(data / "shards"), tokenizer=str(data / "tokenizer.json")),
            )
            w = profile_from_shards(cfg.data, 32768, packs, 1024, name="demo_shards")
            out.append(dataclasses.replace(w, note="keye-data demo corpus, planned at 32K under the Stage 1 budget"))
        else:
            out.append(standard_profile(name, packs=packs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="8,64,256,1024")
    parser.add_argument("--mixes", default="image_heavy,mixed,demo_shards,video_heavy,long_video,hour_video")
    parser.add_argument("--rates", default="h200", help="parallel/calibration/<name>.json or a path")
    parser.add_argument("--packs", type=int, default=64, help="packs per profile pool")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "keye_demo_data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hetero_sim.json")
    args = parser.parse_args()
    from keye_train.planning.placement import model_dims, settings_of

    rates = costs.load_rates(args.rates)
    started = time.perf_counter()
    result = {
        **git_state(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "script": "benchmarks/hetero_sim.py",
        "rates": {"file": str(args.rates), "device": rates.device, "provenance": rates.provenance},
        "model": "keye_vl2_30b_a3b",
        "mixes": {},
        "rows": [],
    }
    mixes = workloads(args.mixes.split(","), args.data, args.packs)
    dims = None
    header = f"{'gpus':>5} {'mix':<12} {'layout':<17} {'placement':<11} {'V':>4} {'step s':>8} {'tok/s/GPU':>9} "
    header += f"{'x pp0':>6} {'bubble':>6} {'stage0 GiB':>10}  note"
    print(header)
    for w in mixes:
        result["mixes"][w.name] = {
            "seq_length": w.seq_length,
            "global_batch": w.global_batch,
            "note": w.note,
            "mean_patches_per_pack": sum(p.patches for p in w.packs) / len(w.packs),
            "mean_frames_per_pack": sum(len(p.frames) for p in w.packs) / len(w.packs),
            "mean_documents_per_pack": sum(len(p.docs) for p in w.packs) / len(w.packs),
        }
        for gpus in [int(g) for g in args.gpus.split(",")]:
            for label, layout, overrides in layouts_for(gpus):
                cfg, sizes = config_for(w.seq_length, gpus, overrides, w.global_batch)
                dims = dims or model_dims(cfg.model)
                settings = settings_of(cfg.parallel)
                found = compare(rates, gpus, layout, w, dims, settings)
                base = found["pp0"]
                for key in ("pp0", "pp0_vit_dp", "split", "spread"):
                    r = found[key]
                    row = {
                        "gpus": gpus,
                        "mix": w.name,
                        "layout": label,
                        "placement": r.placement,
                        "legal": r.legal,
                        "reason": r.reason,
                        "vit_ranks": r.vit_ranks,
                        "step_time_s": r.step_time_s if r.legal else None,
                        "tokens_per_s": r.tokens_per_s if r.legal else None,
                        "tokens_per_s_per_gpu": r.tokens_per_s / gpus if r.legal else None,
                        "speedup_vs_pp0": r.tokens_per_s / base.tokens_per_s if r.legal and base.legal else None,
                        "bubble": r.bubble if r.legal else None,
                        "utilization": r.utilization,
                        "vit_busy_share": r.vit_busy_share if r.legal else None,
                        "level1_imbalance": r.level1_imbalance if r.legal else None,
                        "global_batch": r.global_batch,
                        "micro_batches": r.micro_batches,
                        "dp": r.dp,
                        "lm_recompute": settings.lm_recompute,
                        "vit_recompute": settings.vit_recompute,
                    }
                    if key == "split":
                        row["split_candidates"] = [
                            {
                                "vit_ranks": s.vit_ranks,
                                "legal": s.legal,
                                "tokens_per_s": s.tokens_per_s,
                                "reason": s.reason,
                            }
                            for s in found["split_all"]
                        ]
                    if r.legal:
                        first, vision = stage0_memory(cfg, sizes, r)
                        row["stage0_memory_gib"] = first
                        if vision is not None:
                            row["vit_rank_memory_gib"] = vision
                    else:
                        row["stage0_memory_gib"] = None
                    result["rows"].append(row)
                    if r.legal:
                        mem = f"{row['stage0_memory_gib']:>10.1f}"
                        print(
                            f"{gpus:>5} {w.name:<12} {label:<17} {r.placement:<11} {r.vit_ranks:>4} "
                            f"{r.step_time_s:>8.1f} {r.tokens_per_s / gpus:>9.0f} {row['speedup_vs_pp0']:>6.2f} "
                            f"{r.bubble:>6.2f} {mem}  {r.reason}",
                            flush=True,
                        )
                    else:
                        print(f"{gpus:>5} {w.name:<12} {label:<17} {r.placement:<11} {'':>4} illegal: {r.reason}")
                write_result(args.out, result)
    result["elapsed_s"] = time.perf_counter() - started
    write_result(args.out, result)
    print(f"wrote {args.out} in {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
