"""Shard indexes without media, for planning tests and the packing benchmark."""

import json
import random

from data_pipeline.shards import FORMAT, ShardSet


class DigitTokenizer:
    """Enough of KeyeTokenizer for planning: timestamps are <|frame|> + one token per character."""

    def timestamp_ids(self, seconds):
        return (0,) * (1 + len(f"{seconds:.1f}"))


def write_index(root, entries_per_shard):
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, entries in enumerate(entries_per_shard):
        name = f"shard-{n:06d}.tar"
        (root / f"shard-{n:06d}.idx.json").write_text(json.dumps({"shard": name, "samples": entries}))
        shards.append({"name": name, "samples": len(entries), "bytes": 0})
    (root / "index.json").write_text(json.dumps({"format": FORMAT, "tokenizer": "t", "shards": shards}))
    return ShardSet(root)


def realistic_mix(count, seed):
    """Image captions, videos from 5 s to 10 min, and text of log-normal length up to 30K tokens."""
    rng = random.Random(seed)
    entries = []
    for i in range(count):
        kind = rng.choices(["caption", "video", "text"], [0.4, 0.3, 0.3])[0]
        entry = {"key": f"{i:09d}", "id": str(i), "offset": 0, "media": {}}
        if kind == "caption":
            entry.update(kind="caption", text_tokens=rng.randint(10, 120))
            entry["media"]["p.jpg"] = {"type": "image", "height": rng.randint(200, 1600), "width": rng.randint(200, 1600)}
        elif kind == "video":
            entry.update(kind="chat", text_tokens=rng.randint(30, 400))
            entry["media"]["v.mp4"] = {"type": "video", "duration": min(600.0, rng.lognormvariate(3.5, 1.0) + 5),
                                       "fps": 30.0, "height": 720, "width": 1280}
        else:
            entry.update(kind="text", text_tokens=min(30000, int(rng.lognormvariate(6.5, 1.2)) + 20))
        entries.append(entry)
    return entries
