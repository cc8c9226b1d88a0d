"""Decode as one CUDA-graph replay: a pure decode step over every cache slot, captured once, replayed per token.

At small token counts a decode step is bound by the host: megatron's modules launch several hundred kernels per
layer and the MoE dispatcher reads the per-expert counts back to the host every layer, so the GPU waits on
Python (measured on the 48-layer model: ~230 ms a step, flat in the batch). A pure decode step (one token per
running sequence, no prompt chunk) has the same shapes every time if it always runs all S slots, so it is
captured in a CUDA graph and replayed with new inputs:
- the pack is the S slots in slot order, one row each; a slot that does not decode this step (free: a pure
  decode step has no prefilling group) is fed token 0 at row 0 of its own rows and its logits are dropped;
- attention reads each slot's full capacity under a length mask (`StaticDecodeStep`), so nothing grows;
- every MoE layer runs `sync_free_experts` (model/experts.py) in place of dispatcher + experts + combine.
The layers, weights and cache are the engine's own; steps with prompt chunks, padding or route recording run
the eager path. `mode="static"` runs the same static step without capturing it (the CPU tests).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import MoELayer

from kernels.grouped_matmul import uses_grouped_kernel
from keye_train.model.attention import KeyePackedSeqParams
from keye_train.model.experts import sync_free_experts, sync_free_unsupported
from keye_train.posttrain.rollout.cache import decode_attention

MODES = ("auto", "static", "off")


def graph_unsupported(engine, capture: bool = True) -> str | None:
    """Why the engine's decode steps cannot run as a static step, captured if `capture` (None: they can)."""
    if engine.routes is not None:
        return "routes are recorded (rollout.record_routes)"
    if parallel_state.get_tensor_model_parallel_world_size() > 1 or engine.config.sequence_parallel:
        return "tensor parallelism (the lockstep pads packs to the peers' length)"
    if engine.lm_cfg.dsa.mode == "sparse":
        return "sparse DSA decode (per-sequence top-k sets)"
    for module in engine.lm.modules():
        if isinstance(module, MoELayer):
            if module.use_shared_expert:
                return "shared experts"
            reason = sync_free_unsupported(module.experts)
            weight = getattr(module.experts, "linear_fc1", None)
            if not reason and capture and not uses_grouped_kernel(weight.weight[0, :0], weight.weight):
                reason = f"no grouped GEMM kernel for {weight.weight.dtype} on {weight.weight.device.type}"
            if reason:
                return reason
    return None


class StaticDecodeStep:
    """The cache step of a static decode pack: row i is slot i, writing its new key at `rows[i]` and attending to
    its rows 0 .. rows[i]. `rows` is a device tensor the caller fills before each run; shapes never change."""

    def __init__(self, cache, rows: torch.Tensor):
        self.cache, self.rows = cache, rows
        self.slots = torch.arange(cache.slots, device=rows.device)
        self.columns = torch.arange(cache.capacity, device=rows.device)
        self.mask = None

    def prepare(self) -> None:
        """Build the length mask from `rows` (inside the captured region, so each replay sees new rows)."""
        self.mask = (self.columns[None, :] <= self.rows[:, None])[:, None, None, :]  # [S, 1, 1, capacity]

    def _write(self, table: torch.Tensor, rows: torch.Tensor) -> None:
        table[self.slots, self.rows] = rows.to(table.dtype)

    def _dense(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        keys, values = self.cache.k[layer], self.cache.v[layer]
        self._write(keys, k)
        self._write(values, v)
        out = decode_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), self.mask, scale)
        return out[:, :, 0]

    def attend(self, layer: int, query, key, value, scale: float) -> torch.Tensor:
        seq, _, heads, dim = query.shape
        q, k, v = (x.reshape(seq, x.shape[2], dim) for x in (query, key, value))
        return self._dense(layer, q, k, v, scale).reshape(seq, 1, heads * dim)

    def attend_dsa(self, layer: int, q, k, v, index, scale: float, dsa) -> torch.Tensor:
        if dsa.mode == "sparse":
            raise ValueError("a static decode step attends densely: sparse DSA decode runs the eager path")
        self._write(self.cache.index_k[layer], index[2])
        return self._dense(layer, q, k, v, scale)


