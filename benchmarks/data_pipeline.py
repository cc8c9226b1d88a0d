"""Data pipeline throughput, scaling, packing efficiency and memory; figures to benchmarks/results/.

    .venv/bin/python benchmarks/data_pipeline.py [--videos DIR] [--workers 1 2] [--repeat 6]

For each worker count, in one run and on the same frames:
- raw: PyAV decode of exactly the frames the pipeline plans (seek + decode + RGB), in worker processes;
- full: the loader's decode pool on shards of the same videos (tar read, decode, resize, normalise, patchify,
  tokenize), in as many worker processes.
Packing efficiency is the planner's on a realistic mix at 8K, 32K, 64K and 256K.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_description, git_state, peak_rss_mib, write_result  # noqa: E402
from data_pipeline.encode import MediaBudget  # noqa: E402
from data_pipeline.sizing import VideoBudget  # noqa: E402

STAGE1 = MediaBudget(video=VideoBudget(video_total_tokens=24576))
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv")


def raw_decode(path: str) -> int:
    """Decode the planned frames of one video with PyAV only; returns the frame count."""
    from data_pipeline.sizing import plan_video
    from data_pipeline.video import decode_frames, open_displayed

    container, stream, info = open_displayed(path)
    try:
        plan = plan_video(info.duration_s, info.fps, info.height, info.width, STAGE1.video)
        arrays, _ = decode_frames(container, stream, plan.times)
    finally:
        container.close()
    return len(arrays)


def _init_raw_worker() -> None:
    import torch

    torch.set_num_threads(1)


def measure_raw(paths: list[str], workers: int) -> tuple[int, float]:
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_raw_worker) as pool:
        pool.map(raw_decode, paths[:workers])  # start-up and imports are not timed
        started = time.perf_counter()
        frames = sum(pool.map(raw_decode, paths, chunksize=1))
        return frames, time.perf_counter() - started


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_full(shard_root: Path, tokenizer: Path, samples: int, repeat: int, workers: int) -> dict:
    from data_pipeline.encode import media_tokens
    from data_pipeline.planner import PlannedSample
    from data_pipeline.shards import ShardSet
    from data_pipeline.tokenizer import KeyeTokenizer
    from data_pipeline.workers import DecodePool, Rejected

    shards, tok = ShardSet(shard_root), KeyeTokenizer(tokenizer)
    planned = []  # as the planner plans them: with their token and patch counts, which balance the workers
    for k in range(samples):
        entry = shards.entry(0, k)
        cost = [media_tokens(meta, STAGE1, tok, 1) for meta in entry["media"].values()]
        planned.append(
            PlannedSample(0, 0, k, -1, entry["text_tokens"] + sum(t for t, _ in cost), sum(p for _, p in cost))
        )
    pool = DecodePool(shard_root, tokenizer, STAGE1, 1 << 20, workers=workers, timeout_s=600)
    try:
        for k in range(workers):  # warm-up: start-up and imports are not timed
            pool.result(pool.submit(planned[k % samples]))
        started = time.perf_counter()
        jobs = [pool.submit(planned[k % samples]) for k in range(samples * repeat)]
        frames = 0
        for job in jobs:
            result = pool.result(job)
            if isinstance(result, Rejected):
                raise RuntimeError(f"benchmark sample rejected: {result}")
            frames += int(result.patch_grids.shape[0])
        elapsed = time.perf_counter() - started
        worker_rss = max(vm_hwm_mib(w.process.pid) for w in pool.workers)
    finally:
        pool.close()
    return {"frames": frames, "seconds": elapsed, "worker_peak_rss_mib": worker_rss}


def build_shards(videos: list[Path], out: Path) -> tuple[Path, Path]:
    from data_pipeline.build import build_shards as build
    from data_pipeline.demo import train_tokenizer
    from data_pipeline.tokenizer import KeyeTokenizer

    tokenizer = out / "tokenizer.json"
    train_tokenizer(["describe the clip . 0123456789", "user\nassistant\n"], tokenizer, vocab_size=300)
    manifest = out / "manifest.jsonl"
    with open(manifest, "w") as f:
        for path in videos:
            name = "v" + path.suffix.lower()
            f.write(
                json.dumps(
                    {
                        "id": path.stem,
                        "kind": "chat",
                        "media": {name: str(path.resolve())},
                        "messages": [
                            {"role": "user", "content": [{"video": name}, {"text": "describe the clip ."}]},
                            {"role": "assistant", "content": "a clip ."},
                        ],
                    }
                )
                + "\n"
            )
    report = build(manifest, "/", out / "shards", KeyeTokenizer(tokenizer), log=lambda _: None)
    if report.samples != len(videos):
        raise RuntimeError(f"{len(videos) - report.samples} benchmark videos were rejected: {report.rejects}")
    return out / "shards", tokenizer


def generated_videos(out: Path, count: int = 6) -> list[Path]:
    from data_pipeline.demo import Scene, write_video

    paths = []
    for k in range(count):
        path = out / f"generated_{k}.mp4"
        write_video(path, Scene(random.Random(k)), seconds=12.0, fps=24, size=(360, 640))
        paths.append(path)
    return paths


def packing_efficiency(seq_lengths=(8192, 32768, 65536, 262144), samples: int = 20000) -> dict:
    from data_pipeline.planner import PackingConfig, PackPlanner
    from tests.data_pipeline.mixes import DigitTokenizer, realistic_mix, write_index

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_index(Path(tmp), [realistic_mix(samples, 0)])
        for seq_length in seq_lengths:
            planner = PackPlanner(shards, DigitTokenizer(), STAGE1, PackingConfig(seq_length=seq_length), seed=0)
            packs = [planner.next_pack() for _ in range(max(50, 4_000_000 // seq_length))]
            out[str(seq_length)] = {
                "packs": len(packs),
                "efficiency": sum(p.tokens for p in packs) / (len(packs) * seq_length),
                "samples_per_pack": sum(len(p.samples) for p in packs) / len(packs),
                "skipped_too_long": planner.counters["too_long"],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--videos",
        type=Path,
        default=REPO.parent / "shared" / "testdata" / "videos",
        help="real videos to use (generated clips are used when the directory is missing)",
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=6, help="passes over the video list per measurement")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_pipeline_cpu.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="keye_data_bench_") as tmp:
        tmp = Path(tmp)
        if args.videos.is_dir():
            videos = [
                p
                for p in sorted(args.videos.iterdir())
                if p.suffix.lower() in VIDEO_SUFFIXES and "TRUNCATED" not in p.name
            ]
            source = str(args.videos)
        else:
            videos, source = generated_videos(tmp), "generated 640x360 24 fps mpeg4 clips"
        shard_root, tokenizer = build_shards(videos, tmp)
        rows = []
        for workers in args.workers:
            paths = [str(p) for p in videos] * args.repeat
            raw_frames, raw_s = measure_raw(paths, workers)
            full = measure_full(shard_root, tokenizer, len(videos), args.repeat, workers)
            if full["frames"] != raw_frames:
                raise RuntimeError(f"full pipeline made {full['frames']} frames, raw decode {raw_frames}")
            rows.append(
                {
                    "workers": workers,
                    "frames": raw_frames,
                    "raw_fps": raw_frames / raw_s,
                    "full_fps": full["frames"] / full["seconds"],
                    "full_over_raw": (full["frames"] / full["seconds"]) / (raw_frames / raw_s),
                    "worker_peak_rss_mib": full["worker_peak_rss_mib"],
                }
            )
        base = rows[0]["full_fps"] / rows[0]["workers"]
        for row in rows:
            row["scaling_efficiency"] = row["full_fps"] / (base * row["workers"])
    packing = packing_efficiency()

    result = {
        "benchmark": "data_pipeline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        **git_state(),
        "device": cpu_description(),
        "shapes": {
            "videos": [p.name for p in videos],
            "video_source": source,
            "repeat": args.repeat,
            "budget": "Stage 1: fps 2, 64-256 tokens/frame, 24576 video tokens, adaptive",
        },
        "figures": {"throughput": rows, "packing": packing, "main_peak_rss_mib": peak_rss_mib()},
        "goals": {"full_over_raw": 0.85, "packing_efficiency_32k": 0.97},
    }
    print(
        f"{'workers':>8}{'frames':>8}{'raw f/s':>10}{'full f/s':>10}{'full/raw':>10}{'scaling':>9}"
        f"{'worker RSS MiB':>16}"
    )
    for r in rows:
        print(
            f"{r['workers']:>8}{r['frames']:>8}{r['raw_fps']:>10.1f}{r['full_fps']:>10.1f}{r['full_over_raw']:>10.3f}"
            f"{r['scaling_efficiency']:>9.2f}{r['worker_peak_rss_mib']:>16.0f}"
        )
    for seq, p in packing.items():
        print(
            f"packing at {int(seq):>6}: {p['efficiency']:.4f} non-pad ({p['packs']} packs, "
            f"{p['samples_per_pack']:.1f} samples/pack, {p['skipped_too_long']} too long)"
        )
    print(f"main process peak RSS {result['figures']['main_peak_rss_mib']:.0f} MiB")
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
