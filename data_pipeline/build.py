"""JSONL manifest + media files -> shards. Each manifest line is a schema record plus `"media"`, a map from the
media names the record uses to file paths relative to the media root."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.schema import BadRecord, media_names, parse_record
from data_pipeline.shards import BuildReport, ShardWriter
from data_pipeline.sizing import RejectedMedia
from data_pipeline.tokenizer import KeyeTokenizer


def _media_of(record: dict, media_root: Path) -> dict[str, bytes]:
    paths = record.get("media", {})
    if not isinstance(paths, dict):
        raise BadRecord("bad_field", f"record {record['id']!r}: 'media' must map names to paths")
    media = {}
    for name in media_names(record):
        if name in media:
            continue
        if name not in paths or not isinstance(paths[name], str):
            raise BadRecord("missing_media", f"record {record['id']!r} uses {name!r} but 'media' has no path for it")
        path = (media_root / paths[name]).resolve()
        if not path.is_relative_to(media_root):
            raise BadRecord("unsafe_path", f"record {record['id']!r}: {paths[name]!r} leaves the media root")
        if not path.is_file():
            raise BadRecord("missing_media", f"record {record['id']!r}: {path} does not exist")
        media[name] = path.read_bytes()
    return media


def build_shards(
    manifest: str | Path,
    media_root: str | Path,
    out: str | Path,
    tokenizer: KeyeTokenizer,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    log=print,
    dedup: bool = False,
) -> BuildReport:
    """A record whose id an earlier line of the manifest already used is reported and counted (`duplicate_id`
    in the report's counts); with dedup it is dropped instead (the first one is kept; in the rejects)."""
    media_root = Path(media_root).resolve()
    writer = ShardWriter(out, tokenizer, samples_per_shard, max_shard_bytes)
    first_line: dict[str, int] = {}
    with open(manifest, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = parse_record(line)
                if record["id"] in first_line:
                    seen = f"id {record['id']!r} of line {number} is already used by line {first_line[record['id']]}"
                    if dedup:
                        raise BadRecord("duplicate_id", seen)
                    writer.report.counts["duplicate_id"] += 1
                    log(f"keye-data: {seen} (kept; --dedup drops it)")
                first_line.setdefault(record["id"], number)
                media = _media_of(record, media_root)
                record = {k: v for k, v in record.items() if k != "media"}
                writer.add(record, media)
            except (BadRecord, RejectedMedia) as exc:
                writer.reject(exc.reason)
                log(f"keye-data: skipped manifest line {number}: {exc}")
    report = writer.finish()
    log("keye-data: " + json.dumps(report.as_dict()))
    return report
