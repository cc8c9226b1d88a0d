"""A Hugging Face checkpoint folder read lazily: one model.safetensors or an index of shards, a few files
mapped at a time, and which layout it holds (Keye-VL-2.0, a Qwen3-MoE LM or a SigLIP vision tower)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from keye_train.convert.hf_names import PACKING_TABLE


class HFCheckpoint:
    """The tensors of an HF checkpoint folder (one model.safetensors or an index of shards), read lazily."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.root / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.root / "model.safetensors").is_file():
            with safe_open(self.root / "model.safetensors", framework="pt") as f:
                self.files = {k: self.root / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.root}: no model.safetensors or model.safetensors.index.json")
        config = self.root / "config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}
        self._open: dict[Path, object] = {}  # a few open files: a closed one releases its mapped pages
        self.read: set[str] = set()

    def _handle(self, name: str):
        if name not in self.files:
            raise KeyError(f"{self.root}: tensor {name} is missing")
        path = self.files[name]
        if path not in self._open:
            if len(self._open) >= 2:
                self._open.pop(next(iter(self._open)))
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        self.read.add(name)
        if index is None:
            return self._handle(name).get_tensor(name)
        return self._handle(name).get_slice(name)[index]

    def layout(self) -> str:
        kind = self.config.get("model_type", "")
        if kind == "qwen3_moe":
            return "qwen3_moe"
        if kind.startswith("siglip"):
            return "siglip"
        return "keye_vl"

    def vit_prefix(self) -> str | None:
        if self.layout() == "siglip" and not any(k.startswith("vision_model.") for k in self.files):
            return ""  # a bare SiglipVisionModel
        return None

    def expert_format(self) -> str:
        if any(".mlp.experts.0.gate_proj.weight" in k for k in self.files):
            return "per_expert"
        return "fused_out_in" if self.layout() == "qwen3_moe" else "fused_in_out"


def holds_part(layout: str, name: str) -> bool:
    if layout == "qwen3_moe":
        return name.startswith("lm.")
    if layout == "siglip":
        return name.startswith("vision.") and not name.startswith("vision.projector.")
    return True


def passthrough_tensors(src: str | Path) -> dict[str, torch.Tensor]:
    """Checkpoint tensors we do not model but carry through a round trip (the unused ViT packing table)."""
    ckpt = HFCheckpoint(src)
    return {PACKING_TABLE: ckpt.get(PACKING_TABLE)} if PACKING_TABLE in ckpt.files else {}
