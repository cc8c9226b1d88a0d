"""webdataset-style tar shards with a per-shard index, written and read without pickle.

Layout of a shard directory:
- `shard-000000.tar`: members `<key>.json` (the record, see `schema`) and `<key>.<media name>` (raw bytes);
  plain webdataset, so `webdataset.WebDataset` reads it too.
- `shard-000000.idx.json`: for every sample its key, byte offset in the tar, kind, text token count and
  probed media metadata. Readers plan and split work from these files and seek straight to a sample.
- `index.json`: shard list (per shard: samples, tar bytes and the last sample's key and offset, which
  `shard_check` compares with the tar when a corpus opens), rejects by reason, tokenizer fingerprint.

Member names are checked when read: a path (`/`, `..`), a link or device, or a pickle-like extension
(`.pyd`, `.pickle`, ...) rejects the sample. Nothing in a shard is ever unpickled.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from data_pipeline.encode import text_token_count
from data_pipeline.schema import BadRecord, check_spans, media_names, media_type, parse_record
from data_pipeline.shard_check import ShardDamage, check_shard
from data_pipeline.sizing import MAX_ASPECT_RATIO, RejectedMedia
from data_pipeline.tokenizer import KeyeTokenizer
from data_pipeline.video import decode_image, probe_video

FORMAT = "keye-shards/1"
PICKLE_EXTENSIONS = {"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib", "npy", "npz"}
KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class UnsafeMember(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def split_member_name(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name, or UnsafeMember."""
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name or "\0" in name:
        raise UnsafeMember("unsafe_member", f"member name {name!r} is a path")
    key, _, suffix = name.partition(".")
    if not KEY.match(key) or not suffix:
        raise UnsafeMember("unsafe_member", f"member name {name!r} is not <key>.<suffix>")
    if suffix.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS:
        raise UnsafeMember("pickle_member", f"member {name!r} may hold a pickle; refused")
    return key, suffix


def _check_member(member: tarfile.TarInfo) -> None:
    if not member.isreg():
        raise UnsafeMember("unsafe_member", f"member {member.name!r} is not a regular file")


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".idx.json"


# ---------------------------------------------------------------------------------------------------------------
# Describing one sample (what the index stores)


def probe_media(name: str, data: bytes) -> dict:
    if media_type(name) == "image":
        pixels = decode_image(data)
        meta = {"type": "image", "height": int(pixels.shape[1]), "width": int(pixels.shape[2])}
    else:
        info = probe_video(data)
        meta = {
            "type": "video",
            "duration": info.duration_s,
            "fps": info.fps,
            "height": info.height,
            "width": info.width,
        }
    if max(meta["height"], meta["width"]) > MAX_ASPECT_RATIO * min(meta["height"], meta["width"]):
        raise RejectedMedia("aspect_ratio", f"{name}: {meta['height']}x{meta['width']} exceeds {MAX_ASPECT_RATIO}:1")
    return meta


def describe(key: str, record: dict, media: dict[str, bytes], tokenizer: KeyeTokenizer) -> tuple[dict, dict, int]:
    """(the index entry of a valid sample, its record with time labels clipped to the media, labels clipped);
    raises BadRecord / RejectedMedia otherwise (`schema.check_spans` states the rule for time labels)."""
    metas = {}
    for name in media_names(record):
        if name not in media:
            raise BadRecord("missing_media", f"record {record['id']!r} uses {name!r}, which is not in the sample")
        if name not in metas:
            metas[name] = probe_media(name, media[name])
    record, clipped = check_spans(record, durations(metas))
    entry = {
        "key": key,
        "id": record["id"],
        "kind": record["kind"],
        "text_tokens": text_token_count(record, tokenizer),
        "media": metas,
    }
    return entry, record, clipped


def durations(metas: dict[str, dict]) -> dict[str, float]:
    """Probed duration by media name, for the videos among a sample's media metadata."""
    return {name: meta["duration"] for name, meta in metas.items() if meta["type"] == "video"}


