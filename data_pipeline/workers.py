"""Sample decoding in worker processes: bounded, ordered, and with a per-sample timeout.

Each job goes to the worker with the least planned work queued (tokens + visual patches, the planner's cost
estimate), so a long video does not hold up short samples behind it; results are still taken in submission
order. Each worker has its own queues, so the jobs a worker holds are known. When a sample is not back in time
(a pathological file) or its worker dies, that worker is killed and restarted, the sample is counted as
`decode_timeout` / `decode_crash`, and the worker's other jobs are resubmitted. With `workers=0` samples are
decoded inline (no timeout).
"""

from __future__ import annotations

import queue
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch.multiprocessing as mp

from data_pipeline.encode import EncodedSample, MediaBudget, encode_sample, split_part
from data_pipeline.planner import PlannedSample
from data_pipeline.schema import BadRecord, check_spans
from data_pipeline.shards import ShardMixture, UnsafeMember, durations
from data_pipeline.sizing import RejectedMedia
from data_pipeline.tokenizer import KeyeTokenizer

POLL_S = 0.2


@dataclass
class Rejected:
    reason: str
    detail: str


def sample_id(record_id: str, planned: PlannedSample) -> str:
    part = f"#{planned.part}" if planned.part >= 0 else ""
    return f"{record_id}{part}@{planned.epoch}"


class SampleDecoder:
    """Reads one planned sample from its shard and encodes it (used inline and inside workers)."""

    def __init__(self, shard_roots: list[str], tokenizer_path: str, budget: MediaBudget, seq_length: int):
        self.shards = ShardMixture([shard_roots] if isinstance(shard_roots, (str, Path)) else shard_roots)
        self.tokenizer = KeyeTokenizer(tokenizer_path)
        self.budget, self.seq_length = budget, seq_length

    def __call__(self, planned: PlannedSample) -> EncodedSample | Rejected:
        try:
            record, media = self.shards.read(planned.shard, planned.sample)
            # shards built before labels were checked at build time get the check here
            record, clipped = check_spans(record, durations(self.shards.entry(planned.shard, planned.sample)["media"]))
            sample = encode_sample(sample_id(record["id"], planned), record, media, self.tokenizer, self.budget)
            if planned.part >= 0:
                sample = split_part(sample, planned.part, self.seq_length)
                sample.key = sample_id(record["id"], planned)
            sample.clipped_spans = clipped
            return sample
        except (BadRecord, RejectedMedia, UnsafeMember) as exc:
            return Rejected(exc.reason, str(exc))
        except Exception as exc:  # a decoder bug on one odd file must not end a run; it is counted and logged
            return Rejected("decode_error", f"{type(exc).__name__}: {exc}")


def planned_cost(planned: PlannedSample) -> int:
    """Decode work estimate: visual patches dominate, tokens cover text-only samples."""
    return 1 + planned.tokens + planned.patches


def _worker_main(factory, args: tuple, jobs: mp.Queue, results: mp.Queue) -> None:
    import torch

    torch.set_num_threads(1)
    decode = factory(*args)
    while True:
        job = jobs.get()
        if job is None:
            return
        job_id, planned = job
        results.put((job_id, decode(PlannedSample(*planned))))


class _Worker:
    def __init__(self, ctx, factory, args):
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_worker_main, args=(factory, args, self.jobs, self.results), daemon=True)
        self.process.start()
        self.pending: deque = deque()  # (job_id, planned) in submission order
        self.queued_cost = 0  # the planned cost of `pending`

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            self.jobs.put(None)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class DecodePool:
    def __init__(
        self,
        shard_roots: list[str],
        tokenizer_path: str,
        budget: MediaBudget,
        seq_length: int,
        workers: int = 0,
        timeout_s: float = 120.0,
        decoder_factory=SampleDecoder,
    ):
        """decoder_factory(*args) builds the per-process decoder (a module-level callable, for spawn)."""
        roots = [shard_roots] if isinstance(shard_roots, (str, Path)) else shard_roots
        self.args = ([str(root) for root in roots], str(tokenizer_path), budget, seq_length)
        self.factory = decoder_factory
        self.timeout_s = timeout_s
        self.next_id = 0
        self.restarts = 0
        self.slot_of: dict[int, int] = {}
        if workers == 0:
            self.inline = decoder_factory(*self.args)
            self.inline_jobs: dict[int, PlannedSample] = {}
            self.workers = []
        else:
            self.inline = None
            self.ctx = mp.get_context("spawn")
            self.workers = [_Worker(self.ctx, self.factory, self.args) for _ in range(workers)]

    def submit(self, planned: PlannedSample) -> int:
        job_id = self.next_id
        self.next_id += 1
        if self.inline is not None:
            self.inline_jobs[job_id] = planned
        else:
            slot = min(range(len(self.workers)), key=lambda k: (self.workers[k].queued_cost, k))
            worker = self.workers[slot]
            self.slot_of[job_id] = slot
            worker.pending.append((job_id, planned))
            worker.queued_cost += planned_cost(planned)
            worker.jobs.put((job_id, planned.as_list()))
        return job_id

    def result(self, job_id: int) -> EncodedSample | Rejected:
        if self.inline is not None:
            return self.inline(self.inline_jobs.pop(job_id))
        slot = self.slot_of[job_id]
        worker = self.workers[slot]
        if not worker.pending or worker.pending[0][0] != job_id:
            raise RuntimeError(f"results are taken in submission order; job {job_id} is not next")
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                got_id, result = worker.results.get(timeout=POLL_S)
            except queue.Empty:
                if not worker.process.is_alive():
                    return self._replace(slot, "decode_crash", f"worker exited with {worker.process.exitcode}")
                if time.monotonic() > deadline:
                    return self._replace(slot, "decode_timeout", f"no result within {self.timeout_s:.0f} s")
                continue
            if got_id != job_id:
                raise RuntimeError(f"worker returned job {got_id}, expected {job_id}")
            self._done(slot)
            return result

    def discard(self, job_id: int) -> None:
        """Give up a job whose result is not wanted: inline it is never decoded; a worker may have read it already
        (results are still taken in submission order)."""
        if self.inline is not None:
            del self.inline_jobs[job_id]
        else:
            self.result(job_id)

    def _replace(self, slot: int, reason: str, detail: str) -> Rejected:
        old = self.workers[slot]
        old.stop(kill=True)
        planned = self._done(slot)
        fresh = _Worker(self.ctx, self.factory, self.args)
        for job_id, later in old.pending:
            fresh.pending.append((job_id, later))
            fresh.jobs.put((job_id, later.as_list()))
        fresh.queued_cost = old.queued_cost
        self.workers[slot] = fresh
        self.restarts += 1
        return Rejected(reason, f"{detail} (shard {planned.shard}, sample {planned.sample})")

    def _done(self, slot: int) -> PlannedSample:
        worker = self.workers[slot]
        job_id, planned = worker.pending.popleft()
        del self.slot_of[job_id]
        worker.queued_cost -= planned_cost(planned)
        return planned

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []
