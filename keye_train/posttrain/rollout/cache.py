"""The rollout's KV cache and the attention over it, called from our core-attention slot.

Megatron rotates q and k with the pack's M-RoPE ids before the core-attention slot, so the cache stores keys
after RoPE and never re-rotates them. One `KVCache` holds, per LM layer (megatron's global 1-based
`layer_number`), keys and values [slots, capacity, Hkv_local, D] in the model's dtype and, for DSA, the
indexer keys [slots, capacity, D_I] in fp32. A sequence owns one slot; its cached length lives on the host.

Each forward of the engine is one ragged pack of segments (a prompt chunk, or one decode token per running
sequence). `CacheStep`, carried on `KeyePackedSeqParams.kv_cache`, tells the core attention where each
segment's rows go: segment i writes its n_i new rows at [slot_i, start_i : start_i + n_i] and its query j
attends to the slot's rows 0 .. start_i + j (causal over the whole cached history). Segments with slot -1
are padding (EP/SP lockstep): nothing is written and their output is zero.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import dsa as dsa_ops
from kernels.dense_attention import dense_varlen_attention

PAD_SLOT = -1


class KVCache:
    def __init__(
        self,
        layers: list[int],
        slots: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
        index_dim: int | None = None,
    ):
        self.slots, self.capacity = slots, capacity
        shape = (slots, capacity, kv_heads, head_dim)
        self.k = {n: torch.zeros(shape, dtype=dtype, device=device) for n in layers}
        self.v = {n: torch.zeros(shape, dtype=dtype, device=device) for n in layers}
        self.index_k = {}
        if index_dim is not None:
            self.index_k = {
                n: torch.zeros(slots, capacity, index_dim, dtype=torch.float32, device=device) for n in layers
            }
        self.lengths = [0] * slots

    def nbytes(self) -> int:
        tensors = [*self.k.values(), *self.v.values(), *self.index_k.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def fork(self, source: int, targets: list[int]) -> None:
        """Copy the source slot's cached rows into each target slot (a group's G samples share one prefill)."""
        if not targets:
            return
        length = self.lengths[source]
        index = torch.tensor(targets, device=next(iter(self.k.values())).device)
        for table in (self.k, self.v, self.index_k):
            for rows in table.values():
                rows[index, :length] = rows[source, :length]
        for slot in targets:
            self.lengths[slot] = length

    def step(self, slots: list[int], counts: list[int]) -> CacheStep:
        starts = [self.lengths[s] if s != PAD_SLOT else 0 for s in slots]
        for slot, start, count in zip(slots, starts, counts):
            if slot != PAD_SLOT and start + count > self.capacity:
                raise ValueError(
                    f"slot {slot} would hold {start + count} tokens, over rollout.capacity={self.capacity}"
                )
        return CacheStep(self, slots, starts, counts)

    def commit(self, step: CacheStep) -> None:
        """After the forward: the pack's rows are now part of each slot's history."""
        for slot, start, count in zip(step.slots, step.starts, step.counts):
            if slot != PAD_SLOT:
                self.lengths[slot] = start + count


@dataclass
class _Segment:
    slot: int
    start: int  # cached rows before this pack
    count: int  # new rows in this pack
    offset: int  # first row of the segment in the pack


class CacheStep:
    """One pack's view of the cache: written and attended by every layer's core attention."""

    def __init__(self, cache: KVCache, slots: list[int], starts: list[int], counts: list[int]):
        self.cache, self.slots, self.starts, self.counts = cache, slots, starts, counts
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        self.total = offsets[-1]
        segments = [_Segment(s, p, n, o) for s, p, n, o in zip(slots, starts, counts, offsets)]
        self.single = [g for g in segments if g.slot != PAD_SLOT and g.count == 1]  # batched (decode)
        self.chunks = [g for g in segments if g.slot != PAD_SLOT and g.count > 1]  # one at a time (prefill)
        device = next(iter(cache.k.values())).device
        self._single_rows = torch.tensor([g.offset for g in self.single], dtype=torch.long, device=device)
        self._single_slots = torch.tensor([g.slot for g in self.single], dtype=torch.long, device=device)
        self._single_pos = torch.tensor([g.start for g in self.single], dtype=torch.long, device=device)
        self._single_len = max((g.start + 1 for g in self.single), default=0)
        # The decode batch reads the cache through a view of the slot range it spans, not a gather (a gather
        # copies B x L rows per layer); slots in the range that do not decode this step get a zero query that
        # sees row 0 only, and their output is dropped. A range over twice the batch falls back to the gather.
        slot_ids = [g.slot for g in self.single]
        self._low = min(slot_ids, default=0)
        span = max(slot_ids, default=-1) + 1 - self._low
        self._use_range = span <= 2 * len(slot_ids)
        batch_rows = self._single_slots - self._low if self._use_range else torch.arange(len(slot_ids), device=device)
        self._batch_rows, self._batch_size = batch_rows, span if self._use_range else len(slot_ids)
        limit = torch.zeros(self._batch_size, dtype=torch.long, device=device)
        limit[batch_rows] = self._single_pos
        visible = torch.arange(self._single_len, device=device)[None, :] <= limit[:, None]
        self._single_mask = visible[:, None, None, :]  # [batch, 1, 1, L]

    # ---- writes -----------------------------------------------------------------------------------------------

    def _write(self, table: torch.Tensor, rows: torch.Tensor) -> None:
        if self.single:
            table[self._single_slots, self._single_pos] = rows[self._single_rows].to(table.dtype)
        for g in self.chunks:
            table[g.slot, g.start : g.start + g.count] = rows[g.offset : g.offset + g.count].to(table.dtype)

    def _history(self, table: torch.Tensor) -> torch.Tensor:
        """[batch, L, ...] cached rows of the single-token segments' slots (see __init__)."""
        if self._use_range:
            return table[self._low : self._low + self._batch_size, : self._single_len]
        return table[self._single_slots, : self._single_len]

    # ---- dense attention --------------------------------------------------------------------------------------

    def _dense(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q [T, Hq, D], k, v [T, Hkv, D] of the pack -> [T, Hq, D]; writes k, v into the cache first."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        self._write(keys, k)
        self._write(values, v)
        out = torch.zeros_like(q)
        if self.single:
            self._dense_single(out, q, keys, values, scale)
        fresh = [g for g in self.chunks if g.start == 0]
        if fresh:  # first chunks of prompts see only themselves: one varlen call, the training kernel
            self._dense_fresh(out, q, k, v, fresh, scale)
        for g in self.chunks:
            if g.start > 0:
                self._dense_chunk(out, q, keys, values, g, scale)
        return out

    @staticmethod
    def _dense_fresh(out, q, k, v, fresh: list[_Segment], scale):
        rows = torch.cat([torch.arange(g.offset, g.offset + g.count, device=q.device) for g in fresh])
        lengths = [g.count for g in fresh]
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=q.device)
        out[rows] = dense_varlen_attention(
            q[rows], k[rows], v[rows], cu, causal=True, scale=scale, max_seqlen=max(lengths), lengths=lengths
        )

    def _dense_single(self, out, q, keys, values, scale):
        qs = q.new_zeros(self._batch_size, q.shape[1], 1, q.shape[2])
        qs[self._batch_rows, :, 0] = q[self._single_rows]  # [batch, Hq, 1, D]
        ks, vs = (self._history(t).transpose(1, 2) for t in (keys, values))  # [batch, Hkv, L, D]
        o = decode_attention(qs, ks, vs, self._single_mask, scale)
        out[self._single_rows] = o[self._batch_rows, :, 0]

    @staticmethod
    def _dense_chunk(out, q, keys, values, g: _Segment, scale):
        end = g.start + g.count
        qs = q[g.offset : g.offset + g.count].transpose(0, 1)[None]  # [1, Hq, n, D]
        ks, vs = (t[g.slot, :end].transpose(0, 1)[None] for t in (keys, values))  # [1, Hkv, end, D]
        if g.start == 0:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:  # a later chunk over the cached prefix
            rows = slice(g.offset, g.offset + g.count)
            out[rows] = chunk_attention(q[rows], keys[g.slot, :end], values[g.slot, :end], g.start, scale)
            return
        out[g.offset : g.offset + g.count] = o[0].transpose(0, 1)

    def attend(self, layer: int, query, key, value, scale: float) -> torch.Tensor:
        """VarlenCoreAttention's cache path: sbhd [T, 1, H, D] inputs -> [T, 1, Hq * D]."""
        seq, batch, heads, dim = query.shape
        if batch != 1 or seq != self.total:
            raise ValueError(f"the KV cache expects one packed sequence of {self.total} rows, got {tuple(query.shape)}")
        q, k, v = (x.reshape(seq, x.shape[2], dim) for x in (query, key, value))
        return self._dense(layer, q, k, v, scale).view(seq, 1, heads * dim)

    # ---- DSA --------------------------------------------------------------------------------------------------

    def attend_dsa(self, layer: int, q, k, v, index, scale: float, dsa) -> torch.Tensor:
        """DSACoreAttention's cache path: q [T, Hq, D], k, v [T, Hkv, D], index = (index_q, index_w, index_k) of
        the pack -> [T, Hq, D]. Warm-up and dense modes attend densely; sparse mode attends densely while a
        sequence's context is at most `dsa.topk` rows, else over the indexer's top-k of the cached rows."""
        index_q, index_w, index_k = index
        self._write(self.cache.index_k[layer], index_k)
        if dsa.mode != "sparse":
            return self._dense(layer, q, k, v, scale)
        keys, values = self.cache.k[layer], self.cache.v[layer]
        self._write(keys, k)
        self._write(values, v)
        out = torch.zeros_like(q)
        capacity, topk = self.cache.capacity, dsa.topk
        opts = {"backend": dsa.backend, "budget_bytes": dsa.memory_budget_mb << 20}
        if self.single and self._single_len <= topk:
            self._dense_single(out, q, keys, values, scale)
        sparse_rows, sparse_sets = [], []
        segments = self.chunks + (self.single if self._single_len > topk else [])
        for g in segments:
            if g.start + g.count <= topk:
                self._dense_chunk(out, q, keys, values, g, scale)
                continue
            rows = slice(g.offset, g.offset + g.count)
            local = dsa_ops.indexer_topk_cached(
                index_q[rows], index_w[rows], self.cache.index_k[layer][g.slot], g.start, topk, **opts
            )
            sparse_rows.append(torch.arange(g.offset, g.offset + g.count, device=q.device))
            sparse_sets.append(torch.where(local >= 0, local + g.slot * capacity, local))
        if sparse_rows:
            rows, sets = torch.cat(sparse_rows), torch.cat(sparse_sets)
            flat_k, flat_v = (t.view(-1, *t.shape[2:]) for t in (keys, values))
            o, _ = dsa_ops.sparse_gqa_attention(q[rows], flat_k, flat_v, sets, scale, **opts)
            out[rows] = o.to(out.dtype)
        return out


