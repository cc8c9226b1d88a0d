"""The packed micro-batch that every stage of the model consumes.

One micro-batch is one packed sequence of fixed length S (micro_batch_size 1, THD-style packing):
several samples are concatenated, each with its own positions, and `cu_seqlens` keeps them apart in
attention. The tail that no sample fills is one padding document with no supervised tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class VisualInput:
    """Patches of every image and video frame in a pack, in the order their pad tokens appear.

    patches: [N, 3 * patch * patch] float32, channel-major (c, y, x) per patch, raster order per frame.
    grids:   [F, 2] int64, the (rows, cols) patch grid of each image or frame; both even (2x2 merge).
    """

    patches: torch.Tensor
    grids: torch.Tensor

    @property
    def num_frames(self) -> int:
        return int(self.grids.shape[0])

    def frame_cu_seqlens(self) -> torch.Tensor:
        """[F + 1] int32 offsets of each frame's patches (one attention segment per frame)."""
        sizes = self.grids.prod(dim=1)
        return torch.nn.functional.pad(sizes.cumsum(0), (1, 0)).to(torch.int32)

    def num_merged_tokens(self) -> int:
        return int((self.grids.prod(dim=1) // 4).sum())


@dataclass
class PackedBatch:
    """input_ids, labels: [S] int64. loss_mask: [S] float32, 1 where labels[t] is supervised.
    position_ids: [3, S] int64 M-RoPE ids (t, h, w), restarting at 0 for every sample.
    cu_seqlens: [D + 1] int32 document boundaries; cu_seqlens[-1] == S.
    sample_ids: ids of the samples packed here (for exact-resume checks and logging).
    visual_mask: [S] bool, the rows that take the ViT's embeddings; None: every image_pad / video_pad id (a rollout
    response may sample those ids, which are text there: its pack marks only the prompt's rows).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    visual: VisualInput | None = None
    sample_ids: list[int] = field(default_factory=list)
    visual_mask: torch.Tensor | None = None

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[0])

    def num_supervised(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device) -> PackedBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device, non_blocking=True)
            elif isinstance(value, VisualInput):
                moved[f.name] = VisualInput(value.patches.to(device), value.grids.to(device))
        return replace(self, **moved)
