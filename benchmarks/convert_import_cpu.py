"""Peak memory of `keye-train convert import` on a mid-size synthetic checkpoint (CPU, one rank).

A mid-size Keye-VL model (LM 4 layers x 1024 hidden, 32 experts of 512; ViT 4 x 512) is exported with its
seeded initialisation as a bf16 Keye-VL-2.0 HF checkpoint; a fresh process then imports it and reports its own
peak RSS. An importer that held the checkpoint would need the model (fp32 on CPU) plus the checkpoint; ours
needs the model plus one tensor at a time. The reference point is a process that builds and initialises the
same model (every parameter written); the difference is what importing costs on top. Peak RSS counts the
mapped safetensors pages a process has read, which the kernel can reclaim.

    .venv/bin/python benchmarks/convert_import_cpu.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_description, git_state, write_result  # noqa: E402

MID = [
    "~recipe",
    "model=tiny",
    "model.lm.num_layers=4",
    "model.lm.hidden_size=1024",
    "model.lm.num_heads=8",
    "model.lm.num_kv_heads=4",
    "model.lm.head_dim=128",
    "model.lm.mrope_section=[16,24,24]",
    "model.lm.num_experts=32",
    "model.lm.moe_topk=4",
    "model.lm.moe_ffn_hidden_size=512",
    "model.vit.num_layers=4",
    "model.vit.hidden_size=512",
    "model.vit.num_heads=8",
    "model.vit.ffn_hidden_size=1024",
]

EXPORT = """
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import torch
from keye_train.config.compose import load_checked_config
from keye_train.cli.convert import build_for_conversion
from keye_train.convert.exporter import export_keye_hf
from keye_train.model.builder import initialize_weights
cfg, sizes = load_checked_config(json.loads(sys.argv[1]), check_data=False)
parts = build_for_conversion(cfg, sizes)
initialize_weights(parts, cfg.model, 1)
params = sum(p.numel() for m in (parts.lm, parts.vision) for p in m.parameters())
export_keye_hf(parts, cfg.model, sys.argv[2], dtype=torch.bfloat16, max_shard_bytes=256 << 20)
print(json.dumps({"params": params}))
"""

IMPORT = """
import json, resource, sys, time
from keye_train.cli.convert import run
started = time.perf_counter()
run(["import", "--src", sys.argv[2], "--dst", sys.argv[3], *json.loads(sys.argv[1])])
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

BASELINE = """
import json, os, resource, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
from keye_train.config.compose import load_checked_config
from keye_train.cli.convert import build_for_conversion
from keye_train.model.builder import initialize_weights
cfg, sizes = load_checked_config(json.loads(sys.argv[1]), check_data=False)
parts = build_for_conversion(cfg, sizes)
initialize_weights(parts, cfg.model, 1)  # every parameter page written, as an import writes them
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(script: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"},
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hf, run_dir = Path(tmp) / "hf", Path(tmp) / "run"
        made = child(EXPORT, json.dumps(MID), str(hf))
        checkpoint_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
        built = child(BASELINE, json.dumps(MID))
        imported = child(IMPORT, json.dumps(MID), str(hf), str(run_dir))
    gib = 2**30
    row = {
        "params": made["params"],
        "checkpoint_gib": checkpoint_bytes / gib,
        "model_fp32_gib": made["params"] * 4 / gib,
        "build_only_peak_rss_gib": built["peak_rss_bytes"] / gib,
        "import_peak_rss_gib": imported["peak_rss_bytes"] / gib,
        "import_seconds": imported["seconds"],
    }
    row["import_over_build_gib"] = row["import_peak_rss_gib"] - row["build_only_peak_rss_gib"]
    for key, value in row.items():
        print(f"{key:<26}{value:>14.3f}" if isinstance(value, float) else f"{key:<26}{value:>14,}")
    stamp = {**git_state(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": {**cpu_description(), "ranks": 1}}
    write_result(
        REPO / "benchmarks" / "results" / "convert_import_cpu.json",
        {**stamp, "shapes": {"overrides": MID}, "rows": [row]},
    )


if __name__ == "__main__":
    main()
