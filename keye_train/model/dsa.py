"""DeepSeek Sparse Attention in the LM's attention slot: the lightning indexer, the modes and the indexer loss.

`DSASelfAttention` is megatron's SelfAttention that also hands the layer's attention input (detached, gathered
over sequence parallelism) and the M-RoPE position ids to `DSACoreAttention`, which owns the indexer. The
indexer is replicated over TP: every TP rank computes the same selection from the same full-sequence input, and
the KL target sums the heads of all TP ranks. The indexer loss reaches the indexer only, through a pass-through
autograd function on the attention output (the MoE aux-loss pattern); the LM loss never reaches it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.attention import SelfAttention

from kernels import dsa as dsa_ops
from kernels.dense_attention import dense_varlen_attention
from kernels.dsa_reference import attention_target, causal_mask, indexer_logits, select_topk
from keye_train.config import DSAConfig, LMConfig, indexer_mrope_section
from keye_train.model.attention import KeyePackedSeqParams, VarlenCoreAttention
from keye_train.model.context_parallel import context_dsa


class LightningIndexer(torch.nn.Module):
    """x [T, hidden] -> queries [T, H_I, D_I], gates [T, H_I], the shared key [T, D_I] (fp32)."""

    def __init__(self, lm: LMConfig, dtype: torch.dtype):
        super().__init__()
        dsa = lm.dsa
        self.heads, self.head_dim = dsa.index_heads, dsa.index_head_dim
        self.q_proj = torch.nn.Linear(lm.hidden_size, self.heads * self.head_dim + self.heads, bias=False, dtype=dtype)
        self.k_proj = torch.nn.Linear(lm.hidden_size, self.head_dim, bias=False, dtype=dtype)
        self.q_norm = torch.nn.RMSNorm(self.head_dim, eps=lm.norm_eps, dtype=torch.float32)
        self.k_norm = torch.nn.LayerNorm(self.head_dim, eps=lm.norm_eps, dtype=torch.float32)
        self.section = indexer_mrope_section(lm)
        inv_freq = lm.rope_theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def rope_angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[T, D_I / 2]: chunked M-RoPE, the first sections[0] frequencies on t, then h, then w."""
        axis = torch.repeat_interleave(
            torch.arange(3, device=position_ids.device), torch.tensor(self.section, device=position_ids.device)
        )
        positions = position_ids.to(self.inv_freq.device).float()[axis]  # [D_I / 2, T]
        return (positions * self.inv_freq[:, None]).T

    @staticmethod
    def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE over the full last dim; angles [T, D / 2] broadcast over the middle dims of x."""
        shape = (angles.shape[0],) + (1,) * (x.dim() - 2) + (angles.shape[1],)
        cos, sin = torch.cos(angles).view(shape), torch.sin(angles).view(shape)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        total = x.shape[0]
        projected = self.q_proj(x.to(self.q_proj.weight.dtype)).float()
        split = self.heads * self.head_dim
        queries = self.q_norm(projected[:, :split].view(total, self.heads, self.head_dim))
        gates = projected[:, split:]
        key = self.k_norm(self.k_proj(x.to(self.k_proj.weight.dtype)).float())
        angles = self.rope_angles(position_ids)
        return self.rotate(queries, angles), gates, self.rotate(key, angles)


class IndexerLossInjector(torch.autograd.Function):
    """Identity on the attention output; its backward also sends d(total)/d(loss) = `scale` into `loss`."""

    @staticmethod
    def forward(ctx, output, loss, scale: float):
        ctx.scale = scale
        ctx.loss_meta = (loss.dtype, loss.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        dtype, device = ctx.loss_meta
        return grad_output, torch.full((), ctx.scale, dtype=dtype, device=device), None


class DSACoreAttention(VarlenCoreAttention):
    """Core attention with a lightning indexer: warm-up (dense attention) or sparse (shared top-k set)."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type="self",
        cp_comm_type=None,
        softmax_scale=None,
        pg_collection=None,
        lm: LMConfig = None,
    ):
        super().__init__(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            cp_comm_type,
            softmax_scale,
            pg_collection,
            backend=lm.attention_backend,
        )
        self.dsa: DSAConfig = lm.dsa
        self.indexer = LightningIndexer(lm, config.params_dtype)
        self.indexer_input = None  # (x [T, hidden], position_ids [3, T]), set by DSASelfAttention per call
        self.loss_scale = 1.0  # set per step: 1 / micro-batches (the schedule averages micro-batch losses)
        self.stats: list[dict[str, float]] = []  # per micro-batch, taken by DSAMetrics each step

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        seq, batch, heads, dim = query.shape
        if batch != 1 or packed_seq_params is None or self.indexer_input is None:
            raise ValueError("DSA runs on packed sequences (micro-batch 1) inside DSASelfAttention")
        cu = packed_seq_params.cu_seqlens_q
        q, k, v = (x.reshape(seq, x.shape[2], dim) for x in (query, key, value))
        x, position_ids = self.indexer_input
        index_q, index_w, index_k = self.indexer(x, position_ids)
        if getattr(packed_seq_params, "kv_cache", None) is not None:  # rollout: attend over the cache
            index = (index_q, index_w, index_k)
            out = packed_seq_params.kv_cache.attend_dsa(self.layer_number, q, k, v, index, self.scale, self.dsa)
            return out.view(seq, 1, heads * dim)
        budget = self.dsa.memory_budget_mb << 20
        opts = {"backend": self.dsa.backend, "budget_bytes": budget}
        tp_group = parallel_state.get_tensor_model_parallel_group()
        shard = getattr(packed_seq_params, "context", None)
        if shard is not None:  # CP
            return self._context_forward(q, k, v, index_q, index_w, index_k, shard, budget, tp_group)
        indices = lse = None
        if self.dsa.mode == "sparse":
            indices = dsa_ops.indexer_topk(
                index_q.detach(), index_w.detach(), index_k.detach(), cu, self.dsa.topk, **opts
            )
            if self.dsa.verify_tp_topk:
                _check_same_on_tp_ranks(indices, tp_group)
            out, lse = dsa_ops.sparse_gqa_attention(q, k, v, indices, self.scale, **opts)
        else:
            out = dense_varlen_attention(
                q,
                k,
                v,
                cu,
                causal=True,
                scale=self.scale,
                max_seqlen=packed_seq_params.max_seqlen_q,
                lengths=packed_seq_params.document_lengths,
                backend=self.backend,
            )
        out = out.view(seq, 1, heads * dim)
        if self.training and torch.is_grad_enabled():
            loss = dsa_ops.indexer_kl_loss(
                index_q,
                index_w,
                index_k,
                q,
                k,
                cu,
                self.scale,
                indices=indices,
                tp_group=tp_group,
                attn_lse=lse,
                **opts,
            )
            stats = {"kl": float(loss.detach())}
            if self.dsa.metric_rows > 0:
                stats.update(
                    selection_metrics(
                        index_q.detach(),
                        index_w.detach(),
                        index_k.detach(),
                        q.detach(),
                        k.detach(),
                        cu,
                        self.scale,
                        self.dsa.topk,
                        self.dsa.metric_rows,
                        tp_group,
                    )
                )
            self.stats.append(stats)
            out = IndexerLossInjector.apply(out, loss, self.dsa.loss_coeff * self.loss_scale)
        return out

    def _context_forward(self, q, k, v, index_q, index_w, index_k, shard, budget: int, tp_group):
        """Under CP (model/context_parallel.py): local queries against K/V and indexer keys gathered over CP."""
        seq, heads, dim = q.shape
        train = self.training and torch.is_grad_enabled()
        out, indices, loss = context_dsa(
            q,
            k,
            v,
            index_q,
            index_w,
            index_k,
            shard,
            self.dsa.mode,
            self.dsa.topk,
            self.scale,
            kl=train,
            tp_group=tp_group,
            backend=self.dsa.backend,
            budget_bytes=budget,
            attention_backend=self.backend,
        )
        if indices is not None and self.dsa.verify_tp_topk:
            _check_same_on_tp_ranks(indices, tp_group)
        out = out.view(seq, 1, heads * dim)
        if train:  # the selection metrics (metric_rows) need the whole sequence: not sampled under CP
            self.stats.append({"kl": float(loss.detach())})
            out = IndexerLossInjector.apply(out, loss, self.dsa.loss_coeff * self.loss_scale)
        return out


