"""The rollout engine: generation on the training model's own megatron layers, with a KV cache in core attention.

Every forward is one ragged pack through `lm.decoder`, the same TransformerBlock the trainer runs (so TP/SP,
EP and the MoE dispatch follow the training path), in eval mode under no_grad. A pack holds one token for each
decoding sequence and prompt chunks of the sequences being prefilled (at most `prefill_tokens` prompt tokens a
step), so a slot freed by a finished sequence is refilled by the next waiting prompt while the others decode.

- Prompts: text ids and, optionally, a `VisualInput`; the vision tower runs once per prompt, its embeddings
  replace the pad-token rows (model/keye_vl.py), and the prompt's M-RoPE ids come from data_pipeline.positions.
- Decode: the token sampled at step j is fed at M-RoPE position (max prompt position + 1 + j) on all three axes
  (what mrope_position_ids gives the whole prompt + response).
- Groups: the G samples of a prompt share its prefill; at its end the prompt's cache rows are copied into the
  G - 1 other reserved slots and every member samples its first token from the same logits with its own seed.
- Logits only for the rows that sample: the output layer runs on the last row of each segment; under TP the
  vocab-parallel logits are all-gathered, every rank samples the same way and TP rank 0's tokens are broadcast.
- Lockstep: with several ranks, each step all-reduces (has work, pack length) over the world; a rank pads its
  pack to the longest (padding rows write nothing to the cache) and keeps stepping until no rank has work, so
  the EP / TP collectives inside the layers always meet.
- Pure decode steps run as one static step (rollout/graphs.py, a CUDA graph on the GPU), each queued before
  the host books the last one (rollout/ahead.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from data_pipeline.batch import VisualInput
from data_pipeline.positions import mrope_position_ids
from data_pipeline.tokenizer import TokenIds
from keye_train.model.attention import KeyePackedSeqParams, VarlenCoreAttention
from keye_train.model.keye_vl import merge_visual_embeddings, visual_token_mask
from keye_train.posttrain.rollout.ahead import decode_ahead, static_inputs
from keye_train.posttrain.rollout.cache import PAD_SLOT, KVCache
from keye_train.posttrain.rollout.graphs import MODES, DecodeGraph, graph_unsupported
from keye_train.posttrain.rollout.routing import ModelRoutes
from keye_train.posttrain.rollout.sampler import SamplingParams, sample
from parallel.layout import host_world_group


@dataclass
class Prompt:
    """input_ids [L] int64; visual: the patches of its images / frames, in the order of their pad tokens."""

    input_ids: torch.Tensor
    visual: VisualInput | None = None


@dataclass
class Sample:
    """One response. routes: [prompt + response - 1, layers, k] experts of every token that was fed forward
    (the last sampled token never is), when recording. logits: the fp32 rows it was sampled from (keep_logits)."""

    prompt: int
    member: int
    prompt_ids: torch.Tensor
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (a stop id was sampled) or "length" (max_new_tokens)
    routes: torch.Tensor | None = None
    logits: list[torch.Tensor] | None = None


@dataclass(eq=False)  # identity: the loop's list lookups must not compare samples field by field
class _Sequence:
    sample: Sample
    params: SamplingParams
    generator: torch.Generator | None
    slot: int
    next_position: int  # M-RoPE position of the next token fed
    routes: list[torch.Tensor] = field(default_factory=list)


@dataclass(eq=False)
class _Group:
    index: int
    prompt: Prompt
    params: SamplingParams
    size: int
    slots: list[int] = field(default_factory=list)
    embeds: torch.Tensor | None = None  # [L, 1, H] decoder input of the prompt
    positions: torch.Tensor | None = None  # [3, L]
    prefilled: int = 0
    routes: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.prompt.input_ids.numel())


@dataclass
class _Segment:
    slot: int
    count: int
    wants_logits: bool
    owner: object = None  # _Sequence (decode) or _Group (prefill)


@dataclass(eq=False)
class _Loop:
    """The loop state a run of queued-ahead decode steps (rollout/ahead.py) reads and updates."""

    waiting: deque
    free: list[int]
    clock: object
    started: float
    parts_before: dict


@dataclass
class StepTimes:
    """Seconds spent per part of the loop, summed over steps (host clock; synchronised on CUDA if `sync`)."""

    embed: float = 0.0
    forward: float = 0.0
    logits: float = 0.0
    sample: float = 0.0
    host: float = 0.0
    steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    graph_steps: int = 0  # steps run as the static (CUDA-graph) decode step
    dropped_rows: int = 0  # rows queued ahead for a sequence that had sampled a stop id (rollout/ahead.py)
    step_log: list = field(default_factory=list)  # per step: a dict of its start, seconds, tokens and parts

    PARTS = ("embed", "forward", "logits", "sample", "host")

    def snapshot(self) -> dict:
        return {name: getattr(self, name) for name in self.PARTS}


class RolloutEngine:
    def __init__(
        self,
        parts,
        model,
        tokens: TokenIds | None = None,
        slots: int = 8,
        capacity: int = 4096,
        prefill_tokens: int = 1024,
        record_routes: bool = False,
        keep_logits: bool = False,
        decode_graph: str = "auto",
        decode_ahead: bool = False,
    ):
        """parts: this rank's ModelParts (model/builder.py); model: its ModelConfig. decode_graph: "auto" captures
        pure decode steps in a CUDA graph where graphs.graph_unsupported allows it, "static" runs that static
        step without capturing it, "off" runs every step eagerly. decode_ahead: static decode steps are queued one
        step ahead of the host's bookkeeping (rollout/ahead.py)."""
        self.lm, self.vision = parts.lm, parts.vision
        if not (self.lm.pre_process and self.lm.post_process):
            raise ValueError("the rollout engine runs the whole LM on every rank: parallel.pp must be 1")
        if decode_graph not in MODES:
            raise ValueError(f"rollout.decode_graph={decode_graph!r}: must be one of {', '.join(MODES)}")
        if slots < 1 or capacity < 1 or prefill_tokens < 1:
            raise ValueError(
                f"rollout.slots={slots}, rollout.capacity={capacity}, rollout.prefill_tokens={prefill_tokens}: "
                "each must be >= 1"
            )
        self.tokens = tokens or TokenIds()
        self.config = self.lm.config
        self.lm_cfg = model.lm
        self.keep_logits = keep_logits
        self.slots, self.capacity, self.prefill_tokens = slots, capacity, prefill_tokens
        self.device = self.lm.output_layer.weight.device
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        layers = [m.layer_number for m in self.lm.modules() if isinstance(m, VarlenCoreAttention)]
        kv_heads = self.config.num_query_groups // self.tp
        index_dim = self.lm_cfg.dsa.index_head_dim if self.lm_cfg.dsa.mode != "dense" else None
        self._cache_shape = (layers, kv_heads, index_dim)
        self.cache: KVCache | None = None  # allocated by the first generate, dropped by release()
        self.routes = ModelRoutes(self.lm) if record_routes else None
        self.route_dtype = torch.uint8 if self.lm_cfg.num_experts <= 256 else torch.int16
        self.times = StepTimes()
        self.sync_timing = False
        self.decode_graph = decode_graph
        self.decode_ahead = decode_ahead
        self._graph: DecodeGraph | None = None
        self.graph_off_reason: str | None = None  # why decode runs eagerly, once known (None: graphed or off)

    # ---- public -----------------------------------------------------------------------------------------------

    def release(self) -> None:
        """Free the KV cache and the decode graph (before a training phase); the next generate rebuilds them."""
        self.cache = None
        self._graph = None

    @property
    def decode_step(self) -> DecodeGraph | None:
        """The static decode step of the last pure decode step (None before one, or with decode_graph=off)."""
        return self._graph

    def _allocate(self) -> KVCache:
        if self.cache is None or self.cache.capacity != self.capacity:
            layers, kv_heads, index_dim = self._cache_shape
            dtype, head_dim = self.config.params_dtype, self.config.kv_channels
            self.cache = KVCache(layers, self.slots, self.capacity, kv_heads, head_dim, dtype, self.device, index_dim)
        return self.cache

    def generate(
        self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams], group_size: int = 1
    ) -> list[Sample]:
        """-> group_size samples per prompt, prompt-major (prompt i's member g at i * group_size + g)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if not 1 <= group_size <= self.slots:
            raise ValueError(f"rollout.group_size={group_size}: must be in [1, rollout.slots={self.slots}]")
        groups = [_Group(i, p, s, group_size) for i, (p, s) in enumerate(zip(prompts, params))]
        for g in groups:
            need = g.length + max(g.params.max_new_tokens - 1, 0)
            if g.length < 1:
                raise ValueError(f"prompt {g.index} is empty")
            if need > self.capacity:
                raise ValueError(
                    f"prompt {g.index}: {g.length} prompt tokens + max_new_tokens - 1 = {need} rows exceed "
                    f"rollout.capacity={self.capacity}"
                )
        self._allocate()
        modules = [m for m in (self.lm, self.vision) if m is not None]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with torch.no_grad():
                return self._run(groups)
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)
            if self.routes is not None:
                self.routes.clear()

    # ---- the loop ---------------------------------------------------------------------------------------------

    def _run(self, groups: list[_Group]) -> list[Sample]:
        results: dict[tuple[int, int], Sample] = {}
        waiting = deque()
        for g in groups:
            if g.params.max_new_tokens == 0:
                for m in range(g.size):
                    results[g.index, m] = Sample(g.index, m, g.prompt.input_ids, finish_reason="length")
            else:
                waiting.append(g)
        free = list(range(self.slots))
        prefilling: list[_Group] = []
        running: list[_Sequence] = []

        def book(seq, token, logprob, logits):
            book_token(seq, token, logprob, logits, results, running, free)

        while True:
            clock = _Clock(self.device, self.sync_timing)
            started, parts_before = clock.now(), self.times.snapshot()
            while waiting and len(free) >= waiting[0].size:
                group = waiting.popleft()
                group.slots = free[: group.size]
                del free[: group.size]
                for slot in group.slots:
                    self.cache.reset(slot)
                self._embed_prompt(group)
                prefilling.append(group)
            segments = [_Segment(s.slot, 1, True, s) for s in running]
            budget = self.prefill_tokens
            for group in prefilling:
                if budget == 0:
                    break
                count = min(group.length - group.prefilled, budget)
                budget -= count
                segments.append(_Segment(group.slots[0], count, group.prefilled + count == group.length, group))
            local = sum(s.count for s in segments)
            self.times.host += clock.lap()
            more, target = self.agree(bool(segments), local)
            if not more:
                break
            if target > local:
                segments.append(_Segment(PAD_SLOT, target - local, False))
            if self.decode_ahead and self._graphed(segments):
                loop = _Loop(waiting, free, clock, started, parts_before)
                decode_ahead(self, [s.owner for s in segments if isinstance(s.owner, _Sequence)], loop, book)
                continue
            logits, routes = self._forward(segments, clock)
            clock.lap()
            self._advance(segments, logits, routes, prefilling, book, clock)
            self.times.steps += 1
            decoded = sum(1 for s in segments if isinstance(s.owner, _Sequence))
            prefilled = sum(s.count for s in segments if isinstance(s.owner, _Group))
            entry = {"start": started, "seconds": clock.now() - started, "decode": decoded, "prefill": prefilled}
            entry.update({k: v - parts_before[k] for k, v in self.times.snapshot().items()})
            self.times.step_log.append(entry)
        return [results[g.index, m] for g in groups for m in range(g.size)]

    def agree(self, has_work: bool, tokens: int) -> tuple[bool, int]:
        """(any rank has work, the pack length every rank uses this step): one all-reduce per step on every rank,
        of a CPU tensor over a gloo group, so it never waits for the steps queued on the device (rollout/ahead.py)."""
        target = tokens
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = torch.tensor([int(has_work), tokens], dtype=torch.long)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=host_world_group())
            has_work, target = bool(flags[0]), int(flags[1])
        if self.config.sequence_parallel:
            target = math.ceil(max(target, 1) / self.tp) * self.tp
        return has_work, target

    def _embed_prompt(self, group: _Group) -> None:
        ids = group.prompt.input_ids.to(self.device).view(-1)
        embeds = self.lm.embedding(input_ids=ids.view(1, -1), position_ids=None)  # [L, 1, H]
        visual = group.prompt.visual
        grids = torch.zeros(0, 2, dtype=torch.long)
        if visual is not None and visual.num_frames > 0:
            if self.vision is None:
                raise ValueError("a visual prompt needs the vision tower on this rank")
            visual = VisualInput(visual.patches.to(self.device), visual.grids.to(self.device))
            features = self.vision(visual)
            embeds = merge_visual_embeddings(embeds, features, visual_token_mask(ids, self.tokens))
            grids = visual.grids.cpu() // 2
        group.embeds = embeds
        group.positions = mrope_position_ids(ids.cpu(), (self.tokens.image_pad, self.tokens.video_pad), grids)

    def _graphed(self, segments: list[_Segment]) -> bool:
        """Whether this pack runs as the static decode step: decode rows only (lockstep padding is dropped)."""
        if self.decode_graph == "off" or (self.decode_graph == "auto" and self.device.type != "cuda"):
            return False
        if not any(isinstance(s.owner, _Sequence) for s in segments):
            return False
        if any(isinstance(s.owner, _Group) for s in segments):
            return False
        if self.graph_off_reason is None and self._graph is None:
            self.graph_off_reason = graph_unsupported(self, capture=self.decode_graph == "auto") or ""
        return not self.graph_off_reason

    def static_step(self) -> DecodeGraph:
        """The decode graph over this cache's slots (built on first use)."""
        if self._graph is None or not self._graph.uses(self.cache):
            self._graph = DecodeGraph(self, capture=self.decode_graph == "auto")
        return self._graph

    def _graph_forward(self, segments: list[_Segment], clock) -> torch.Tensor:
        decode = [s for s in segments if isinstance(s.owner, _Sequence)]
        tokens, positions, rows = static_inputs(self, [s.owner for s in decode])
        graph = self.static_step()
        self.times.embed += clock.lap()
        logits = graph.run(tokens, positions, rows, [s.slot for s in decode])
        self.times.graph_steps += 1
        for s in decode:
            self.cache.lengths[s.slot] += 1
        self.times.forward += clock.lap()
        return logits

    def _forward(self, segments: list[_Segment], clock) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pack through the decoder -> (fp32 logits of the segments that want them [R, V], routes [T, L, k])."""
        if self._graphed(segments):
            return self._graph_forward(segments, clock), None
        decode = [s for s in segments if isinstance(s.owner, _Sequence)]
        pieces, positions = [], []
        decode_embeds = None
        if decode:
            ids = torch.tensor([s.owner.sample.tokens[-1] for s in decode], dtype=torch.long, device=self.device)
            decode_embeds = self.lm.embedding(input_ids=ids.view(1, -1), position_ids=None)  # [B, 1, H]
        at = 0
        hidden_size = self.config.hidden_size
        for s in segments:
            if isinstance(s.owner, _Sequence):
                pieces.append(decode_embeds[at : at + 1])
                at += 1
                positions.append(torch.full((3, 1), s.owner.next_position, dtype=torch.long))
            elif isinstance(s.owner, _Group):
                g = s.owner
                pieces.append(g.embeds[g.prefilled : g.prefilled + s.count])
                positions.append(g.positions[:, g.prefilled : g.prefilled + s.count])
            else:
                dtype = self.config.params_dtype
                pieces.append(torch.zeros(s.count, 1, hidden_size, dtype=dtype, device=self.device))
                positions.append(torch.zeros(3, s.count, dtype=torch.long))
        decoder_input = torch.cat(pieces)
        position_ids = torch.cat(positions, dim=1).to(self.device)
        counts = [s.count for s in segments]
        cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=self.device)
        step = self.cache.step([s.slot for s in segments], counts)
        params = KeyePackedSeqParams(
            qkv_format="sbhd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max(counts),
            max_seqlen_kv=max(counts),
            position_ids=position_ids,
            document_lengths=counts,
            kv_cache=step,
        )
        if self.config.sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        self.times.embed += clock.lap()
        if self.routes is not None:
            self.routes.record()
        rotary = self.lm.rotary_pos_emb(position_ids[:, None, :], self.lm.mrope_section)
        hidden = self.lm.decoder(
            hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=params
        )
        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        routes = self.routes.recorded() if self.routes is not None else None
        self.cache.commit(step)
        self.times.forward += clock.lap()
        ends = torch.tensor(counts).cumsum(0) - 1
        rows = [int(e) for e, s in zip(ends, segments) if s.wants_logits]
        logits = None
        if rows:
            logits = F.linear(hidden[torch.tensor(rows, device=self.device), 0], self.lm.output_layer.weight)
            if self.tp > 1:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            logits = logits.float()
        self.times.logits += clock.lap()
        return logits, routes

    def _advance(self, segments, logits, routes, prefilling, book, clock) -> None:
        """Book the pack's rows, fork finished prefills into their groups, sample and retire finished sequences."""
        offsets = [0]
        for s in segments:
            offsets.append(offsets[-1] + s.count)
        samplers, row_of, row = [], [], 0
        for s, offset in zip(segments, offsets):
            if isinstance(s.owner, _Group):
                g = s.owner
                g.prefilled += s.count
                self.times.prefill_tokens += s.count
                if routes is not None:
                    g.routes.append(routes[offset : offset + s.count].to("cpu", self.route_dtype))
                if s.wants_logits:
                    prefilling.remove(g)
                    self.cache.fork(g.slots[0], g.slots[1:])
                    last = int(g.positions.max())
                    for member, slot in enumerate(g.slots):
                        seq = _Sequence(
                            Sample(g.index, member, g.prompt.input_ids, logits=[] if self.keep_logits else None),
                            g.params,
                            None if g.params.greedy else g.params.generator(member, self.device),
                            slot,
                            last + 1,
                            list(g.routes),
                        )
                        samplers.append(seq)
                        row_of.append(row)
                    row += 1
            elif isinstance(s.owner, _Sequence):
                seq = s.owner
                self.times.decode_tokens += 1
                seq.next_position += 1
                if routes is not None:
                    seq.routes.append(routes[offset : offset + 1].to("cpu", self.route_dtype))
                samplers.append(seq)
                row_of.append(row)
                row += 1
        self.times.host += clock.lap()
        if not samplers:
            return
        in_order = row_of == list(range(logits.shape[0]))
        rows = logits if in_order else logits[torch.tensor(row_of, device=logits.device)]
        tokens, logprobs = sample(rows, [q.params for q in samplers], [q.generator for q in samplers])
        tokens, logprobs = self._same_on_tp_ranks(tokens, logprobs)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        self.times.sample += clock.lap()
        for seq, token, logprob, r in zip(samplers, tokens, logprobs, row_of):
            book(seq, token, logprob, logits[r] if seq.sample.logits is not None else None)
        self.times.host += clock.lap()

    def _same_on_tp_ranks(self, tokens, logprobs):
        if self.tp == 1:
            return tokens, logprobs
        group = parallel_state.get_tensor_model_parallel_group()
        source = dist.get_process_group_ranks(group)[0]
        packed = torch.stack([tokens.double(), logprobs.double()])
        dist.broadcast(packed, src=source, group=group)
        return packed[0].long(), packed[1].float()


def book_token(seq: _Sequence, token: int, logprob: float, logits, results, running: list, free: list) -> None:
    """Append one sampled token to `seq`'s sample; a stop id or the length budget retires it into `results` and
    frees its slot, otherwise it is (still) running."""
    out = seq.sample
    out.tokens.append(token)
    out.logprobs.append(logprob)
    if out.logits is not None:
        out.logits.append(logits.cpu())
    if token in seq.params.stop_ids or len(out.tokens) >= seq.params.max_new_tokens:
        out.finish_reason = "stop" if token in seq.params.stop_ids else "length"
        if seq.routes:
            out.routes = torch.cat(seq.routes)
        results[out.prompt, out.member] = out
        if seq in running:
            running.remove(seq)
        free.append(seq.slot)
        free.sort()
    elif seq not in running:
        running.append(seq)


class _Clock:
    def __init__(self, device, sync: bool):
        import time

        self._time, self._sync = time.perf_counter, sync and device.type == "cuda"
        self._last = self._time()

    def now(self) -> float:
        return self._time()

    def lap(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        now = self._time()
        elapsed, self._last = now - self._last, now
        return elapsed
