"""A HF `tokenizer.json` (via the `tokenizers` library) with Keye's special tokens resolved by name.

Text is always encoded segment by segment, with no special-token parsing inside user text, so token counts
computed when shards are indexed equal the counts at training time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer


@dataclass
class TokenIds:
    """Special token ids (Qwen3-VL's by default). A run takes them from `data.tokenizer`."""

    pad: int = 151643
    im_start: int = 151644
    im_end: int = 151645
    vision_start: int = 151652
    vision_end: int = 151653
    image_pad: int = 151655
    video_pad: int = 151656
    frame: int = 151669  # added after </think> when the tokenizer has no <|frame|>


SPECIAL_NAMES = {
    "pad": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "frame": "<|frame|>",
}
FRAME_TOKEN = SPECIAL_NAMES["frame"]


def file_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class KeyeTokenizer:
    """Encodes text segments and exposes the special ids as `TokenIds`.

    `<|frame|>` is added as a special token when the file lacks it (the Qwen3-VL tokenizer does: it then gets
    id 151669, right after `</think>`). Every other special token must be present.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {self.path} does not exist")
        self.fingerprint = file_fingerprint(self.path)
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.encode_special_tokens = True  # "<|im_start|>" typed in user text stays text
        if self._tok.token_to_id(FRAME_TOKEN) is None:
            self._tok.add_special_tokens([FRAME_TOKEN])
        missing = [name for name in SPECIAL_NAMES.values() if self._tok.token_to_id(name) is None]
        if missing:
            raise ValueError(f"tokenizer {self.path} lacks the special tokens {missing}")
        self.ids = TokenIds(**{field: self._tok.token_to_id(name) for field, name in SPECIAL_NAMES.items()})
        self.encode = lru_cache(maxsize=4096)(self._encode)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self._tok.encode(text, add_special_tokens=False, is_pretokenized=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def timestamp_ids(self, seconds: float) -> tuple[int, ...]:
        """`<|frame|>` plus the time in seconds to one decimal, e.g. `<|frame|>12.5`."""
        return (self.ids.frame,) + self.encode(f"{seconds:.1f}")
