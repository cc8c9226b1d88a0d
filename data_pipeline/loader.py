"""The training data loader of one DP rank: the global pack plan, this rank's share, decoded ahead of time.

`next_step()` returns this rank's `global_batch / dp` packs for one optimizer step. Samples of the next
`prefetch_steps` steps are already decoding in worker processes.

Bad samples cost nothing (rule):
- Reserve: with `data.reserve_fraction` > 0 the planner gives each rank, with each step, spare short samples
  (that token share of its packs), decoded with its packs. After a step's packs are read, the samples that
  fit nowhere (longer than planned) and then the reserve, in planned order, go best-fit into the packs' free
  room (the least room that fits; the first pack of equals), filling what rejects left.
- Events: after assembling step N, the ranks `exchange` (an all-gather over the data-parallel group) the
  parts that failed to read or decode and the reserve samples they did not use. Every rank applies step N's
  gathered events to its planner right before planning step N + prefetch_steps, so all plans stay equal.
  A failed sample's other parts leave the plan for the rest of its epoch (a whole sample is read once per
  epoch); those already planned into the prefetched steps are dropped unread (`rejected/known_unreadable`).
  Unused reserve samples are planned again, at the front of the queue: never lost, never duplicated.
- Counters: every planned sample (`planned`, packs and reserve, per rank) is trained (`samples`), rejected
  (`rejected/<reason>`) or carried over (`carried_over`, planned again later).
- State (`state_dict`): the planner's state before the first step not yet returned, the gathered events not
  yet applied to that state (one entry per step, in order), and the counters. A resumed run with the same
  prefetch_steps plans, fills and skips exactly as the uninterrupted one; with another prefetch_steps the
  pending events are applied at once (the ranks still agree).
- Without `exchange` and with dp_size > 1 nothing is shared: no reserve (reserve_fraction must be 0) and no
  unreadable-once, as before.

reserve_fraction 0 plans exactly the packs it planned before the reserve existed.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import NamedTuple

from data_pipeline.batch import PackedBatch
from data_pipeline.encode import EncodedSample, MediaBudget
from data_pipeline.packing import assemble_pack
from data_pipeline.planner import PackingConfig, PackPlanner, PlannedPack, PlannedSample
from data_pipeline.shards import ShardMixture
from data_pipeline.sizing import ImageBudget, VideoBudget
from data_pipeline.tokenizer import KeyeTokenizer
from data_pipeline.workers import DecodePool, Rejected, SampleDecoder


def media_budget(data) -> MediaBudget:
    """The stage's image and video budget from a `DataConfig`."""
    return MediaBudget(
        image=ImageBudget(min_tokens=data.image_min_tokens, max_tokens=data.image_max_tokens),
        video=VideoBudget(
            fps=data.video_fps,
            max_frames=data.video_max_frames,
            frame_min_tokens=data.frame_min_tokens,
            frame_max_tokens=data.frame_max_tokens,
            video_total_tokens=data.video_total_tokens,
            adaptive=data.adaptive_video_budget,
        ),
    )


def _alone(obj) -> list:
    return [obj]


class _Ahead(NamedTuple):
    """A planned step of this rank, decoding: the planner's state before the step (before the gathered events
    applied right before planning it, which come next), the step's packs followed by its reserve as one more
    PlannedPack, and the decode job of every planned sample."""

    before: tuple  # (planner state, events or None)
    packs: list[PlannedPack]
    jobs: list[list[int]]