def _sync_free_moe_forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
    probs, routing_map = self.route(hidden_states, padding_mask)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    return sync_free_experts(flat, probs, routing_map, self.experts).view_as(hidden_states), None


@contextlib.contextmanager
def sync_free_moe(lm: torch.nn.Module):
    """Every MoE layer of `lm` runs `sync_free_experts` inside the block (an instance-level forward)."""
    layers = [m for m in lm.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.forward = types.MethodType(_sync_free_moe_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class DecodeGraph:
    """The engine's pure decode step over all S slots: `run(tokens, positions, rows, read)` -> fp32 logits of
    the `read` slots (all S: a view of the graph's output buffer, valid until the next run). Captured on the
    first run (mode "auto", CUDA), or run eagerly with the same static shapes (mode "static")."""

    def __init__(self, engine, capture: bool):
        self.engine, self.capture = engine, capture
        slots, device = engine.slots, engine.device
        # token, M-RoPE position, cache row; rows 3-4 (not graph inputs): the slots whose logits the caller reads,
        # and for each the row of the device tensor whose token it is fed (`run`'s `fed`)
        self.inputs = torch.zeros(5, slots, dtype=torch.long, device=device)
        self.host = torch.zeros(5, slots, dtype=torch.long, pin_memory=self.inputs.is_cuda)  # one staging buffer
        self.copied: torch.cuda.Event | None = None
        self.step = StaticDecodeStep(engine.cache, self.inputs[2])
        self.params = KeyePackedSeqParams(
            qkv_format="sbhd",
            cu_seqlens_q=torch.arange(slots + 1, dtype=torch.int32, device=device),
            cu_seqlens_kv=torch.arange(slots + 1, dtype=torch.int32, device=device),
            max_seqlen_q=1,
            max_seqlen_kv=1,
            position_ids=None,
            document_lengths=[1] * slots,
            kv_cache=self.step,
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def uses(self, cache) -> bool:
        return self.step.cache is cache

    def run(
        self,
        tokens: list[int],
        positions: list[int],
        rows: list[int],
        read: list[int],
        fed: torch.Tensor | None = None,
        sources: list[int] | None = None,
    ) -> torch.Tensor:
        """-> the logits of the slots in `read` [len(read), V]. The inputs go up through one pinned buffer and
        one copy: no allocation and no pageable copy between the launch and the caller's first read. `fed`: a
        device tensor of tokens (the last step's samples, not read back yet); slot read[i] is fed fed[sources[i]]
        in place of tokens[read[i]]."""
        if self.copied is not None:
            self.copied.synchronize()  # the buffer's last upload is done before it is overwritten
        count = len(read)
        self.host[:3] = torch.tensor([tokens, positions, rows], dtype=torch.long)
        self.host[3, :count] = torch.tensor(read, dtype=torch.long)
        if fed is not None:
            self.host[4, :count] = torch.tensor(sources, dtype=torch.long)
        self.inputs.copy_(self.host, non_blocking=True)
        if self.inputs.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()
        if fed is not None:
            self.inputs[0].index_copy_(0, self.inputs[3, :count], fed.index_select(0, self.inputs[4, :count]))
        logits = self.replay()
        if read == list(range(self.inputs.shape[1])):
            return logits
        return logits.index_select(0, self.inputs[3, :count])

    def forward(self) -> torch.Tensor:
        """The step eagerly, on the current inputs."""
        lm = self.engine.lm
        tokens, positions = self.inputs[0], self.inputs[1]
        self.step.prepare()
        position_ids = positions[None, :].expand(3, -1)
        self.params.position_ids = position_ids
        embeds = lm.embedding(input_ids=tokens.view(1, -1), position_ids=None)  # [S, 1, H]
        rotary = lm.rotary_pos_emb(position_ids[:, None, :], lm.mrope_section)
        with sync_free_moe(lm):
            hidden = lm.decoder(
                hidden_states=embeds, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=self.params
            )
        return F.linear(hidden[:, 0], lm.output_layer.weight).float()

    def replay(self) -> torch.Tensor:
        """The step again on the current inputs: the captured graph (captured on the first call) or, with
        capture off, eagerly."""
        if not self.capture:
            return self.forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        """Warm up on a side stream (the first calls pick kernels and run one-time checks), then capture. The
        warm-up runs write the same cache rows the captured step writes, with the same values."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.forward()
