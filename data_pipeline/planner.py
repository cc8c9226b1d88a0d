"""The global pack plan: which samples go into which pack, and which DP rank trains each pack.

Every rank runs the same planner over the shard indexes (no media is read), so all ranks agree without
talking, each sample of an epoch lands in exactly one pack, and each pack on exactly one rank. Sample lengths
are exact post-expansion token counts: text from the index, media from probed metadata under the stage
budget.

- Order: each epoch shuffles the shards and the samples inside each shard with (seed, epoch).
- Mixture: with several shard directories (sources), the next sample comes from the source furthest behind its
  token share (planned tokens drawn / weight), so sources contribute tokens in their weights' ratio; each
  source keeps its own cursor and epochs.
- Packing: best-fit over a window of `open_packs` open packs; when the window is full the fullest pack
  closes. With `long_sample_tokens > 0`, samples are admitted so that long and short samples contribute
  tokens in `long_short_ratio` (Stage 3: 1:1); samples of the class that is ahead wait in a bounded queue.
- Balance: a step's `global_batch` packs are dealt to DP ranks by longest-processing-time on the estimated
  compute of a pack (tokens + ViT patches), `global_batch / dp` packs per rank.
- Reserve (`reserve_fraction` > 0): after a step's packs, each rank in turn gets spare short samples of about
  that token share of its packs; the loader fills the holes rejects leave from them (see `loader`).
- Events: what only one rank saw (parts that failed to read or decode, reserve samples it did not use) reaches
  the plan through `apply_events`, called by every rank with the same gathered list at the same point of the
  plan, so the plans stay equal. A failed sample's other parts leave the plan; unused reserves are planned again.

The state is small (cursor, open packs as sample references) and JSON-safe; the loader re-reads those
samples after a resume.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from data_pipeline.encode import MediaBudget, media_tokens
from data_pipeline.schema import SPLITTABLE_KINDS
from data_pipeline.shards import ShardSet
from data_pipeline.sizing import RejectedMedia
from data_pipeline.tokenizer import KeyeTokenizer


@dataclass
class PackingConfig:
    seq_length: int
    open_packs: int = 16
    long_sample_tokens: int = 0  # 0: one class of packs
    long_short_ratio: tuple = (1, 1)
    max_waiting: int = 4096  # samples queued for the class that is ahead; beyond it the ratio is relaxed
    max_pack_age: int = 1024  # an open pack closes after this many later admissions (bounds a sample's delay)
    patch_cost: float = 1.0  # compute of one ViT patch relative to one LM token, for DP balancing
    source_weights: tuple = ()  # a mixture's token shares per source (empty: one source)
    reserve_fraction: float = 0.0  # per step and rank, spare samples of this token share of its packs (0: none)
    reserve_max_tokens: int = 0  # the largest sample taken into a reserve (0: seq_length // 8)


@dataclass
class PlannedSample:
    """A reference to (a part of) one shard sample with its planned size."""

    epoch: int
    shard: int
    sample: int
    part: int  # -1: the whole sample; k >= 0: the k-th seq_length slice of a long text
    tokens: int
    patches: int

    def as_list(self) -> list:
        return [self.epoch, self.shard, self.sample, self.part, self.tokens, self.patches]


@dataclass
class PlannedPack:
    samples: list = field(default_factory=list)
    tokens: int = 0
    patches: int = 0

    def add(self, sample: PlannedSample) -> None:
        self.samples.append(sample)
        self.tokens += sample.tokens
        self.patches += sample.patches

    def cost(self, patch_cost: float) -> float:
        return self.tokens + patch_cost * self.patches

    def as_list(self) -> list:
        return [s.as_list() for s in self.samples]

    @classmethod
    def from_list(cls, items: list) -> PlannedPack:
        pack = cls()
        for item in items:
            pack.add(PlannedSample(*item))
        return pack


@dataclass
class PlannedStep:
    """One optimizer step: packs[r] and reserves[r] are DP rank r's packs and spare samples."""

    packs: list
    reserves: list


def sample_key(sample: PlannedSample) -> tuple[int, int, int]:
    """What all parts of one sample of one epoch share."""
    return sample.epoch, sample.shard, sample.sample


@lru_cache(maxsize=16)
def _permutation(n: int, *seed_parts: int) -> list[int]:
    order = list(range(n))
    random.Random("/".join(str(p) for p in seed_parts)).shuffle(order)
    return order