class DSASelfAttention(SelfAttention):
    """SelfAttention that lends its (detached) input and the position ids to the DSA core attention."""

    def forward(self, hidden_states, *args, packed_seq_params=None, **kwargs):
        if not isinstance(packed_seq_params, KeyePackedSeqParams) or packed_seq_params.position_ids is None:
            raise ValueError("DSA needs KeyePackedSeqParams with position_ids (model/keye_vl.py packed_params)")
        x = hidden_states.detach()
        if self.config.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        self.core_attention.indexer_input = (x.reshape(-1, x.shape[-1]), packed_seq_params.position_ids)
        try:
            return super().forward(hidden_states, *args, packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self.core_attention.indexer_input = None


def _check_same_on_tp_ranks(indices: torch.Tensor, tp_group) -> None:
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    digest = torch.stack(
        [indices.long().sum(), (indices.long() * torch.arange(1, indices.shape[1] + 1, device=indices.device)).sum()]
    ).double()
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(gathered, digest, group=tp_group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("DSA top-k selections differ across TP ranks")


@torch.no_grad()
def selection_metrics(
    index_q, index_w, index_k, attn_q, attn_k, cu_seqlens, scale: float, topk: int, rows: int, tp_group
) -> dict[str, float]:
    """On `rows` sampled query rows of the pack's longest document (needs > topk visible keys to be informative):
    recall = dense attention mass inside the indexer's top-k set; overlap = |S_t & S_t+1| / |S_t| for adjacent
    queries; union16 = |union of 16 consecutive sets| / topk (the sparse kernel's gather cost)."""
    bounds = cu_seqlens.tolist()
    start, end = max(zip(bounds[:-1], bounds[1:]), key=lambda b: b[1] - b[0])
    first = min(end - 1, start + topk)  # rows past the first topk tokens select a strict subset
    picks = torch.linspace(first, max(first, end - 17), steps=rows).round().long().unique().tolist()
    recall, overlap, union = [], [], []
    for r in picks:
        r1 = min(end, r + 16)
        valid = causal_mask(start, r, r1, index_q.device)
        chosen = select_topk(indexer_logits(index_q[r:r1], index_w[r:r1], index_k[start:r1]), valid, topk)
        target = attention_target(attn_q, attn_k, start, r, r + 1, None, scale, tp_group)
        recall.append(float((target[0] * chosen[0, : target.shape[1]].to(target.dtype)).sum()))
        if r1 - r > 1:
            overlap.append(float((chosen[0] & chosen[1]).sum()) / max(1, float(chosen[0].sum())))
        union.append(float(chosen.any(0).sum()) / topk)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"recall": mean(recall), "overlap": mean(overlap), "union16": mean(union)}


def dsa_core_attentions(module: torch.nn.Module) -> list[DSACoreAttention]:
    return [m for m in module.modules() if isinstance(m, DSACoreAttention)]


def set_indexer_loss_scale(module: torch.nn.Module, scale: float) -> None:
    for attention in dsa_core_attentions(module):
        attention.loss_scale = scale
