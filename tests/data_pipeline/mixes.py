"""Shard indexes without media, for planning tests and the packing benchmark; with `tars=True` each sample also
gets a tiny record in a real tar, and `FlakyDecoder` stands in for decoding (planned lengths, injected rejects)."""

import io
import json
import random
import tarfile
import threading
from collections import Counter

import torch

from data_pipeline.encode import EncodedSample
from data_pipeline.shards import FORMAT, ShardMixture, ShardSet
from data_pipeline.workers import Rejected, sample_id


class DigitTokenizer:
    """Enough of KeyeTokenizer for planning: timestamps are <|frame|> + one token per character."""

    def timestamp_ids(self, seconds):
        return (0,) * (1 + len(f"{seconds:.1f}"))


def write_index(root, entries_per_shard, tokenizer="t", tars=False):
    """index.json and .idx.json files; with tars, shard tars whose members are one small text record per sample
    (offsets and sizes as the index says). tokenizer: the fingerprint to record."""
    from data_pipeline.shards import shard_item  # here: benchmarks/bad_data_cpu.py runs the stand-in on older code

    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, entries in enumerate(entries_per_shard):
        name = f"shard-{n:06d}.tar"
        size = _write_tar(root / name, entries) if tars else 0
        (root / f"shard-{n:06d}.idx.json").write_text(json.dumps({"shard": name, "samples": entries}))
        item = shard_item(name, entries, size) if tars else {"name": name, "samples": len(entries), "bytes": 0}
        shards.append(item)
    (root / "index.json").write_text(json.dumps({"format": FORMAT, "tokenizer": tokenizer, "shards": shards}))
    return ShardSet(root)


def _write_tar(path, entries) -> int:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for entry in entries:
            entry["offset"] = tar.offset
            data = json.dumps({"id": entry["id"], "kind": "text", "text": "x"}).encode()
            info = tarfile.TarInfo(f"{entry['key']}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


class FlakyDecoder:
    """Stands in for SampleDecoder: a text sample of the planned length, all supervised, or a `decode_error`
    for a fixed share of the samples and for the ids in fail_ids (the same ones every epoch). With tars, the
    record is read first, so a damaged shard fails as it would (`index_mismatch`). `calls` counts reads by
    (id, epoch)."""

    def __init__(self, shard_roots, tokenizer_path, budget, seq_length, reject_rate=0.1, read=True, fail_ids=()):
        self.shards = ShardMixture([shard_roots] if isinstance(shard_roots, str) else shard_roots)
        self.reject_rate, self.read, self.fail_ids = reject_rate, read, set(fail_ids)
        self.calls = Counter()

    def __call__(self, planned):
        from data_pipeline.schema import BadRecord

        entry = self.shards.entry(planned.shard, planned.sample)
        self.calls[entry["id"], planned.epoch] += 1
        if self.read:  # failing as SampleDecoder does
            try:
                self.shards.read(planned.shard, planned.sample)
            except BadRecord as exc:
                return Rejected(exc.reason, str(exc))
            except Exception as exc:
                return Rejected("decode_error", f"{type(exc).__name__}: {exc}")
        injected = random.Random(f"{planned.shard}/{planned.sample}").random() < self.reject_rate
        if injected or entry["id"] in self.fail_ids:
            return Rejected("decode_error", f"injected failure of {entry['id']!r}")
        ids = torch.full((planned.tokens,), 7, dtype=torch.int64)
        return EncodedSample(
            key=sample_id(entry["id"], planned),
            input_ids=ids,
            supervised=torch.ones(planned.tokens, dtype=torch.bool),
            patches=torch.zeros(0, 3 * 14 * 14),
            patch_grids=torch.zeros(0, 2, dtype=torch.int64),
        )


class ThreadedRanks:
    """DP ranks as threads of one process, with the all-gather `exchange` a ShardLoader expects (the object
    goes through JSON, as it would between processes)."""

    def __init__(self, size):
        self.size = size
        self._slots = [None] * size
        self._barrier = threading.Barrier(size)

    def exchange(self, rank):
        def gather(obj):
            self._slots[rank] = json.loads(json.dumps(obj))
            self._barrier.wait()
            gathered = list(self._slots)
            self._barrier.wait()
            return gathered

        return gather

    def run(self, loaders, steps, collect):
        """[rank][step] -> collect(loader, batches) for `steps` steps of every rank's loader."""
        out, errors = [[] for _ in loaders], []

        def work(rank):
            try:
                for _ in range(steps):
                    out[rank].append(collect(loaders[rank], loaders[rank].next_step()))
            except Exception as exc:  # unblock the other ranks, then re-raise in the caller
                errors.append(exc)
                self._barrier.abort()

        threads = [threading.Thread(target=work, args=(rank,)) for rank in range(len(loaders))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return out


def realistic_mix(count, seed):
    """Image captions, videos from 5 s to 10 min, and text of log-normal length up to 30K tokens."""
    rng = random.Random(seed)
    entries = []
    for i in range(count):
        kind = rng.choices(["caption", "video", "text"], [0.4, 0.3, 0.3])[0]
        entry = {"key": f"{i:09d}", "id": str(i), "offset": 0, "media": {}}
        if kind == "caption":
            entry.update(kind="caption", text_tokens=rng.randint(10, 120))
            entry["media"]["p.jpg"] = {
                "type": "image",
                "height": rng.randint(200, 1600),
                "width": rng.randint(200, 1600),
            }
        elif kind == "video":
            entry.update(kind="chat", text_tokens=rng.randint(30, 400))
            entry["media"]["v.mp4"] = {
                "type": "video",
                "duration": min(600.0, rng.lognormvariate(3.5, 1.0) + 5),
                "fps": 30.0,
                "height": 720,
                "width": 1280,
            }
        else:
            entry.update(kind="text", text_tokens=min(30000, int(rng.lognormvariate(6.5, 1.2)) + 20))
        entries.append(entry)
    return entries