# ---------------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class BuildReport:
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    rejects: Counter = field(default_factory=Counter)  # samples left out, by reason
    counts: Counter = field(default_factory=Counter)  # kept but noted: clipped_span, duplicate_id (without dedup)

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "shards": self.shards,
            "bytes": self.bytes,
            "rejects": dict(self.rejects),
            "counts": dict(self.counts),
        }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Appends valid samples to numbered shards and writes their indexes; atomic per file."""

    def __init__(
        self, out: str | Path, tokenizer: KeyeTokenizer, samples_per_shard: int = 1000, max_shard_bytes: int = 1 << 30
    ):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / "index.json").exists():
            raise FileExistsError(f"{self.out} already holds shards (index.json); choose an empty directory")
        self.tokenizer = tokenizer
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.report = BuildReport()
        self._tar = None
        self._entries: list[dict] = []
        self._shards: list[dict] = []

    def add(self, record: dict, media: dict[str, bytes]) -> None:
        key = f"{self.report.samples:09d}"
        entry, record, clipped = describe(key, record, media, self.tokenizer)  # may raise: nothing written yet
        if clipped:
            self.report.counts["clipped_span"] += clipped
        if self._tar is None:
            self._open()
        entry["offset"] = self._tar.offset
        _add_member(self._tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        for name in entry["media"]:
            _add_member(self._tar, f"{key}.{name}", media[name])
        self._entries.append(entry)
        self.report.samples += 1
        if len(self._entries) >= self.samples_per_shard or self._tar.offset >= self.max_shard_bytes:
            self._close()

    def reject(self, reason: str) -> None:
        self.report.rejects[reason] += 1

    def _open(self) -> None:
        self._name = shard_name(len(self._shards))
        self._tar = tarfile.open(self.out / (self._name + ".partial"), "w", format=tarfile.USTAR_FORMAT)

    def _close(self) -> None:
        self._tar.close()
        path = self.out / self._name
        os.replace(self.out / (self._name + ".partial"), path)
        _write_json(self.out / index_name(self._name), {"shard": self._name, "samples": self._entries})
        size = path.stat().st_size
        self._shards.append(shard_item(self._name, self._entries, size))
        self.report.shards += 1
        self.report.bytes += size
        self._tar, self._entries = None, []

    def finish(self) -> BuildReport:
        if self._tar is not None:
            self._close()
        _write_json(
            self.out / "index.json",
            {
                **self.report.as_dict(),
                "format": FORMAT,
                "tokenizer": self.tokenizer.fingerprint,
                "shards": self._shards,
            },
        )
        return self.report


def shard_item(name: str, entries: list[dict], size: int) -> dict:
    """A shard's line in index.json: its name, sample count, tar size and last sample (checked at open)."""
    item = {"name": name, "samples": len(entries), "bytes": size}
    if entries:
        item["last"] = [entries[-1]["key"], entries[-1]["offset"]]
    return item


def _write_json(path: Path, value) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, ensure_ascii=False, indent=None))
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def iter_tar_samples(fileobj, stop_after_key: str | None = None):
    """Yield (key, {suffix: bytes} or an UnsafeMember, first member offset) from the current position.

    A sample with a pickle-like member comes back as its UnsafeMember (its bytes are never read). A member
    that is a path, link or device raises UnsafeMember after the samples before it: the rest of the tar is
    not trusted."""
    tar = tarfile.open(fileobj=fileobj, mode="r:")
    key, members, offset = None, {}, None
    for member in tar:
        try:
            _check_member(member)
            member_key, suffix = split_member_name(member.name)
            refused = None
        except UnsafeMember as exc:
            if exc.reason != "pickle_member":
                if key is not None:
                    yield key, members, offset
                raise
            member_key, suffix, refused = member.name.partition(".")[0], None, exc
        if member_key != key:
            if key is not None:
                yield key, members, offset
                if key == stop_after_key:
                    return
            key, members, offset = member_key, {}, member.offset
        if isinstance(members, UnsafeMember):
            continue
        if refused is not None:
            members = refused
        else:
            members[suffix] = tar.extractfile(member).read()
    if key is not None:
        yield key, members, offset


class ShardSet:
    """A shard directory: the global list of samples and random access to any of them.

    With verify=True each tar is checked against its index when the set opens (`shard_check`): a damaged
    shard is listed in `damaged` and only its readable prefix counts in `sizes`. The planner's set verifies;
    decode workers, which read only what the planner planned, need not."""

    def __init__(self, root: str | Path, tokenizer_fingerprint: str | None = None, verify: bool = False):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.root} has no index.json; build shards with `keye-data build`")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
        if tokenizer_fingerprint is not None and index["tokenizer"] != tokenizer_fingerprint:
            raise ValueError(
                f"{self.root} was indexed with another tokenizer ({index['tokenizer']}); token counts "
                f"would be wrong. Re-index it: keye-data index {self.root} --tokenizer <file>"
            )
        self.shards = [s["name"] for s in index["shards"]]
        self.sizes = [int(s["samples"]) for s in index["shards"]]
        self.build_rejects = index.get("rejects", {})
        self.build_counts = index.get("counts", {})  # kept but noted at build: clipped_span, duplicate_id
        self._entries: dict[int, list] = {}
        self.damaged: list[ShardDamage] = []
        if not self.shards or not sum(self.sizes):
            raise ValueError(f"{self.root} holds no samples")
        if verify:
            self._verify(index["shards"])

    def _verify(self, items: list[dict]) -> None:
        for number, item in enumerate(items):
            damage = check_shard(self.root / item["name"], item, lambda shard=number: self.entries(shard))
            if damage is not None:
                self.damaged.append(damage)
                self.sizes[number] = damage.readable
        if not sum(self.sizes):
            raise ValueError(f"{self.root} holds no readable samples: " + "; ".join(d.describe() for d in self.damaged))

    def entries(self, shard: int) -> list[dict]:
        if shard not in self._entries:
            if len(self._entries) > 64:
                self._entries.clear()
            data = json.loads((self.root / index_name(self.shards[shard])).read_text())
            self._entries[shard] = data["samples"]
        return self._entries[shard]

    def entry(self, shard: int, sample: int) -> dict:
        return self.entries(shard)[sample]

    def read(self, shard: int, sample: int) -> tuple[dict, dict[str, bytes]]:
        """(record, media bytes by name) of one sample; BadRecord / UnsafeMember on bad content."""
        entry = self.entry(shard, sample)
        with open(self.root / self.shards[shard], "rb") as f:
            f.seek(entry["offset"])
            for key, members, _ in iter_tar_samples(f, stop_after_key=entry["key"]):
                if key != entry["key"]:
                    raise BadRecord(
                        "index_mismatch",
                        f"{self.shards[shard]} at {entry['offset']}: key {key}, index says {entry['key']}",
                    )
                if isinstance(members, UnsafeMember):
                    raise members
                if "json" not in members:
                    raise BadRecord("missing_field", f"sample {key} has no .json record")
                record = parse_record(members.pop("json"))
                return record, members
        raise BadRecord("index_mismatch", f"{self.shards[shard]} ends before offset {entry['offset']}")