class _BestFit:
    def __init__(self, capacity: int, window: int, max_age: int):
        self.capacity, self.window, self.max_age = capacity, window, max_age
        self.open: list[PlannedPack] = []
        self.opened_at: list[int] = []  # admission count when each open pack was started
        self.closed: list[PlannedPack] = []
        self.admitted = 0

    def add(self, sample: PlannedSample) -> None:
        fits = [k for k, p in enumerate(self.open) if p.tokens + sample.tokens <= self.capacity]
        if fits:
            k = min(fits, key=lambda i: self.capacity - self.open[i].tokens)  # first of equals: deterministic
        else:
            self.open.append(PlannedPack())
            self.opened_at.append(self.admitted)
            k = len(self.open) - 1
        self.admitted += 1
        self.open[k].add(sample)
        if self.open[k].tokens == self.capacity:
            self._close(k)
        elif len(self.open) > self.window:
            self._close(max(range(len(self.open)), key=lambda i: self.open[i].tokens))
        while self.open and self.admitted - self.opened_at[0] > self.max_age:
            self._close(0)  # the oldest pack has waited long enough

    def _close(self, k: int) -> None:
        self.closed.append(self.open.pop(k))
        self.opened_at.pop(k)

    def state_dict(self) -> dict:
        return {
            "open": [p.as_list() for p in self.open],
            "opened_at": list(self.opened_at),
            "closed": [p.as_list() for p in self.closed],
            "admitted": self.admitted,
        }

    def load_state_dict(self, state: dict) -> None:
        self.open = [PlannedPack.from_list(p) for p in state["open"]]
        self.opened_at = list(state["opened_at"])
        self.closed = [PlannedPack.from_list(p) for p in state["closed"]]
        self.admitted = int(state["admitted"])


