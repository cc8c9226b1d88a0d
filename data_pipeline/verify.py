"""`keye-data index --verify DIR`: check a whole shard directory offline, every sample of every shard.

For each sample of each shard's index: its tar headers and member extents (see `shard_check`), safe member
names, a `.json` record that parses under the schema with the indexed id, and the indexed media members.
Media bytes are not decoded. One line per problem, then a summary; the caller exits non-zero on any problem.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.schema import BadRecord, parse_record
from data_pipeline.shard_check import BrokenSample, sample_members
from data_pipeline.shards import UnsafeMember, index_name, split_member_name


def check_sample(f, file_size: int, entries: list[dict], k: int) -> None:
    """BrokenSample when sample k of a shard's entries is not intact and as indexed."""
    entry = entries[k]
    members, end = sample_members(f, file_size, entry["offset"], entry["key"])
    if k + 1 < len(entries) and end != entries[k + 1]["offset"]:
        raise BrokenSample(f"its members end at {end}, the next sample is indexed at {entries[k + 1]['offset']}")
    by_suffix = {}
    for member in members:
        if not member.isreg():
            raise BrokenSample(f"member {member.name} is not a regular file")
        try:
            by_suffix[split_member_name(member.name)[1]] = member
        except UnsafeMember as exc:
            raise BrokenSample(str(exc)) from exc
    if "json" not in by_suffix:
        raise BrokenSample("it has no .json record")
    f.seek(by_suffix["json"].offset_data)
    try:
        record = parse_record(f.read(by_suffix["json"].size))
    except BadRecord as exc:
        raise BrokenSample(f"record: {exc}") from exc
    if record["id"] != entry["id"]:
        raise BrokenSample(f"record id {record['id']!r}, the index says {entry['id']!r}")
    media = sorted(s for s in by_suffix if s != "json")
    if media != sorted(entry["media"]):
        raise BrokenSample(f"media members {media}, the index says {sorted(entry['media'])}")


def verify_shard(root: Path, shard: dict) -> tuple[int, list[str]]:
    """(samples in the index, problems) of one index.json shard item."""
    name, samples = shard["name"], int(shard["samples"])
    path = root / name
    if not path.is_file():
        return samples, [f"{name}: the tar is missing ({samples} samples)"]
    try:
        entries = json.loads((root / index_name(name)).read_text())["samples"]
    except (OSError, ValueError, KeyError) as exc:
        return samples, [f"{name}: its .idx.json is unreadable: {exc}"]
    problems = []
    if len(entries) != samples:
        problems.append(f"{name}: index.json says {samples} samples, its .idx.json has {len(entries)}")
    size = path.stat().st_size
    if "bytes" in shard and size != int(shard["bytes"]):
        problems.append(f"{name}: {size} bytes, its index says {shard['bytes']}")
    with open(path, "rb") as f:
        for k in range(len(entries)):
            try:
                check_sample(f, size, entries, k)
            except BrokenSample as exc:
                problems.append(f"{name}: sample {k} (key {entries[k]['key']}, id {entries[k]['id']!r}): {exc}")
    return samples, problems


def verify_corpus(root: str | Path, log=print) -> int:
    """Log every problem of a shard directory and a summary; returns the number of problems."""
    root = Path(root)
    index_path = root / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{root} has no index.json")
    shards = json.loads(index_path.read_text())["shards"]
    samples = problems = damaged = 0
    for shard in shards:
        count, found = verify_shard(root, shard)
        samples, problems, damaged = samples + count, problems + len(found), damaged + bool(found)
        for line in found:
            log(f"keye-data verify: {line}")
    log(
        f"keye-data verify: {root}: {len(shards)} shards, {samples} samples, {damaged} damaged shard(s), "
        f"{problems} problem(s)"
    )
    return problems
