"""The training data loader of one DP rank: the global pack plan, this rank's share, decoded ahead of time.

`next_step()` returns this rank's `global_batch / dp` packs for one optimizer step. Samples of the next
`prefetch_steps` steps are already decoding in worker processes. The state (`state_dict`) is the planner's
state before the first step not yet returned plus the counters, so a resumed run continues with exactly the
samples an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections import Counter, deque

from data_pipeline.encode import EncodedSample, MediaBudget
from data_pipeline.packing import assemble_pack
from data_pipeline.planner import PackingConfig, PackPlanner
from data_pipeline.shards import ShardMixture
from data_pipeline.sizing import ImageBudget, VideoBudget
from data_pipeline.tokenizer import KeyeTokenizer
from data_pipeline.workers import DecodePool, Rejected
from data_pipeline.batch import PackedBatch


def media_budget(data) -> MediaBudget:
    """The stage's image and video budget from a `DataConfig`."""
    return MediaBudget(
        image=ImageBudget(min_tokens=data.image_min_tokens, max_tokens=data.image_max_tokens),
        video=VideoBudget(fps=data.video_fps, max_frames=data.video_max_frames, frame_min_tokens=data.frame_min_tokens,
                          frame_max_tokens=data.frame_max_tokens, video_total_tokens=data.video_total_tokens,
                          adaptive=data.adaptive_video_budget))


class ShardLoader:
    def __init__(self, data, seq_length: int, global_batch: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 log=print):
        if not 0 <= dp_rank < dp_size or global_batch % dp_size:
            raise ValueError(f"dp_rank {dp_rank} / dp_size {dp_size} / global_batch {global_batch}")
        self.tokenizer = KeyeTokenizer(data.tokenizer)
        roots, weights = data_sources(data)
        self.shards = ShardMixture(roots, self.tokenizer.fingerprint, verify=True)  # damaged tars: readable prefix
        if dp_rank == 0:
            for damage in self.shards.damaged:
                log(f"data: {damage.describe()}")
        budget = media_budget(data)
        packing = PackingConfig(seq_length=seq_length, open_packs=data.open_packs,
                                long_sample_tokens=data.long_sample_tokens,
                                long_short_ratio=tuple(data.long_short_ratio), patch_cost=data.patch_cost,
                                max_pack_age=data.max_pack_age, source_weights=weights if len(roots) > 1 else ())
        # every rank plans the same packs; one of them reports the planner's skips
        self.planner = PackPlanner(self.shards, self.tokenizer, budget, packing, seed,
                                   log=log if dp_rank == 0 else (lambda line: None))
        self.pool = DecodePool(roots, data.tokenizer, budget, seq_length, data.workers, data.decode_timeout_s)
        self.seq_length, self.global_batch = seq_length, global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.prefetch_steps = max(1, data.prefetch_steps)
        self.log = log
        self.ahead: deque = deque()  # (planner state before the step, this rank's packs, job ids)
        self.rejects: Counter = Counter()
        self.stats = Counter()  # samples, pack_tokens, pack_capacity

    # ---- stream -------------------------------------------------------------------------------------------

    def _plan_ahead(self) -> None:
        while len(self.ahead) < self.prefetch_steps:
            before = self.planner.state_dict()
            mine = self.planner.next_step(self.global_batch, self.dp_size)[self.dp_rank]
            jobs = [[self.pool.submit(s) for s in pack.samples] for pack in mine]
            self.ahead.append((before, mine, jobs))

    def next_step(self) -> list[PackedBatch]:
        self._plan_ahead()
        _, packs, jobs = self.ahead.popleft()
        batches = [self._assemble(pack.samples, [self.pool.result(j) for j in pack_jobs])
                   for pack, pack_jobs in zip(packs, jobs)]
        self._plan_ahead()  # the next steps decode while this one trains
        return batches

    def _assemble(self, planned: list, results: list) -> PackedBatch:
        samples: list[EncodedSample] = []
        used = 0
        for ref, result in zip(planned, results):
            where = f"[shard {self.shards.shards[ref.shard]}, sample {ref.sample}, epoch {ref.epoch}]"
            if isinstance(result, Rejected):
                self._reject(result.reason, f"{result.detail} {where}")
                continue
            if used + result.length > self.seq_length:  # a true timestamp with one digit more than planned
                self._reject("length_mismatch", f"{result.key} has {result.length} tokens, the pack is full")
                continue
            samples.append(result)
            used += result.length
            self.stats["clipped_spans"] += result.clipped_spans
        self.stats["samples"] += len(samples)
        self.stats["pack_tokens"] += used
        self.stats["pack_capacity"] += self.seq_length
        return assemble_pack(samples, self.seq_length, self.tokenizer.ids)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejects[reason] += 1
        self.log(f"data: skipped a sample ({reason}): {detail}")

    # ---- metrics and state --------------------------------------------------------------------------------

    def counters(self) -> dict:
        """Per-rank counts (decode rejects, samples, pack tokens) and the planner's global counts."""
        out = {f"rejected/{k}": v for k, v in self.rejects.items()}
        out.update({k: v for k, v in self.stats.items()})
        for key, value in self.consumed_planner_state()["counters"].items():
            out[f"plan/{key}"] = value
        out["epoch"] = self.consumed_planner_state()["epoch"]
        out["plan/damaged_shards"] = len(self.shards.damaged)
        out["plan/lost_samples"] = sum(d.lost for d in self.shards.damaged)
        return out

    def consumed_planner_state(self) -> dict:
        return self.ahead[0][0] if self.ahead else self.planner.state_dict()

    def state_dict(self) -> dict:
        return {"planner": self.consumed_planner_state(), "rejects": dict(self.rejects), "stats": dict(self.stats),
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        missing = {"planner", "rejects", "stats", "dp_rank", "dp_size", "global_batch"} - set(state)
        if missing:
            raise ValueError(f"the checkpoint's data state lacks {sorted(missing)}: it was not written by ShardLoader")
        for key in ("dp_rank", "dp_size", "global_batch"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"data state has {key}={state[key]}, this run has {getattr(self, key)}")
        self._drain()
        self.planner.load_state_dict(state["planner"])
        self.rejects = Counter(state["rejects"])
        self.stats = Counter(state["stats"])

    def _drain(self) -> None:
        for _, _, jobs in self.ahead:
            for pack_jobs in jobs:
                for job in pack_jobs:
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
            raise ValueError(f"{key}: {root} holds no index.json; build shards with `keye-data build` "
                             "(or `keye-data demo` for the demo corpus)")
        if weight <= 0:
            raise ValueError(f"{key.replace('.shards', '.weight')}={weight} must be > 0")
    for key in ("workers",):
        if getattr(data, key) < 0:
            raise ValueError(f"data.{key} must be >= 0")
    for key in ("prefetch_steps", "open_packs", "max_pack_age", "image_min_tokens", "video_max_frames", "video_total_tokens"):
        if getattr(data, key) < 1:
            raise ValueError(f"data.{key} must be >= 1")
    if data.decode_timeout_s <= 0:
        raise ValueError("data.decode_timeout_s must be > 0")
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
