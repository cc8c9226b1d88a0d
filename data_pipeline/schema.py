"""The sample schema of keye-train shards, and its rendering into a flat list of segments.

A shard sample is one `<key>.json` record (UTF-8) plus its media members `<key>.<name>`, where `<name>` is
`[A-Za-z0-9_-]+.<ext>` (e.g. `img0.jpg`, `clip.mp4`). Every record has `"id"` (string) and `"kind"`:

| kind | fields | loss on |
| --- | --- | --- |
| `caption` | `image`, `text` | the caption |
| `interleaved` | `content`: list of `{"text": s}`, `{"image": name}`, `{"video": name}` | all text |
| `video_caption` | `video`, `segments`: list of `{"start", "end", "text"}` (seconds) | the captions |
| `grounding` | `video`, `query`, `start`, `end` (seconds) | the answer span |
| `chat` | `messages`: list of `{"role": system/user/assistant, "content": s or a content list}` | assistant turns |
| `text` | `text` | all text; split when longer than the sequence |

Pretraining kinds (`caption`, `interleaved`, `video_caption`, `text`) are plain documents ending in
`<|endoftext|>`. `chat` and `grounding` use the Qwen ChatML template, `<|im_start|>role\\n...<|im_end|>\\n`.

Time labels are checked against the video's probed duration `d` (`check_spans`), at build time and again
when a sample is read (for shards built before the check): a grounding span or caption segment `[start, end]`
that ends within `SPAN_TOLERANCE_S` of `d` is kept as it is; one that starts before `d` and ends later is
clipped to end at `d` (counted as `clipped_span`); one that starts at or after `d` and ends later rejects the
whole sample (`span_out_of_range`). The tolerance covers the one-decimal rendering and container rounding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif"}
VIDEO_EXTENSIONS = {"mp4", "webm", "avi", "mov", "mkv", "m4v"}
MEDIA_NAME = re.compile(r"^[A-Za-z0-9_-]+\.([A-Za-z0-9]+)$")
PRETRAIN_KINDS = ("caption", "interleaved", "video_caption", "text")
CHAT_KINDS = ("chat", "grounding")
KINDS = PRETRAIN_KINDS + CHAT_KINDS
ROLES = ("system", "user", "assistant")
SPLITTABLE_KINDS = ("text",)
SPAN_TOLERANCE_S = 0.1  # a time label may end this far past the probed duration (rounding), see check_spans


class BadRecord(ValueError):
    """A record that breaks the schema; `reason` is the counter key (missing_field, non_utf8, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered sample. kind: text | special | image | video; value: str or media name."""

    kind: str
    value: str
    supervised: bool


def media_type(name: str) -> str:
    match = MEDIA_NAME.match(name)
    if not match:
        raise BadRecord("bad_media_name", f"{name!r} is not name.ext")
    ext = match.group(1).lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    raise BadRecord("bad_media_name", f"{name!r}: unknown media extension .{ext}")


def parse_record(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord("non_utf8", str(exc)) from exc
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord("bad_json", str(exc)) from exc
    if not isinstance(record, dict):
        raise BadRecord("bad_json", "a record is a JSON object")
    validate(record)
    return record


def _need(record: dict, key: str, kind: type | tuple):
    if key not in record:
        raise BadRecord(
            "missing_field", f"record {record.get('id', '?')!r} of kind {record.get('kind')!r} has no {key!r}"
        )
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRecord("bad_field", f"{key!r} of record {record.get('id', '?')!r} has type {type(value).__name__}")
    return value


def _check_text(value: str, where: str) -> None:
    # json.loads accepts lone surrogates; they cannot be encoded as UTF-8 and are not text.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRecord("non_utf8", f"{where}: {exc}") from exc


def _check_content(content, record_id: str) -> None:
    if isinstance(content, str):
        _check_text(content, record_id)
        return
    if not isinstance(content, list) or not content:
        raise BadRecord("bad_field", f"content of record {record_id!r} is neither text nor a non-empty list")
    for part in content:
        if not isinstance(part, dict) or len(part) != 1 or next(iter(part)) not in ("text", "image", "video"):
            raise BadRecord("bad_field", f"content part {part!r} of record {record_id!r}")
        ((key, value),) = part.items()
        if not isinstance(value, str):
            raise BadRecord("bad_field", f"content part {part!r} of record {record_id!r}")
        if key == "text":
            _check_text(value, record_id)
        elif media_type(value) != key:
            raise BadRecord("bad_media_name", f"{value!r} is not an {key} file name")


def validate(record: dict) -> None:
    record_id = _need(record, "id", str)
    kind = _need(record, "kind", str)
    if kind not in KINDS:
        raise BadRecord("bad_field", f"record {record_id!r}: kind {kind!r} is not one of {KINDS}")
    if kind in ("caption", "text"):
        _check_text(_need(record, "text", str), record_id)
    if kind == "caption":
        if media_type(_need(record, "image", str)) != "image":
            raise BadRecord("bad_media_name", f"record {record_id!r}: 'image' is not an image file name")
    if kind in ("video_caption", "grounding"):
        if media_type(_need(record, "video", str)) != "video":
            raise BadRecord("bad_media_name", f"record {record_id!r}: 'video' is not a video file name")
    if kind == "interleaved":
        _check_content(_need(record, "content", list), record_id)
    if kind == "video_caption":
        segments = _need(record, "segments", list)
        if not segments:
            raise BadRecord("bad_field", f"record {record_id!r} has no segments")
        for segment in segments:
            if not isinstance(segment, dict):
                raise BadRecord("bad_field", f"segment {segment!r} of record {record_id!r}")
            for key in ("start", "end"):
                _need(segment | {"id": record_id, "kind": kind}, key, (int, float))
            _check_text(_need(segment | {"id": record_id, "kind": kind}, "text", str), record_id)
    if kind == "grounding":
        _check_text(_need(record, "query", str), record_id)
        if not 0 <= _need(record, "start", (int, float)) <= _need(record, "end", (int, float)):
            raise BadRecord("bad_field", f"record {record_id!r}: need 0 <= start <= end")
    if kind == "chat":
        messages = _need(record, "messages", list)
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise BadRecord("missing_field", f"chat record {record_id!r} has no assistant turn")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
                raise BadRecord("bad_field", f"message {message!r} of record {record_id!r}")
            _check_content(message["content"], record_id)


def check_spans(record: dict, durations: dict[str, float]) -> tuple[dict, int]:
    """(the record with its time labels clipped to the video's duration, how many were clipped); raises
    BadRecord("span_out_of_range") for a label that starts at or after the end (rule in the module docstring).
    durations: probed duration in seconds by media name."""
    kind = record["kind"]
    if kind not in ("grounding", "video_caption") or record["video"] not in durations:
        return record, 0
    duration = float(durations[record["video"]])
    spans = [record] if kind == "grounding" else record["segments"]
    clipped = []
    for span in spans:
        start, end = float(span["start"]), float(span["end"])
        if end <= duration + SPAN_TOLERANCE_S:
            clipped.append(span)
        elif start < duration:
            clipped.append({**span, "end": duration})
        else:
            raise BadRecord(
                "span_out_of_range",
                f"record {record['id']!r}: span {start:g}-{end:g} s starts at or "
                f"after the end of its {duration:g} s video",
            )
    count = sum(a is not b for a, b in zip(spans, clipped))
    if not count:
        return record, 0
    return (clipped[0] if kind == "grounding" else {**record, "segments": clipped}), count


def media_names(record: dict) -> list[str]:
    """Media names in the order they appear in the rendered sample."""
    return [seg.value for seg in render(record) if seg.kind in ("image", "video")]


def _content_segments(content, supervised: bool) -> list[Segment]:
    if isinstance(content, str):
        return [Segment("text", content, supervised)] if content else []
    out = []
    for part in content:
        ((key, value),) = part.items()
        out.append(Segment(key, value, supervised and key == "text"))
    return out


def _chat(messages: list) -> list[Segment]:
    out = []
    for message in messages:
        target = message["role"] == "assistant"
        out.append(Segment("special", "im_start", False))
        out.append(Segment("text", message["role"] + "\n", False))
        out.extend(_content_segments(message["content"], target))
        out.append(Segment("special", "im_end", target))
        out.append(Segment("text", "\n", False))
    return out


def render(record: dict) -> list[Segment]:
    """The sample as segments, before tokenization and media expansion."""
    kind = record["kind"]
    if kind == "chat":
        return _chat(record["messages"])
    if kind == "grounding":
        question = [
            {"video": record["video"]},
            {"text": f"\nGive the start and end time in seconds of: {record['query']}"},
        ]
        answer = f"{float(record['start']):.1f} - {float(record['end']):.1f} seconds"
        return _chat([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    if kind == "caption":
        body = [Segment("image", record["image"], False), Segment("text", record["text"], True)]
    elif kind == "interleaved":
        body = _content_segments(record["content"], True)
    elif kind == "video_caption":
        lines = "".join(f"{float(s['start']):.1f}-{float(s['end']):.1f}s: {s['text']}\n" for s in record["segments"])
        body = [Segment("video", record["video"], False), Segment("text", lines, True)]
    else:  # text
        body = [Segment("text", record["text"], True)]
    return body + [Segment("special", "pad", True)]  # <|endoftext|> closes a document