class ShardLoader:
    """exchange(obj) -> [obj of rank 0, ..., obj of rank dp_size - 1]: an all-gather of a small JSON-able object
    over the data-parallel group, called once per step by every rank (default with one rank: [obj]).
    decoder_factory: what decodes a planned sample (see DecodePool; a stand-in for tests and benchmarks)."""

    def __init__(
        self,
        data,
        seq_length: int,
        global_batch: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        log=print,
        exchange=None,
        decoder_factory=SampleDecoder,
    ):
        if not 0 <= dp_rank < dp_size or global_batch % dp_size:
            raise ValueError(f"dp_rank {dp_rank} / dp_size {dp_size} / global_batch {global_batch}")
        self.exchange = exchange if exchange is not None or dp_size > 1 else _alone
        if self.exchange is None and data.reserve_fraction > 0:
            raise ValueError(
                f"data.reserve_fraction={data.reserve_fraction} with {dp_size} DP ranks needs an "
                "exchange between them (ShardLoader(exchange=...))"
            )
        self.tokenizer = KeyeTokenizer(data.tokenizer)
        roots, weights = data_sources(data)
        self.shards = ShardMixture(roots, self.tokenizer.fingerprint, verify=True)  # damaged tars: readable prefix
        if dp_rank == 0:
            for damage in self.shards.damaged:
                log(f"data: {damage.describe()}")
        budget = media_budget(data)
        packing = PackingConfig(
            seq_length=seq_length,
            open_packs=data.open_packs,
            long_sample_tokens=data.long_sample_tokens,
            long_short_ratio=tuple(data.long_short_ratio),
            patch_cost=data.patch_cost,
            max_pack_age=data.max_pack_age,
            source_weights=weights if len(roots) > 1 else (),
            reserve_fraction=data.reserve_fraction,
        )
        # every rank plans the same packs; one of them reports the planner's skips
        self.planner = PackPlanner(
            self.shards, self.tokenizer, budget, packing, seed, log=log if dp_rank == 0 else (lambda line: None)
        )
        self.pool = DecodePool(
            roots, data.tokenizer, budget, seq_length, data.workers, data.decode_timeout_s, decoder_factory
        )
        self.seq_length, self.global_batch = seq_length, global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.prefetch_steps = max(1, data.prefetch_steps)
        self.log = log
        self.ahead: deque[_Ahead] = deque()
        self.due: deque = deque()  # gathered events (or None) to apply before planning each next step
        self.rejects: Counter = Counter()
        self.stats = Counter()  # planned, samples, carried_over, reserve_used, pack_tokens, pack_capacity, ...

    # ---- stream -------------------------------------------------------------------------------------------

    def _plan_ahead(self) -> None:
        while len(self.ahead) < self.prefetch_steps:
            before = self.planner.state_dict()
            events = self.due.popleft() if self.due else None
            if events is not None:
                self.planner.apply_events(events, self.prefetch_steps)
            step = self.planner.plan_step(self.global_batch, self.dp_size)
            reserve = PlannedPack()
            for sample in step.reserves[self.dp_rank]:
                reserve.add(sample)
            packs = step.packs[self.dp_rank] + [reserve]
            jobs = [[self.pool.submit(s) for s in pack.samples] for pack in packs]
            self.ahead.append(_Ahead((before, events), packs, jobs))

    def next_step(self) -> list[PackedBatch]:
        self._plan_ahead()
        step = self.ahead.popleft()
        batches, events = self._assemble(step)
        if self.exchange is not None:
            gathered = self.exchange(events)
            if len(gathered) != self.dp_size:
                raise RuntimeError(f"exchange returned {len(gathered)} objects for {self.dp_size} DP ranks")
            self.due.append(gathered)
        self._plan_ahead()  # the next steps decode while this one trains
        return batches

    def _assemble(self, step: _Ahead) -> tuple[list[PackedBatch], dict]:
        """This rank's packs of one step with their holes filled, and its events for the other ranks."""
        self.stats["planned"] += sum(len(p.samples) for p in step.packs)
        failed: list[list[int]] = []
        packs: list[list[EncodedSample]] = []
        spilled = []  # (planned, decoded) longer than planned: they did not fit their own pack
        for pack, jobs in zip(step.packs[:-1], step.jobs[:-1]):
            packs.append([])
            for planned, job in zip(pack.samples, jobs):
                sample = self._take(planned, job, failed)
                if sample is None:
                    continue
                if sum(s.length for s in packs[-1]) + sample.length > self.seq_length:
                    spilled.append((planned, sample))
                else:
                    packs[-1].append(sample)
        spares = [(p, self._take(p, job, failed)) for p, job in zip(step.packs[-1].samples, step.jobs[-1])]
        unused = []
        candidates = [(p, s, False) for p, s in spilled] + [(p, s, True) for p, s in spares if s is not None]
        for planned, sample, from_reserve in candidates:
            room = [self.seq_length - sum(s.length for s in pack) for pack in packs]
            fits = [k for k, free in enumerate(room) if free >= sample.length]
            if fits:
                packs[min(fits, key=lambda k: room[k])].append(sample)
                self.stats["reserve_used"] += int(from_reserve)
            elif from_reserve:
                unused.append(planned.as_list())
                self.stats["carried_over"] += 1
            else:  # a true timestamp with one digit more than planned
                self._reject("length_mismatch", f"{sample.key} has {sample.length} tokens, no pack has room")
        return [self._pack(samples) for samples in packs], {"rejected": failed, "unused": unused}

    def _take(self, planned: PlannedSample, job: int, failed: list) -> EncodedSample | None:
        """The decoded sample, or None after counting why not (a failure also goes into `failed`)."""
        where = f"[shard {self.shards.shards[planned.shard]}, sample {planned.sample}, epoch {planned.epoch}]"
        if self.planner.is_unreadable(planned):
            self.pool.discard(job)
            self._reject("known_unreadable", f"another part of it failed to read earlier {where}")
            return None
        result = self.pool.result(job)
        if isinstance(result, Rejected):
            self._reject(result.reason, f"{result.detail} {where}")
            failed.append([planned.epoch, planned.shard, planned.sample, planned.part])
            return None
        return result

    def _pack(self, samples: list[EncodedSample]) -> PackedBatch:
        self.stats["samples"] += len(samples)
        self.stats["pack_tokens"] += sum(s.length for s in samples)
        self.stats["pack_capacity"] += self.seq_length
        self.stats["clipped_spans"] += sum(s.clipped_spans for s in samples)
        batch = assemble_pack(samples, self.seq_length, self.tokenizer.ids)
        self.stats["empty_packs"] += int(batch.num_supervised() == 0)
        self.stats["visual_frames"] += batch.visual.num_frames if batch.visual is not None else 0  # images count 1
        return batch

    def _reject(self, reason: str, detail: str) -> None:
        self.rejects[reason] += 1
        self.log(f"data: skipped a sample ({reason}): {detail}")

    # ---- metrics and state --------------------------------------------------------------------------------

    def counters(self) -> dict:
        """Per-rank counts (rejects by reason, planned / trained / carried-over samples, pack tokens, visual
        frames: images and video frames) and the global ones: the planner's (plan/...) and what the shards' build
        rejected or noted, by reason (build/...: those samples never reach a pack)."""
        out = {f"rejected/{k}": v for k, v in self.rejects.items()}
        out.update({k: v for k, v in self.stats.items()})
        for key, value in self.consumed_planner_state()["counters"].items():
            out[f"plan/{key}"] = value
        out["epoch"] = self.consumed_planner_state()["epoch"]
        out["plan/damaged_shards"] = len(self.shards.damaged)
        out["plan/lost_samples"] = sum(d.lost for d in self.shards.damaged)
        out.update({f"build/{reason}": count for reason, count in self.shards.build_report.items()})
        return out

    def consumed_planner_state(self) -> dict:
        return self.ahead[0].before[0] if self.ahead else self.planner.state_dict()

    def state_dict(self) -> dict:
        pending = [step.before[1] for step in self.ahead] + list(self.due)
        return {
            "planner": self.consumed_planner_state(),
            "events": pending,
            "prefetch_steps": self.prefetch_steps,
            "rejects": dict(self.rejects),
            "stats": dict(self.stats),
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"planner", "rejects", "stats", "dp_rank", "dp_size", "global_batch"} - set(state)
        if missing:
            raise ValueError(f"the checkpoint's data state lacks {sorted(missing)}: it was not written by ShardLoader")
        for key in ("dp_rank", "dp_size", "global_batch"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"data state has {key}={state[key]}, this run has {getattr(self, key)}")
        self._drain()
        self.planner.load_state_dict(state["planner"])
        self.due = deque(state.get("events", []))  # states written before events existed have none
        if state.get("prefetch_steps", self.prefetch_steps) != self.prefetch_steps:
            while self.due:  # planned at other points than this run would: apply them now
                events = self.due.popleft()
                if events is not None:
                    self.planner.apply_events(events, self.prefetch_steps)
        self.rejects = Counter(state["rejects"])
        self.stats = Counter(state["stats"])

    def load_regrouped_state(self, states: list[dict]) -> None:
        """Continue the global sample stream of a run with another DP size from its ranks' states (one per old
        DP rank, in order). Every rank plans every pack, so the planner state and pending events are common;
        the packs of a step depend only on global_batch and are dealt to the new ranks. Counters add up on the
        new DP rank 0. Refused where the stream would change: another global_batch, or spare samples (the
        reserve is planned per rank)."""
        if [int(s["dp_rank"]) for s in states] != list(range(len(states))) or any(
            int(s["dp_size"]) != len(states) for s in states
        ):
            raise ValueError(f"data states of DP ranks {[s['dp_rank'] for s in states]} are not one whole run")
        old = states[0]
        if int(old["global_batch"]) != self.global_batch:
            raise ValueError(
                f"the checkpoint's data stream has global_batch={old['global_batch']}, this run "
                f"train.global_batch={self.global_batch}; resume with it, or start from the weights with "
                "checkpoint.init_from"
            )
        if len(states) != self.dp_size and self.planner.config.reserve_fraction > 0:
            raise ValueError(
                f"data.reserve_fraction={self.planner.config.reserve_fraction}: spare samples are planned per DP "
                f"rank, so the stream of {len(states)} DP ranks does not continue exactly on {self.dp_size}; resume "
                "with the checkpoint's DP size, or start from its weights with checkpoint.init_from"
            )
        if any(s["planner"] != old["planner"] or s.get("events") != old.get("events") for s in states):
            raise ValueError("the DP ranks' data states disagree on the plan: the checkpoint is inconsistent")
        rejects, stats = Counter(), Counter()
        if self.dp_rank == 0:
            for s in states:
                rejects.update(s["rejects"])
                stats.update(s["stats"])
        self.load_state_dict(
            {
                **old,
                "rejects": dict(rejects),
                "stats": dict(stats),
                "dp_rank": self.dp_rank,
                "dp_size": self.dp_size,
            }
        )

    def _drain(self) -> None:
        for step in self.ahead:
            for jobs in step.jobs:
                for job in jobs:
                    self.pool.result(job)
        self.ahead.clear()

    def close(self) -> None:
        self.pool.close()


