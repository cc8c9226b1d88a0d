"""Corpora for benchmarks/dsa_selection_stats.py: the demo builder's corpus with long texts and the real test
videos (training), and a held-out corpus of fresh demo records (another seed) plus one real video kept out of
training, built with the training corpus's tokenizer.

    .venv/bin/python benchmarks/dsa_selection_prepare.py --out runs/dsa_locality/data --real-videos DIR
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.insert(0, str(REPO))
from data_pipeline.build import build_shards  # noqa: E402
from data_pipeline.demo import VIDEO_EXTENSIONS, _records, make_demo  # noqa: E402
from data_pipeline.tokenizer import KeyeTokenizer  # noqa: E402


def real_video_record(path: Path, media: Path) -> dict:
    name = "clip" + path.suffix.lower()
    shutil.copyfile(path, media / f"real-{path.name}")
    return {
        "id": f"real-{path.stem}",
        "kind": "chat",
        "media": {name: f"real-{path.name}"},
        "messages": [
            {"role": "user", "content": [{"video": name}, {"text": "\ndescribe the clip ."}]},
            {"role": "assistant", "content": f"a real clip named {path.stem} ."},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/dsa_locality/data")
    parser.add_argument("--real-videos", required=True, help="a directory of real videos")
    parser.add_argument("--held-out-video", default="big_buck_bunny_0_30.webm", help="kept out of training")
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--held-out-samples", type=int, default=84)
    parser.add_argument("--long-text-words", type=int, default=12000)
    args = parser.parse_args()
    out = Path(args.out)
    videos = sorted(p for p in Path(args.real_videos).iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
    train_videos = out / "train_videos"
    train_videos.mkdir(parents=True, exist_ok=True)
    for path in videos:
        if path.name != args.held_out_video:
            shutil.copyfile(path, train_videos / path.name)
    make_demo(
        out / "train", samples=args.samples, seed=0, real_videos=train_videos, long_text_words=args.long_text_words
    )
    held = out / "held_out"
    media = held / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    records = list(_records(rng, media, args.held_out_samples, args.long_text_words))
    records += [real_video_record(p, media) for p in videos if p.name == args.held_out_video]
    manifest = held / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    shutil.copyfile(out / "train" / "tokenizer.json", held / "tokenizer.json")
    build_shards(manifest, media, held / "shards", KeyeTokenizer(held / "tokenizer.json"), samples_per_shard=40)


if __name__ == "__main__":
    main()