_FUSED = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]
_FUSED_OK: dict = {}


def _fused(q, k, v, mask, scale):
    with sdpa_kernel(_FUSED):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def _fused_works(dtype, device, heads: int, kv_heads: int, dim: int) -> bool:
    """Whether a fused SDPA kernel takes masked GQA decode on strided cache views and agrees with the grouped
    matmuls (checked once per layout on small random inputs)."""
    g = torch.Generator(device=device).manual_seed(0)
    table_k, table_v = (torch.randn(6, 80, kv_heads, dim, generator=g, device=device).to(dtype) for _ in range(2))
    k, v = (t[1:5, :70].transpose(1, 2) for t in (table_k, table_v))
    q = torch.randn(4, heads, 1, dim, generator=g, device=device).to(dtype)
    mask = torch.arange(70, device=device)[None, :] <= torch.tensor([69, 0, 33, 50], device=device)[:, None]
    mask = mask[:, None, None, :]
    try:
        fused = _fused(q, k, v, mask, 0.1).float()
    except RuntimeError as err:
        warnings.warn(f"rollout decode attention: no fused SDPA kernel ({err}); using grouped matmuls", stacklevel=3)
        return False
    reference = grouped_decode_attention(q.float(), k.float(), v.float(), mask, 0.1)
    error = float((fused - reference).norm() / reference.norm())
    if not error < 2e-2:
        warnings.warn(f"rollout decode attention: a fused SDPA kernel is off by {error}; using matmuls", stacklevel=3)
        return False
    return True