class ShardMixture:
    """Several shard directories as one shard list: shard i of source s is global shard offsets[s] + i. One
    source behaves exactly like its ShardSet."""

    def __init__(self, roots: list[str | Path], tokenizer_fingerprint: str | None = None, verify: bool = False):
        if not roots:
            raise ValueError("a data mixture needs at least one shard directory")
        self.sources = [ShardSet(root, tokenizer_fingerprint, verify) for root in roots]
        self.offsets = [0]
        for source in self.sources:
            self.offsets.append(self.offsets[-1] + len(source.shards))
        several = len(self.sources) > 1
        self.shards = [f"{src.root.name}/{name}" if several else name for src in self.sources for name in src.shards]
        self.sizes = [n for src in self.sources for n in src.sizes]
        self.build_report = Counter()  # every source's build-time rejects and noted counts, by reason
        for source in self.sources:
            self.build_report.update(source.build_rejects)
            self.build_report.update(source.build_counts)
        self.damaged = [
            replace(d, shard=f"{src.root.name}/{d.shard}") if several else d
            for src in self.sources
            for d in src.damaged
        ]

    def locate(self, shard: int) -> tuple[ShardSet, int]:
        for source, start, end in zip(self.sources, self.offsets, self.offsets[1:]):
            if start <= shard < end:
                return source, shard - start
        raise IndexError(f"shard {shard} is outside the mixture's {self.offsets[-1]} shards")

    def entry(self, shard: int, sample: int) -> dict:
        source, local = self.locate(shard)
        return source.entry(local, sample)

    def read(self, shard: int, sample: int) -> tuple[dict, dict[str, bytes]]:
        source, local = self.locate(shard)
        return source.read(local, sample)


def index_shards(root: str | Path, tokenizer: KeyeTokenizer) -> BuildReport:
    """Write the `.idx.json` files and `index.json` for tar shards made elsewhere (webdataset layout)."""
    root = Path(root)
    report = BuildReport()
    shards = []
    for path in sorted(root.glob("*.tar")):
        entries = []
        with open(path, "rb") as f:
            try:
                for key, members, offset in iter_tar_samples(f):
                    try:
                        if isinstance(members, UnsafeMember):
                            raise members
                        if "json" not in members:
                            raise BadRecord("missing_field", f"sample {key} has no .json record")
                        record = parse_record(members.pop("json"))
                        # a clipped label is clipped again when read; the tar is not rewritten
                        entry, _, clipped = describe(key, record, members, tokenizer)
                        if clipped:
                            report.counts["clipped_span"] += clipped
                    except (BadRecord, RejectedMedia, UnsafeMember) as exc:
                        report.rejects[exc.reason] += 1
                        continue
                    entry["offset"] = offset
                    entries.append(entry)
            except (UnsafeMember, tarfile.TarError) as exc:
                # a member that cannot be read safely ends the shard: later offsets are not trusted
                report.rejects[getattr(exc, "reason", "corrupt_tar")] += 1
        _write_json(root / index_name(path.name), {"shard": path.name, "samples": entries})
        shards.append(shard_item(path.name, entries, path.stat().st_size))
        report.samples += len(entries)
        report.bytes += path.stat().st_size
        report.shards += 1
    _write_json(
        root / "index.json",
        {**report.as_dict(), "format": FORMAT, "tokenizer": tokenizer.fingerprint, "shards": shards},
    )
    return report
