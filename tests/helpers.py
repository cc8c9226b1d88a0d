"""Shared helpers for tests that run the real CLI in a subprocess."""

import hashlib
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "testdata"
needs_shared_reason = "real test media live in ../shared/testdata, which a fresh clone does not have"


def _data_version() -> str:
    sources = sorted((REPO / "data_pipeline").glob("*.py"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]


# The generated corpus (keye-data demo, 140 samples) in a temp dir keyed by the data_pipeline sources.
TEST_DATA = Path(tempfile.gettempdir()) / f"keye-test-data-{_data_version()}"
DATA = [
    f"data.shards={TEST_DATA / 'shards'}",
    f"data.tokenizer={TEST_DATA / 'tokenizer.json'}",
    "data.image_max_tokens=16",
    "data.video_fps=1.0",
    "data.frame_min_tokens=4",
    "data.frame_max_tokens=8",
    "data.video_total_tokens=64",
]
QUIET = ["~recipe", "model=tiny", "logging.wandb_mode=disabled", "logging.progress_bar=false", *DATA]


def ensure_test_data() -> Path:
    if not (TEST_DATA / "shards" / "index.json").is_file():
        from data_pipeline.demo import make_demo

        partial = Path(tempfile.mkdtemp(prefix="keye-test-data-"))
        make_demo(partial, samples=140, seed=0, samples_per_shard=20, toy_sft_samples=0, log=lambda _: None)
        try:
            partial.rename(TEST_DATA)
        except OSError:  # built meanwhile by another session
            pass
    return TEST_DATA


def cli_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")


def keye_train(*args: str, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "keye_train.cli", *args]
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout, **popen)


def start_keye_train(*args: str) -> subprocess.Popen:
    """keye_train() started in the background, for runs that need not wait on each other (one core each); its
    result from finished()."""
    return start_process([sys.executable, "-m", "keye_train.cli", *args])


def start_process(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """cmd under `env` (cli_env() by default), its output collected in temporary files (a pipe nobody reads would
    stall it)."""
    logs = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(cmd, env=env or cli_env(), stdout=logs[0], stderr=logs[1], text=True)
    process.logs = logs
    return process


def finished(process: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    stdout, stderr = (log.seek(0) or log.read() for log in process.logs)
    for log in process.logs:
        log.close()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def logged_losses(run_dir) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl; a resumed run re-logs steps after its checkpoint, the last wins."""
    import json

    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def corrupt_copy(source: Path, target: Path, per_shard: int = 3) -> dict:
    """Copy a shard directory and damage, in place and at the same size, up to `per_shard` videos and as many
    other records in every shard (noise over the video bytes, a 0xff byte inside the JSON). Returns the counts."""
    import json
    import shutil

    from data_pipeline.shards import ShardSet

    shutil.copytree(source, target)
    shards = ShardSet(target)
    damaged = {"corrupt_video": 0, "non_utf8": 0}
    for number, name in enumerate(shards.shards):
        data = bytearray((target / name).read_bytes())
        entries = shards.entries(number)
        videos = [k for k, e in enumerate(entries) if any(m["type"] == "video" for m in e["media"].values())]
        videos = videos[:per_shard]
        records = [k for k in range(len(entries)) if k not in videos][:per_shard]
        for k in videos:
            _, media = shards.read(number, k)
            blob = next(iter(media.values()))
            at = data.find(blob)
            data[at : at + len(blob)] = random.Random(number * 1000 + k).randbytes(len(blob))
            damaged["corrupt_video"] += 1
        for k in records:
            record, _ = shards.read(number, k)
            raw = json.dumps(record, ensure_ascii=False).encode()
            at = data.find(raw)
            data[at + raw.index(b'"id"') + 1] = 0xFF  # the key's first letter becomes an invalid UTF-8 byte
            damaged["non_utf8"] += 1
        (target / name).write_bytes(bytes(data))
    return damaged
