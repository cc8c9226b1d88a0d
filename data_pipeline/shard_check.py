"""Is a tar shard still what its index says? Cheap checks when a corpus opens, a full one offline.

A sample is intact when the tar headers at its indexed offset name its key, all of its members' data lies inside
the file, and (for all but a shard's last sample) its members end where the next sample is indexed. Only
headers are read: media bytes are skipped.

- At open (`check_shard`): the tar's size is compared with the `bytes` its index recorded and the last sample
  is checked (one stat and a few 512-byte reads). On a mismatch the shard's readable prefix is found by binary
  search over its samples (a truncated or replaced shard keeps the samples before its first broken one).
  Indexes written before the last key was recorded get the size check alone.
- Offline (`data_pipeline.verify`, `keye-data index --verify DIR`): every sample of every shard, plus its
  record JSON and its members against the index.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path


class BrokenSample(ValueError):
    """A sample whose tar headers or members are not what its index says."""


@dataclass
class ShardDamage:
    """A shard whose tar differs from its index: samples [readable, samples) are lost."""

    shard: str
    samples: int
    readable: int
    detail: str

    @property
    def lost(self) -> int:
        return self.samples - self.readable

    def describe(self) -> str:
        return (
            f"shard {self.shard} is damaged ({self.detail}): {self.lost} of {self.samples} samples lost, "
            f"its first {self.readable} are used"
        )


def sample_members(f, file_size: int, offset: int, key: str) -> tuple[list[tarfile.TarInfo], int]:
    """(members of the sample `key` whose first header is at `offset`, the offset where its last member's
    padded data ends); BrokenSample when that is not what the file holds."""
    f.seek(offset)
    members = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # reads headers only; leaves f open
            for member in tar:
                if member.name.partition(".")[0] != key:
                    break
                if member.offset_data + member.size > file_size:
                    raise BrokenSample(f"member {member.name} ends past the end of the file ({file_size} bytes)")
                members.append(member)
    except tarfile.TarError as exc:
        raise BrokenSample(f"unreadable tar at offset {offset}: {exc}") from exc
    if not members:
        raise BrokenSample(f"no member of sample {key} at offset {offset}")
    last = members[-1]
    return members, last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def sample_intact(f, file_size: int, entries: list[dict], k: int) -> bool:
    try:
        _, end = sample_members(f, file_size, entries[k]["offset"], entries[k]["key"])
    except BrokenSample:
        return False
    return k + 1 == len(entries) or end == entries[k + 1]["offset"]


def readable_prefix(f, file_size: int, entries: list[dict]) -> int:
    """How many leading samples are intact (binary search: damage is assumed to start somewhere and last)."""
    lo, hi = 0, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if sample_intact(f, file_size, entries, mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def check_shard(path: Path, shard: dict, load_entries) -> ShardDamage | None:
    """None when the tar at `path` matches its index.json item `shard`; load_entries() reads its .idx.json
    (only when needed)."""
    name, samples, recorded = shard["name"], int(shard["samples"]), shard.get("bytes")
    if not path.is_file():
        return ShardDamage(name, samples, 0, "the tar is missing")
    size = path.stat().st_size
    last = shard.get("last")  # [key, offset] of the shard's last sample
    with open(path, "rb") as f:
        matches = recorded is None or size == recorded
        if matches and (last is None or sample_intact(f, size, [{"key": last[0], "offset": last[1]}], 0)):
            return None
        entries = load_entries()
        readable = readable_prefix(f, size, entries)
    detail = (
        "its last sample does not match"
        if recorded is None or size == recorded
        else f"{size} bytes, its index says {recorded}"
    )
    return ShardDamage(name, samples, readable, detail)
