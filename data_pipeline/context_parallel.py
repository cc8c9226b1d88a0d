"""Context-parallel slices of a packed batch (parallel.cp): which rows of every packed sequence a CP rank holds.

Causal attention costs more late in a document than early, so each document is cut into 2*cp equal chunks and
CP rank r takes chunks r and 2*cp-1-r (one early, one late: the same work on every rank). A document is first
padded at its end to a multiple of 2*cp; the pad rows are masked out of the loss and out of MoE routing
statistics, and sit after every real token of their document, so causal attention never lets a real token see
one. The last document takes any extra padding that makes every micro-batch of a step the same length (pipeline
stages exchange fixed shapes) and the slice divisible by the sequence-parallel size.

Every rank keeps the whole visual input (the ViT is not sliced); `visual_rows` picks, for each visual pad row of
the slice, its row of the ViT's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from data_pipeline.batch import PackedBatch


def padded_length(lengths: list[int], cp: int, align: int = 1) -> int:
    """Smallest packed length after padding each document to a multiple of 2*cp, rounded up so the length divides
    by cp * align (align: the sequence-parallel size, so every rank's slice splits evenly over TP)."""
    total = sum(-(-n // (2 * cp)) * 2 * cp for n in lengths)
    step = math.lcm(2 * cp, cp * align)
    return -(-total // step) * step


def _document_lengths(batch: PackedBatch) -> list[int]:
    cu = batch.cu_seqlens.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def pad_documents(
    batch: PackedBatch, cp: int, pad_id: int, total: int | None = None
) -> tuple[PackedBatch, torch.Tensor]:
    """The batch with each document padded at its end to a multiple of 2*cp, and the last one further to `total`
    tokens (default: padded_length). Returns (padded batch, pad [S'] bool: True on the rows added here)."""
    lengths = _document_lengths(batch)
    padded = [-(-n // (2 * cp)) * 2 * cp for n in lengths]
    total = padded_length(lengths, cp) if total is None else total
    if total < sum(padded) or (total - sum(padded)) % (2 * cp):
        raise ValueError(f"cannot pad {sum(padded)} tokens to {total} in multiples of 2*cp={2 * cp}")
    padded[-1] += total - sum(padded)
    ids, labels, mask, positions, pad = [], [], [], [], []
    start = 0
    for n, p in zip(lengths, padded):
        end, extra = start + n, p - n
        ids += [batch.input_ids[start:end], batch.input_ids.new_full((extra,), pad_id)]
        labels += [batch.labels[start:end], batch.labels.new_full((extra,), pad_id)]
        mask += [batch.loss_mask[start:end], batch.loss_mask.new_zeros(extra)]
        doc_positions = batch.position_ids[:, start:end]
        last = doc_positions[:, -1:] if n else doc_positions.new_full((3, 1), -1)
        steps = torch.arange(1, extra + 1, dtype=doc_positions.dtype, device=doc_positions.device)
        positions += [doc_positions, last + steps]  # pad rows continue the document's positions
        pad += [torch.zeros(n, dtype=torch.bool), torch.ones(extra, dtype=torch.bool)]
        start = end
    cu = torch.tensor([0] + padded, dtype=torch.int64).cumsum(0).to(batch.cu_seqlens.dtype)
    out = replace(
        batch,
        input_ids=torch.cat(ids),
        labels=torch.cat(labels),
        loss_mask=torch.cat(mask),
        position_ids=torch.cat(positions, dim=1).contiguous(),
        cu_seqlens=cu.to(batch.cu_seqlens.device),
    )
    return out, torch.cat(pad).to(batch.input_ids.device)


@dataclass
class ContextShard:
    """Where one CP rank's rows sit in the padded packed sequence, and what each of its queries may attend to.

    rows:          [n] int64 global (padded) positions of this rank's rows, in local order
    gather_order:  [S'] int64 for each global position, its row in the rank-major all-gather of every rank's rows
    Query segments (two per document: its chunks r and 2cp-1-r), in local order, all on the host:
    q_lengths:     rows of each segment (its chunk size)
    k_starts:      global position where the segment's document starts (its keys run from there)
    k_lengths:     keys each segment sees: the document up to the end of its chunk (causal, bottom-right aligned)
    pad:           [n] bool, True on pad rows added for CP
    visual_rows:   [v] int64, for each visual pad row of the slice (in local order) its row of the ViT output
    real_length:   rows of the packed sequence before the CP padding (over all ranks)
    """

    cp: int
    rank: int
    rows: torch.Tensor
    gather_order: torch.Tensor
    q_lengths: list[int]
    k_starts: list[int]
    k_lengths: list[int]
    pad: torch.Tensor
    visual_rows: torch.Tensor
    real_length: int = 0

    @property
    def num_segments(self) -> int:
        return len(self.q_lengths)

    def cu_seqlens_q(self) -> torch.Tensor:
        return torch.tensor([0] + self.q_lengths, dtype=torch.int64, device=self.rows.device).cumsum(0).int()

    def cu_seqlens_k(self) -> torch.Tensor:
        return torch.tensor([0] + self.k_lengths, dtype=torch.int64, device=self.rows.device).cumsum(0).int()

    def key_rows(self) -> torch.Tensor:
        """[sum k_lengths] global positions of every segment's keys, segment after segment."""
        spans = [torch.arange(s, s + n) for s, n in zip(self.k_starts, self.k_lengths)]
        return torch.cat(spans).to(self.rows.device) if spans else self.rows.new_zeros(0)

    def to(self, device) -> ContextShard:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in values.items() if isinstance(v, torch.Tensor)})


def chunk_rows(padded_lengths: list[int], cp: int, rank: int) -> tuple[list[tuple[int, int]], list[int]]:
    """This rank's two chunks of each document as (global start, chunk index, chunk size); each document's start."""
    chunks, starts, start = [], [], 0
    for p in padded_lengths:
        size = p // (2 * cp)
        for index in (rank, 2 * cp - 1 - rank):
            chunks.append((start + index * size, index, size))
        starts.append(start)
        start += p
    return chunks, starts


def context_shard(padded_lengths: list[int], cp: int, rank: int, visual: torch.Tensor | None = None) -> ContextShard:
    """The shard of CP rank `rank` over documents of `padded_lengths` (each a multiple of 2*cp); `visual` [S'] bool
    marks the visual pad rows of the padded sequence."""
    if any(p % (2 * cp) for p in padded_lengths):
        raise ValueError(f"document lengths {padded_lengths} are not multiples of 2*cp = {2 * cp}")

    def rows_of(r):
        chunks, _ = chunk_rows(padded_lengths, cp, r)
        spans = [torch.arange(s, s + n) for s, _, n in chunks]
        return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.int64)

    chunks, starts = chunk_rows(padded_lengths, cp, rank)
    rows = rows_of(rank)
    gathered = torch.cat([rows_of(r) for r in range(cp)])
    q_lengths, k_starts, k_lengths = [], [], []
    for (_, index, size), doc_start in zip(chunks, [s for s in starts for _ in (0, 1)]):
        q_lengths.append(size)
        k_starts.append(doc_start)
        k_lengths.append((index + 1) * size)
    total = sum(padded_lengths)
    visual = torch.zeros(total, dtype=torch.bool) if visual is None else visual.cpu()
    visual_index = visual.long().cumsum(0) - 1  # row of the ViT output for each visual position
    mine = visual[rows]
    return ContextShard(
        cp=cp,
        rank=rank,
        rows=rows,
        gather_order=torch.argsort(gathered),
        q_lengths=q_lengths,
        k_starts=k_starts,
        k_lengths=k_lengths,
        pad=torch.zeros(rows.numel(), dtype=torch.bool),
        visual_rows=visual_index[rows][mine],
        real_length=total,
    )


@dataclass
class ContextSlicedBatch(PackedBatch):
    """A CP rank's slice of a packed batch: input_ids, labels, loss_mask [n], position_ids [3, n] and cu_seqlens
    (the query segments, two per document) are local; `visual` is the whole pack's (the ViT runs in full);
    `shard` says where each row sits in the padded sequence of `full_length` tokens."""

    shard: ContextShard = None
    full_length: int = 0

    def to(self, device) -> ContextSlicedBatch:
        moved = PackedBatch.to(self, device)
        return replace(moved, shard=self.shard.to(device))


def slice_batch(
    batch: PackedBatch, cp: int, rank: int, pad_id: int, visual_ids: tuple[int, ...], total: int | None = None
) -> ContextSlicedBatch:
    """CP rank `rank`'s slice of `batch` (padded to `total` tokens, default padded_length); visual_ids: the token
    ids whose rows take ViT embeddings."""
    if batch.visual_mask is not None:  # a rollout pack (RL and MOPD refuse parallel.cp > 1 in the config layer)
        raise ValueError("context parallelism slices visual rows by token id: a batch with visual_mask is not taken")
    padded, pad = pad_documents(batch, cp, pad_id, total)
    lengths = _document_lengths(padded)
    visual = torch.zeros_like(pad)
    for token in visual_ids:
        visual |= padded.input_ids == token
    shard = context_shard(lengths, cp, rank, visual.cpu())
    device = batch.input_ids.device
    rows = shard.rows.to(device)
    shard = replace(shard, pad=pad[rows], real_length=batch.seq_length).to(device)
    return ContextSlicedBatch(
        input_ids=padded.input_ids[rows],
        labels=padded.labels[rows],
        loss_mask=padded.loss_mask[rows],
        position_ids=padded.position_ids[:, rows].contiguous(),
        cu_seqlens=shard.cu_seqlens_q().to(batch.cu_seqlens.dtype),
        visual=batch.visual,
        sample_ids=list(batch.sample_ids),
        shard=shard,
        full_length=padded.seq_length,
    )


def slice_step(
    microbatches: list[PackedBatch], cp: int, rank: int, pad_id: int, visual_ids: tuple[int, ...], align: int = 1
) -> list[ContextSlicedBatch]:
    """One step's micro-batches, each padded to the step's common length (pipeline stages exchange one shape),
    then sliced for CP rank `rank`."""
    total = max(padded_length(_document_lengths(b), cp, align) for b in microbatches)
    return [slice_batch(b, cp, rank, pad_id, visual_ids, total) for b in microbatches]
