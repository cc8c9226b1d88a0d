"""JSONL reading and writing for the evaluators: one JSON object per line, errors naming the file, line and key."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON: {err}") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: a line must be a JSON object")
            yield number, record


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_predictions(path: str | Path) -> dict[str, str]:
    """id -> response text from lines `{"id": ..., "response": ...}` (ids compared as strings)."""
    out = {}
    for number, record in read_jsonl(path):
        for key in ("id", "response"):
            if key not in record:
                raise ValueError(f"{path}:{number}: a prediction needs {key!r}")
        if not isinstance(record["response"], str):
            raise ValueError(f"{path}:{number}: 'response' must be a string")
        out[str(record["id"])] = record["response"]
    return out


def first_key(record: dict, keys: tuple[str, ...], where: str):
    for key in keys:
        if key in record:
            return record[key]
    raise ValueError(f"{where}: none of {list(keys)} is present")
