"""Hostile corpora for the bad-data tests: real text shards holding one long text, and ways to damage them."""

import json
import random
import shutil
from pathlib import Path

from data_pipeline.build import build_shards
from data_pipeline.demo import train_tokenizer
from data_pipeline.tokenizer import KeyeTokenizer
from keye_train.config import DataConfig

PHRASE = "a red disk moves left"  # 8 tokens under the tokenizer below
LONG_ID = "long-text"


def text_corpus(root: Path, shards: int = 3, per_shard: int = 10, long_at: int = 17, long_phrases: int = 100) -> Path:
    """`root/shards` (text samples of 25-65 tokens; sample `long_at` is LONG_ID, about 8 * long_phrases tokens)
    and `root/tokenizer.json`. Returns root."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = root / "tokenizer.json"
    train_tokenizer(
        [PHRASE + " over a dark background", "0123456789 . seconds", "user\nassistant\n"], tokenizer, vocab_size=300
    )
    rng = random.Random(0)
    lines = []
    for k in range(shards * per_shard):
        rid, phrases = (LONG_ID, long_phrases) if k == long_at else (f"t{k}", rng.randint(3, 8))
        lines.append(json.dumps({"id": rid, "kind": "text", "text": " ".join([PHRASE] * phrases)}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    build_shards(
        root / "manifest.jsonl",
        root,
        root / "shards",
        KeyeTokenizer(tokenizer),
        samples_per_shard=per_shard,
        log=lambda _: None,
    )
    return root


def damaged_copy(corpus: Path, target: Path) -> Path:
    shutil.copytree(corpus, target)
    return target


def entries(shard_dir: Path, shard: int) -> list[dict]:
    return json.loads((shard_dir / f"shard-{shard:06d}.idx.json").read_text())["samples"]


def truncate(shard_dir: Path, shard: int, sample: int, inside: int = 700) -> None:
    """Cut shard `shard` `inside` bytes after the start of its sample `sample` (a transfer that stopped short)."""
    path = shard_dir / f"shard-{shard:06d}.tar"
    offset = entries(shard_dir, shard)[sample]["offset"]
    path.write_bytes(path.read_bytes()[: offset + inside])


def overwrite_from(shard_dir: Path, shard: int, sample: int) -> None:
    """Replace the bytes of shard `shard` from its sample `sample` on with noise, at the same size."""
    path = shard_dir / f"shard-{shard:06d}.tar"
    data = bytearray(path.read_bytes())
    offset = entries(shard_dir, shard)[sample]["offset"]
    data[offset:] = random.Random(1).randbytes(len(data) - offset)
    path.write_bytes(bytes(data))


def text_data_config(corpus: Path, **overrides) -> DataConfig:
    base = {"shards": str(corpus / "shards"), "tokenizer": str(corpus / "tokenizer.json"), "open_packs": 4}
    return DataConfig(**(base | overrides))