def decode_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """One query row per sequence: q [B, Hq, 1, D], k, v [B, Hkv, L, D] (strided views of the cache), mask
    [B, 1, 1, L] bool -> [B, Hq, 1, D]. On CUDA a fused SDPA kernel if one takes masked GQA and passes a
    one-time check (torch's math fallback would repeat K and V over the query heads: 8x the cache reads at
    32 / 4 heads), else `grouped_decode_attention`; on the CPU SDPA (math, exact)."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    key = (q.dtype, q.device, q.shape[1], k.shape[1], q.shape[3])
    if key not in _FUSED_OK:
        _FUSED_OK[key] = _fused_works(*key)
    if _FUSED_OK[key]:
        return _fused(q, k, v, mask, scale)
    return grouped_decode_attention(q, k, v, mask, scale)


def grouped_decode_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Masked GQA decode without repeating K / V: per KV head, two batched matmuls on the cache views (the
    scores in the input dtype with fp32 accumulation, the softmax in fp32)."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    for h in range(kv_heads):
        qh = q[:, h * group : (h + 1) * group, 0, :]  # [B, G, D]
        scores = torch.bmm(qh, k[:, h].transpose(1, 2))  # [B, G, L]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out[:, h * group : (h + 1) * group, 0, :] = torch.bmm(probs, v[:, h])
    return out


CHUNK_SCORE_BYTES = 256 << 20  # fp32 scores of one block of query rows in chunk_attention


def chunk_attention(q, keys, values, start: int, scale: float, budget: int = CHUNK_SCORE_BYTES) -> torch.Tensor:
    """A prompt chunk after `start` cached rows: q [n, Hq, D] at positions start .. start + n - 1, keys and
    values [start + n, Hkv, D] (the slot's rows, a view) -> [n, Hq, D]; row j sees keys 0 .. start + j.
    Blocks of query rows and one KV head at a time, so neither the scores nor K / V repeated over the query
    heads (what SDPA's math fallback does for a masked GQA call) outgrow `budget`."""
    count, heads, dim = q.shape
    end, kv_heads = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    block = max(1, budget // (4 * group * end))
    out = torch.empty_like(q)
    columns = torch.arange(end, device=q.device)
    for r0 in range(0, count, block):
        r1 = min(count, r0 + block)
        visible = columns[None, :] <= torch.arange(start + r0, start + r1, device=q.device)[:, None]  # [b, end]
        for h in range(kv_heads):
            qh = q[r0:r1, h * group : (h + 1) * group].transpose(0, 1)  # [G, b, D]
            scores = torch.matmul(qh, keys[:, h].t())  # [G, b, end]
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(values.dtype)
            out[r0:r1, h * group : (h + 1) * group] = torch.matmul(probs, values[:, h]).transpose(0, 1)
    return out
