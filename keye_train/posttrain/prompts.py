"""A user turn (text, optionally one video or image file) as a rollout `Prompt` ending in the assistant header,
laid out by the data pipeline's own chat rendering (the same tokens, timestamps and patches as in training)."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.batch import VisualInput
from data_pipeline.encode import MediaBudget, encode_sample
from data_pipeline.tokenizer import KeyeTokenizer
from keye_train.posttrain.rollout import Prompt

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def chat_prompt(tokenizer: KeyeTokenizer, text: str, budget: MediaBudget, media: str | Path | None = None) -> Prompt:
    """`<|im_start|>user\\n[<media>]{text}<|im_end|>\\n<|im_start|>assistant\\n` with the media's patches."""
    content: list[dict] = []
    files: dict[str, bytes] = {}
    if media is not None:
        path = Path(media)
        if not path.is_file():
            raise FileNotFoundError(f"prompt media {path} does not exist")
        kind = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
        name = f"media{path.suffix.lower()}"
        files[name] = path.read_bytes()
        content.append({kind: name})
    content.append({"text": text})
    record = {"kind": "chat", "messages": [{"role": "user", "content": content}]}
    encoded = encode_sample("prompt", record, files, tokenizer, budget)
    ids = tokenizer.ids
    tail = [ids.im_start, *tokenizer.encode("assistant\n")]
    input_ids = encoded.input_ids.tolist() + tail
    import torch

    visual = VisualInput(encoded.patches, encoded.patch_grids) if encoded.patch_grids.numel() else None
    return Prompt(torch.tensor(input_ids, dtype=torch.long), visual)