def data_sources(data) -> tuple[list[str], tuple[float, ...]]:
    """(shard directories, token weights): data.mixture when set, else the one data.shards."""
    if data.mixture:
        return [m.shards for m in data.mixture], tuple(float(m.weight) for m in data.mixture)
    return [data.shards], (1.0,)


def check_data_config(data) -> None:
    """Reject a bad `data` config before any rank starts; the message names the key."""
    from pathlib import Path

    from data_pipeline.shards import ShardSet

    if not Path(data.tokenizer).is_file():
        raise ValueError(f"data.tokenizer: {data.tokenizer} does not exist")
    roots, weights = data_sources(data)
    keys = [f"data.mixture[{i}].shards" for i in range(len(data.mixture))] or ["data.shards"]
    for key, root, weight in zip(keys, roots, weights):
        if not (Path(root) / "index.json").is_file():
            raise ValueError(
                f"{key}: {root} holds no index.json; build shards with `keye-data build` "
                "(or `keye-data demo` for the demo corpus)"
            )
        if weight <= 0:
            raise ValueError(f"{key.replace('.shards', '.weight')}={weight} must be > 0")
    for key in ("workers",):
        if getattr(data, key) < 0:
            raise ValueError(f"data.{key} must be >= 0")
    for key in (
        "prefetch_steps",
        "open_packs",
        "max_pack_age",
        "image_min_tokens",
        "video_max_frames",
        "video_total_tokens",
    ):
        if getattr(data, key) < 1:
            raise ValueError(f"data.{key} must be >= 1")
    if data.decode_timeout_s <= 0:
        raise ValueError("data.decode_timeout_s must be > 0")
    if not 0 <= data.reserve_fraction < 1:
        raise ValueError(f"data.reserve_fraction={data.reserve_fraction} must be in [0, 1)")
    if data.image_min_tokens > data.image_max_tokens:
        raise ValueError("data.image_min_tokens must be <= data.image_max_tokens")
    if len(data.long_short_ratio) != 2 or min(data.long_short_ratio) < 1:
        raise ValueError("data.long_short_ratio must be two positive integers, e.g. [1, 1]")
    try:
        media_budget(data)
    except ValueError as err:
        raise ValueError(f"data (video budget): {err}") from err
    for key, root in zip(keys, roots):
        try:
            ShardSet(root, KeyeTokenizer(data.tokenizer).fingerprint)
        except ValueError as err:
            raise ValueError(f"{key} / data.tokenizer: {err}") from err
