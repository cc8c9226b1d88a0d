"""Pure decode steps queued one step ahead of the host.

Reading a decode step's sampled tokens back waits for the device; the host's bookkeeping after it (appending
tokens, stop ids, retiring sequences, the next step's inputs) then leaves the GPU idle: 6 of the 48.7 ms of a
graphed step at batch 128 on the H200 (benchmarks/results/rollout_h200.json, 0b4fe5c). Here step t + 1 is queued
before step t's tokens are read:
- its tokens are step t's samples, moved into the graph's input on the device (`DecodeGraph.run`'s `fed`); its
  positions and cache rows are known on the host;
- a sequence whose length budget ends at step t is left out of step t + 1; one that samples a stop id at step t
  is already queued for t + 1, and that row's sample is dropped (its cache row lies inside the slot's capacity,
  and a slot is reset before it is reused);
- when a waiting group would fit the slots step t frees, nothing is queued ahead: the engine's loop admits it.
Each sequence draws from its own generator once per step, so the tokens equal the step-by-step loop's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keye_train.posttrain.rollout.sampler import sample


@dataclass(eq=False)
class QueuedStep:
    sequences: list  # the engine's _Sequence of each row
    tokens: torch.Tensor  # [n] sampled on the device
    host: torch.Tensor  # [2, n] float64 tokens and log-probs, filled by a copy that `ready` marks
    ready: torch.cuda.Event | None
    logits: torch.Tensor | None  # [n, V] fp32 rows kept for the samples (keep_logits)


def static_inputs(engine, sequences: list, booked_tokens: bool = True) -> tuple[list[int], list[int], list[int]]:
    """Per slot (free slots 0): the token fed (each sequence's last booked one, or 0 if not `booked_tokens`), its
    M-RoPE position and the cache row it writes."""
    tokens, positions, rows = ([0] * engine.slots for _ in range(3))
    for seq in sequences:
        row = engine.cache.lengths[seq.slot]
        if row + 1 > engine.capacity:
            raise ValueError(f"slot {seq.slot} would hold {row + 1} tokens, over rollout.capacity={engine.capacity}")
        positions[seq.slot], rows[seq.slot] = seq.next_position, row
        if booked_tokens:
            tokens[seq.slot] = seq.sample.tokens[-1]
    return tokens, positions, rows


def queue_step(engine, sequences: list, previous: QueuedStep | None = None) -> QueuedStep:
    """Queue one graphed decode step of `sequences` (fed their last booked token, or `previous`'s samples)."""
    graph = engine.static_step()
    tokens, positions, rows = static_inputs(engine, sequences, booked_tokens=previous is None)
    sources = None
    if previous is not None:
        row_of = {id(seq): i for i, seq in enumerate(previous.sequences)}
        sources = [row_of[id(seq)] for seq in sequences]
    read = [seq.slot for seq in sequences]
    logits = graph.run(tokens, positions, rows, read, previous.tokens if previous else None, sources)
    for seq in sequences:
        engine.cache.lengths[seq.slot] += 1
        seq.next_position += 1
    sampled, logprobs = sample(logits, [s.params for s in sequences], [s.generator for s in sequences])
    host = torch.empty(2, len(sequences), dtype=torch.float64, pin_memory=logits.is_cuda)
    host.copy_(torch.stack([sampled.double(), logprobs.double()]), non_blocking=True)
    ready = None
    if logits.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    kept = logits.clone() if engine.keep_logits else None  # the next replay overwrites the graph's output
    return QueuedStep(sequences, sampled, host, ready, kept)


def decode_ahead(engine, sequences: list, loop, book) -> None:
    """Pure decode steps from `sequences` (all running), each queued before the last one is booked, until none
    is left to queue or a waiting group fits. `loop`: the engine's step state (results, running, free, waiting,
    clock, started, parts_before); `book(seq, token, logprob, logits_row)` books one sample."""
    times, clock = engine.times, loop.clock
    queued = queue_step(engine, sequences)
    started = loop.started
    while True:
        live = [s for s in queued.sequences if not s.sample.finish_reason]
        following = [s for s in live if len(s.sample.tokens) + 1 < s.params.max_new_tokens]
        ending = len(live) - len(following)
        admits = bool(loop.waiting) and len(loop.free) + ending >= loop.waiting[0].size
        ahead = None
        if following and not admits:
            engine.agree(True, len(following))  # the step's lockstep agreement, as the loop makes for each step
            ahead = queue_step(engine, following, queued)
        times.forward += clock.lap()
        if queued.ready is not None:
            queued.ready.synchronize()
        booked = 0
        for i, (token, logprob) in enumerate(zip(*queued.host.tolist())):
            seq = queued.sequences[i]
            if seq.sample.finish_reason:  # it sampled a stop id a step earlier: this row was queued ahead of that
                times.dropped_rows += 1
                continue
            logits = queued.logits[i] if queued.logits is not None else None
            book(seq, int(token), logprob, logits)
            booked += 1
        times.sample += clock.lap()
        times.steps += 1
        times.graph_steps += 1
        times.decode_tokens += booked
        now = clock.now()
        entry = {"start": started, "seconds": now - started, "decode": booked, "prefill": 0}
        entry.update({k: v - loop.parts_before[k] for k, v in times.snapshot().items()})
        times.step_log.append(entry)
        if ahead is None:
            return
        queued, started, loop.parts_before = ahead, now, times.snapshot()