class PackPlanner:
    def __init__(
        self,
        shards: ShardSet,
        tokenizer: KeyeTokenizer,
        budget: MediaBudget,
        config: PackingConfig,
        seed: int,
        log=lambda line: None,
    ):
        self.shards, self.tokenizer, self.budget, self.config, self.seed = shards, tokenizer, budget, config, seed
        self.log = log
        self.packer = _BestFit(config.seq_length, config.open_packs, config.max_pack_age)
        self.offsets = getattr(shards, "offsets", [0, len(shards.shards)])  # sources' first global shards
        sources = len(self.offsets) - 1
        self.weights = list(config.source_weights) or [1.0] * sources
        if len(self.weights) != sources or min(self.weights) <= 0:
            raise ValueError(f"data mixture: {sources} sources need as many positive weights, got {self.weights}")
        self.cursors = [[0, 0, 0] for _ in range(sources)]  # per source: epoch, shard_pos, sample_pos
        self.source_tokens = [0] * sources  # planned tokens drawn from each source
        self.counters: Counter = Counter()
        self.waiting: list[list[PlannedSample]] = [[], []]  # short, long samples read but not yet packed
        self.admitted_tokens = [0, 0]  # short, long
        self.unreadable: dict[tuple, int] = {}  # sample_key -> the apply_events call that reported it
        self.applied = 0  # apply_events calls

    @property
    def epoch(self) -> int:
        """Passes completed over the data (over the least-read source of a mixture)."""
        return min(cursor[0] for cursor in self.cursors)

    # ---- the sample stream ------------------------------------------------------------------------------

    def _next_sample(self) -> list[PlannedSample]:
        """The next sample (as one or more parts) of the source furthest behind its token share, advancing that
        source's cursor; [] if it was skipped."""
        source = min(range(len(self.weights)), key=lambda s: self.source_tokens[s] / self.weights[s])
        cursor, first = self.cursors[source], self.offsets[source]
        count = self.offsets[source + 1] - first
        salt = () if len(self.weights) == 1 else (-1 - source,)  # one source: the plain shard order

        def next_shard():
            cursor[1], cursor[2] = cursor[1] + 1, 0
            if cursor[1] == count:
                cursor[0], cursor[1] = cursor[0] + 1, 0

        while True:
            epoch = cursor[0]
            shard = first + _permutation(count, self.seed, epoch, *salt)[cursor[1]]
            if self.shards.sizes[shard]:
                break
            next_shard()  # a shard with nothing readable (see ShardSet's check at open)
        sample = _permutation(self.shards.sizes[shard], self.seed, epoch, shard)[cursor[2]]
        cursor[2] += 1
        if cursor[2] == self.shards.sizes[shard]:
            next_shard()
        parts = self._plan_sample(epoch, shard, sample, self.shards.entry(shard, sample))
        self.source_tokens[source] += sum(p.tokens for p in parts)
        if not parts:  # a skipped sample still moves its source along the schedule
            self.source_tokens[source] += 1
        return parts

    def _plan_sample(self, epoch: int, shard: int, sample: int, entry: dict) -> list[PlannedSample]:
        tokens, patches = entry["text_tokens"], 0
        videos = sum(m["type"] == "video" for m in entry["media"].values())
        for meta in entry["media"].values():
            try:
                t, p = media_tokens(meta, self.budget, self.tokenizer, videos)
            except RejectedMedia as exc:  # unusable under this stage's budget
                self._skip(exc.reason, entry, str(exc))
                return []
            tokens, patches = tokens + t, patches + p
        limit = self.config.seq_length
        if tokens <= limit:
            return [PlannedSample(epoch, shard, sample, -1, tokens, patches)]
        if entry["kind"] not in SPLITTABLE_KINDS:
            self._skip("too_long", entry, f"{tokens} tokens > seq_length {limit} and a {entry['kind']} is not split")
            return []
        self.counters["split_samples"] += 1
        parts = -(-tokens // limit)
        return [PlannedSample(epoch, shard, sample, k, min(limit, tokens - k * limit), 0) for k in range(parts)]

    def _skip(self, reason: str, entry: dict, detail: str) -> None:
        self.counters[reason] += 1
        self.log(f"data: skipped sample {entry['id']!r} ({reason}): {detail}")

    # ---- packs --------------------------------------------------------------------------------------------

    def _class_of(self, sample: PlannedSample) -> int:
        return int(0 < self.config.long_sample_tokens <= sample.tokens)

    def _wanted_class(self) -> int:
        if self.config.long_sample_tokens <= 0:
            return 0
        short_w, long_w = self.config.long_short_ratio[1], self.config.long_short_ratio[0]
        return int(self.admitted_tokens[1] * short_w <= self.admitted_tokens[0] * long_w)

    def _admit_one(self) -> None:
        """Move one sample into the packer, from the class that is behind its token share."""
        want = self._wanted_class()
        for _ in range(1_000_000):
            if self.waiting[want]:
                break
            if len(self.waiting[1 - want]) > self.config.max_waiting:
                self.counters["ratio_relaxed"] += 1
                want = 1 - want
                break
            for sample in self._next_sample():
                self.waiting[self._class_of(sample)].append(sample)
        else:
            raise RuntimeError("the planner found no packable sample in a million tries; is every sample too long?")
        sample = self.waiting[want].pop(0)
        self.admitted_tokens[want] += sample.tokens
        self.packer.add(sample)

    def next_pack(self) -> PlannedPack:
        while not self.packer.closed:
            self._admit_one()
        return self.packer.closed.pop(0)

    def next_step(self, global_batch: int, dp_size: int) -> list[list[PlannedPack]]:
        """The step's packs, dealt to DP ranks: result[r] is rank r's list of global_batch / dp_size packs."""
        packs = [self.next_pack() for _ in range(global_batch)]
        return deal(packs, dp_size, self.config.patch_cost)

    def plan_step(self, global_batch: int, dp_size: int) -> PlannedStep:
        """The step's packs dealt to DP ranks, then each rank's reserve (rank 0's first)."""
        packs = self.next_step(global_batch, dp_size)
        share = self.config.reserve_fraction
        return PlannedStep(
            packs, [self._plan_reserve(share * sum(p.tokens for p in mine)) if share > 0 else [] for mine in packs]
        )

    def _plan_reserve(self, tokens: float) -> list[PlannedSample]:
        """Short samples (at most reserve_max_tokens) of about `tokens` in all, the first ones queued or read next.
        Longer ones read meanwhile wait for packing as usual. A reserve reads at most `open_packs` samples ahead,
        so it may come out smaller where short samples are rare."""
        cap = self.config.reserve_max_tokens or self.config.seq_length // 8
        queue, reserve, got, at, reads = self.waiting[0], [], 0, 0, 0
        while got < tokens:
            while at < len(queue) and queue[at].tokens > cap:
                at += 1
            if at < len(queue):
                reserve.append(queue.pop(at))
                got += reserve[-1].tokens
            elif reads < self.config.open_packs:
                reads += 1
                for sample in self._next_sample():
                    self.waiting[self._class_of(sample)].append(sample)
            else:
                break
        return reserve

    # ---- what the ranks saw -------------------------------------------------------------------------------

    def apply_events(self, shared: list[dict], keep_calls: int) -> None:
        """Apply one step's events, gathered from every rank (the same list on every rank, in rank order):
        - "rejected": parts that failed to read or decode; every part of those samples is dropped from the
          queues and packs not yet dealt, and `is_unreadable` knows them until keep_calls - 1 more calls are
          applied (the loader passes prefetch_steps: until the steps planned before the failure was known are
          trained, whose parts of them it drops unread);
        - "unused": reserve samples that did not fit; they go back to the front of their queue, in order."""
        self.applied += 1
        for rank in shared:
            for epoch, shard, sample, _ in rank["rejected"]:
                self.unreadable.setdefault((epoch, shard, sample), self.applied)
        if any(rank["rejected"] for rank in shared):
            self._drop_unreadable()
        returned = [PlannedSample(*item) for rank in shared for item in rank["unused"]]
        kept = [s for s in returned if not self.is_unreadable(s)]
        if len(kept) < len(returned):
            self.counters["unreadable_skipped"] += len(returned) - len(kept)
        for cls in (0, 1):
            self.waiting[cls][:0] = [s for s in kept if self._class_of(s) == cls]
        self.unreadable = {k: at for k, at in self.unreadable.items() if at > self.applied - keep_calls + 1}

    def is_unreadable(self, sample: PlannedSample) -> bool:
        return sample_key(sample) in self.unreadable

    def _drop_unreadable(self) -> None:
        dropped = 0
        for queue in self.waiting:
            kept = [s for s in queue if not self.is_unreadable(s)]
            dropped += len(queue) - len(kept)
            queue[:] = kept
        for packs in (self.packer.open, self.packer.closed):
            for k, pack in enumerate(packs):
                kept = PlannedPack()
                for s in pack.samples:
                    if not self.is_unreadable(s):
                        kept.add(s)
                dropped += len(pack.samples) - len(kept.samples)
                packs[k] = kept
        for k in reversed(range(len(self.packer.open))):
            if not self.packer.open[k].samples:
                self.packer.open.pop(k)
                self.packer.opened_at.pop(k)
        self.packer.closed = [p for p in self.packer.closed if p.samples]
        if dropped:
            self.counters["unreadable_skipped"] += dropped

    # ---- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return copy.deepcopy(
            {
                "seed": self.seed,
                "epoch": self.epoch,
                "cursors": self.cursors,
                "source_tokens": self.source_tokens,
                "counters": dict(self.counters),
                "admitted_tokens": self.admitted_tokens,
                "waiting": [[s.as_list() for s in queue] for queue in self.waiting],
                "packer": self.packer.state_dict(),
                "unreadable": [[*key, at] for key, at in self.unreadable.items()],
                "applied": self.applied,
            }
        )

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run has {self.seed}")
        if len(state["cursors"]) != len(self.cursors):
            raise ValueError(
                f"data state was saved for {len(state['cursors'])} mixture sources, this run has {len(self.cursors)}"
            )
        self.cursors = [list(c) for c in state["cursors"]]
        self.source_tokens = list(state["source_tokens"])
        self.counters = Counter(state["counters"])
        self.admitted_tokens = list(state["admitted_tokens"])
        self.waiting = [[PlannedSample(*s) for s in queue] for queue in state["waiting"]]
        self.packer.load_state_dict(state["packer"])
        self.unreadable = {tuple(item[:3]): item[3] for item in state.get("unreadable", [])}  # older states: none
        self.applied = int(state.get("applied", 0))


def deal(packs: list[PlannedPack], dp_size: int, patch_cost: float = 1.0) -> list[list[PlannedPack]]:
    """Longest-processing-time assignment with equal pack counts per rank; ties go to the lower rank."""
    if len(packs) % dp_size:
        raise ValueError(f"{len(packs)} packs do not split over {dp_size} DP ranks")
    per_rank = len(packs) // dp_size
    order = sorted(range(len(packs)), key=lambda i: (-packs[i].cost(patch_cost), i))
    load = [0.0] * dp_size
    assigned: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order:
        rank = min((r for r in range(dp_size) if len(assigned[r]) < per_rank), key=lambda r: (load[r], r))
        assigned[rank].append(i)
        load[rank] += packs[i].cost(patch_cost)
    return [[packs[i] for i in sorted(idx)] for idx in assigned]
