"""What bad data costs the loader, before and after issue 24; figures to benchmarks/results/bad_data_cpu.json.

    .venv/bin/python benchmarks/bad_data_cpu.py [--steps 40] [--reserve 0.15] [--before REV]

Two DP ranks (threads of one process, joined by the loader's exchange) train `--steps` steps of 8 packs of
32768 tokens on a realistic synthetic mix (tests/data_pipeline/mixes.py: captions, videos, texts; planned lengths
only, no media) in real tar shards, one of them holding a text of 20 sequences that the planner splits.
A stand-in decoder (mixes.FlakyDecoder) reads each record from its tar and returns a sample of the planned length.
Scenarios, each with 10% of the samples failing to decode (the same ones every epoch):
- decode rejects: nothing else;
- truncated shard: the shard with the long text is cut inside it, as a transfer that stopped short;
- failing long text: the long text fails to decode too (its tar is intact).
Columns, each in a fresh process: the code before issue 24 (`--before`, default: the parent of the commit that
added data_pipeline/shard_check.py), this code with data.reserve_fraction 0 and with `--reserve`.
An empty step is a step whose packs, on every rank, hold no supervised token.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# benchmarks/data_pipeline.py would shadow the package of that name
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
SEQ, GLOBAL_BATCH, DP = 32768, 8, 2
LONG_PARTS, LONG_ID = 20, "1100"  # the long text: sample 100 of shard 5
REJECT_RATE = 0.1


def make_corpus(root: Path, truncate: bool) -> Path:
    """12 shards of 200 samples; shard 5 holds, at position 100, a text of LONG_PARTS sequences."""
    from tests.data_pipeline.mixes import realistic_mix, write_index

    entries = realistic_mix(2400, 0)
    entries[int(LONG_ID)].update(kind="text", text_tokens=LONG_PARTS * SEQ, media={})
    root.mkdir(parents=True)
    write_index(root, [entries[i : i + 200] for i in range(0, 2400, 200)], tokenizer=_fingerprint(root), tars=True)
    if truncate:
        tar = root / "shard-000005.tar"
        offset = entries[int(LONG_ID)]["offset"]
        tar.write_bytes(tar.read_bytes()[: offset + 600])
    return root


def _fingerprint(root: Path) -> str:
    from data_pipeline.demo import train_tokenizer
    from data_pipeline.tokenizer import KeyeTokenizer

    train_tokenizer(["a b c 0123456789 ."], root.parent / "tokenizer.json", vocab_size=280)
    return KeyeTokenizer(root.parent / "tokenizer.json").fingerprint


def measure(shards: str, steps: int, reserve: float, reject_rate: float, fail_ids: list) -> dict:
    """One column of one scenario with whatever data_pipeline is first on sys.path."""
    import data_pipeline.loader as loader_module
    from data_pipeline.loader import ShardLoader
    from keye_train.config import DataConfig
    from tests.data_pipeline.mixes import FlakyDecoder, ThreadedRanks

    factory = functools.partial(FlakyDecoder, reject_rate=reject_rate, fail_ids=fail_ids)
    cfg = DataConfig(shards=shards, tokenizer=str(Path(shards).parent / "tokenizer.json"), reserve_fraction=reserve)
    ranks = ThreadedRanks(DP)
    if "exchange" in inspect.signature(ShardLoader).parameters:
        make = lambda rank: ShardLoader(
            cfg,
            SEQ,
            GLOBAL_BATCH,
            seed=0,
            dp_rank=rank,
            dp_size=DP,
            log=lambda _: None,
            exchange=ranks.exchange(rank),
            decoder_factory=factory,
        )
    else:  # the code before: no exchange, and the stand-in decoder goes in through its DecodePool
        pool = loader_module.DecodePool
        loader_module.DecodePool = lambda *args: pool(*args, decoder_factory=factory)
        make = lambda rank: ShardLoader(cfg, SEQ, GLOBAL_BATCH, seed=0, dp_rank=rank, dp_size=DP, log=lambda _: None)
    loaders = [make(rank) for rank in range(DP)]
    started = time.perf_counter()
    supervised = ranks.run(loaders, steps, lambda _, batches: [b.num_supervised() for b in batches])
    seconds = time.perf_counter() - started
    counters = [loader.counters() for loader in loaders]
    summed = {k: sum(c.get(k, 0) for c in counters) for c in counters for k in c if not k.startswith("plan/")}
    reads = sum(sum(loader.pool.inline.calls.values()) for loader in loaders)
    for loader in loaders:
        loader.close()
    per_step = [sum(sum(rank[step]) for rank in supervised) for step in range(steps)]
    return {
        "packing_efficiency": summed["pack_tokens"] / summed["pack_capacity"],
        "samples_trained": summed["samples"],
        "samples_read": reads,
        "rejected": {k.split("/", 1)[1]: v for k, v in sorted(summed.items()) if k.startswith("rejected/")},
        "empty_steps": sum(n == 0 for n in per_step),
        "empty_packs": sum(n == 0 for rank in supervised for step in rank for n in step),
        "planned": summed.get("planned"),
        "reserve_used": summed.get("reserve_used"),
        "carried_over": summed.get("carried_over"),
        "plan": {k: v for k, v in sorted(counters[0].items()) if k.startswith("plan/")},
        "seconds_per_step": seconds / steps,
    }


def base_tree(rev: str, out: Path) -> Path:
    """data_pipeline/ of commit `rev`, extracted under `out`."""
    archive = subprocess.run(["git", "archive", rev, "data_pipeline"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(out, filter="data")
    return out


def default_before() -> str:
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "data_pipeline/shard_check.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return subprocess.run(
        ["git", "rev-parse", f"{added[-1]}^"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def run_column(tree: Path, **job) -> dict:
    """measure(**job) in a fresh process whose data_pipeline comes from `tree`."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([str(tree), str(REPO)])
    )
    done = subprocess.run(
        [sys.executable, __file__, "--job", json.dumps(job)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"column {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reserve", type=float, default=0.15)
    parser.add_argument("--before", default=None, help="the commit measured as before (default: see above)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bad_data_cpu.json")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(measure(**json.loads(args.job))))
        return

    sys.path.insert(0, str(REPO))
    from benchmarks.common import cpu_description, git_state, write_result

    before = args.before or default_before()
    scenarios = {"decode rejects": (False, []), "truncated shard": (True, []), "failing long text": (False, [LONG_ID])}
    columns = {
        f"before ({before[:7]})": ("before", 0.0),
        "reserve 0": ("here", 0.0),
        f"reserve {args.reserve:g}": ("here", args.reserve),
    }
    figures = {}
    with tempfile.TemporaryDirectory(prefix="keye_bad_data_") as tmp:
        tmp = Path(tmp)
        trees = {"before": base_tree(before, tmp / "before"), "here": REPO}
        for scenario, (truncate, fail_ids) in scenarios.items():
            shards = make_corpus(tmp / scenario.replace(" ", "_") / "shards", truncate)
            figures[scenario] = {}
            for column, (code, reserve) in columns.items():
                figures[scenario][column] = run_column(
                    trees[code],
                    shards=str(shards),
                    steps=args.steps,
                    reserve=reserve,
                    reject_rate=REJECT_RATE,
                    fail_ids=fail_ids,
                )
                print(f"{scenario} / {column}: done", flush=True)

    print(
        f"\n{'scenario':<18}{'code':<20}{'efficiency':>11}{'trained':>9}{'read':>7}{'empty steps':>13}"
        f"{'empty packs':>13}  rejected by reason"
    )
    for scenario, rows in figures.items():
        for column, r in rows.items():
            rejected = ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "none"
            print(
                f"{scenario:<18}{column:<20}{r['packing_efficiency']:>11.4f}{r['samples_trained']:>9}"
                f"{r['samples_read']:>7}{r['empty_steps']:>13}{r['empty_packs']:>13}  {rejected}"
            )
    result = {
        "benchmark": "bad_data_cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        **git_state(),
        "before": before,
        "device": cpu_description(),
        "shapes": {
            "seq_length": SEQ,
            "global_batch": GLOBAL_BATCH,
            "dp": DP,
            "steps": args.steps,
            "prefetch_steps": 2,
            "corpus": "realistic_mix(2400, 0) in 12 tar shards of 200, "
            f"one text of {LONG_PARTS} sequences (shard 5, sample 100)",
            "decode_reject_rate": REJECT_RATE,
            "reserve_fraction": args.reserve,
            "budget": "Stage 1 (DataConfig defaults)",
        },
        "figures": figures,
        "goals": {"packing_efficiency_32k_10pct_rejects": 0.97, "empty_steps": 0},
    }
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
