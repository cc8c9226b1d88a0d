"""`keye-data build | index | demo`: make shards that `keye-train` reads; `index --verify` checks them."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keye-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="JSONL manifest + media files -> tar shards with an index")
    build.add_argument("--manifest", required=True)
    build.add_argument("--media-root", required=True, help="media paths in the manifest are relative to this")
    build.add_argument("--out", required=True, help="an empty or new directory")
    build.add_argument("--tokenizer", required=True, help="HF tokenizer.json (token counts go into the index)")
    build.add_argument("--samples-per-shard", type=int, default=1000)
    build.add_argument("--max-shard-mb", type=int, default=1024)
    build.add_argument("--dedup", action="store_true", help="drop records whose id an earlier line already used")

    index = sub.add_parser("index", help="index tar shards made elsewhere (webdataset layout), or --verify a corpus")
    index.add_argument("shards")
    index.add_argument("--tokenizer", help="needed to index (token counts go into the index)")
    index.add_argument(
        "--verify",
        action="store_true",
        help="check every sample of an indexed directory against its index; exit 1 on damage",
    )

    demo = sub.add_parser("demo", help="generate the demo corpus and its shards")
    demo.add_argument("--out", default="runs/demo/data")
    demo.add_argument("--samples", type=int, default=240)
    demo.add_argument("--real-videos", default=None, help="a directory of real videos to add as QA samples")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--long-text-words", type=int, default=400, help="words of the corpus's long text documents")
    demo.add_argument("--toy-sft-samples", type=int, default=0, help="answered RL toy tasks among the chat samples")

    args = parser.parse_args(argv)
    from data_pipeline.tokenizer import KeyeTokenizer

    try:
        if args.command == "build":
            from data_pipeline.build import build_shards

            build_shards(
                args.manifest,
                args.media_root,
                args.out,
                KeyeTokenizer(args.tokenizer),
                args.samples_per_shard,
                args.max_shard_mb << 20,
                dedup=args.dedup,
            )
        elif args.command == "index" and args.verify:
            from data_pipeline.verify import verify_corpus

            return 1 if verify_corpus(args.shards) else 0
        elif args.command == "index":
            from data_pipeline.shards import index_shards

            if args.tokenizer is None:
                parser.error("index needs --tokenizer (or --verify)")
            report = index_shards(args.shards, KeyeTokenizer(args.tokenizer))
            print("keye-data: " + str(report.as_dict()))
        else:
            from pathlib import Path

            from data_pipeline.demo import make_demo

            if (Path(args.out) / "shards" / "index.json").exists():
                print(f"keye-data demo: {args.out} already built; delete it to rebuild")
                return 0
            make_demo(
                args.out,
                args.samples,
                args.seed,
                args.real_videos,
                long_text_words=args.long_text_words,
                toy_sft_samples=args.toy_sft_samples,
            )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"keye-data: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
