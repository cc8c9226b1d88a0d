"""`keye-train convert import|export --src PATH --dst PATH [hydra overrides...]`.

    import  an HF checkpoint (Keye-VL-2.0, Qwen3-MoE LM or SigLIP ViT) -> a weights-only checkpoint at step 0 in
            the run directory --dst, sharded for the configured layout; start training from it with
            checkpoint.init_from=<dst>. Parts the source lacks keep their seeded initialisation.
    export  a run directory or checkpoint (same layout as written) -> a Keye-VL-2.0 HF checkpoint at --dst.
    plan    what each rank of the configured layout would read, checked against the checkpoint's headers on the
            meta device (no tensor data read or allocated; any size, e.g. the full model on a laptop).

Ranks are spawned as for training (parallel.nproc, or under torchrun). Each rank prints the SHA-256 of what it
imported; rank 0 prints a summary over all ranks.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

PASSTHROUGH = "hf_passthrough.safetensors"  # in the run directory: HF tensors we carry but do not model


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="keye-train convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["import", "export", "plan"])
    parser.add_argument("--src", required=True)
    parser.add_argument("--dst", help="import: the run directory to write; export: the HF folder to write")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="export dtype (default bf16)")
    return parser.parse_known_args(argv)


def build_for_conversion(cfg, sizes):
    """Start the layout's process groups and build this rank's model parts (weights still to be loaded)."""
    from keye_train.config import DType
    from keye_train.model.builder import build_model
    from keye_train.training.setup import resolve_dtype
    from parallel import cpu_compat
    from parallel.layout import init_process_groups, resolve_backend
    from parallel.placement import ColocatedPlacement

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.install()
    init_process_groups(cfg.parallel, sizes, resolve_backend(cfg.parallel, on_gpu))
    return build_model(cfg.model, cfg.parallel, resolve_dtype(DType.auto, on_gpu), on_gpu, ColocatedPlacement())


def _summary(digest: str, log) -> None:
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if dist.get_rank() == 0:
        combined = hashlib.sha256("".join(digests).encode()).hexdigest()
        log(f"checksums: {len(digests)} ranks, combined sha256 {combined}")


def run(argv: list[str]) -> int:
    from keye_train import checkpoint
    from keye_train.cli.spawn import needs_spawn, single_process_env, spawn_local
    from keye_train.config.compose import load_checked_config
    from keye_train.convert.exporter import export_keye_hf
    from keye_train.convert.hf_checkpoint import passthrough_tensors
    from keye_train.convert.importer import import_hf
    from parallel.layout import destroy_process_groups

    args, overrides = _parse(argv)
    cfg, sizes = load_checked_config(overrides, world="auto", check_data=False)
    if args.mode == "plan":
        return _plan(cfg, sizes, args.src)
    if args.dst is None:
        raise ValueError(f"convert {args.mode} needs --dst")
    if needs_spawn(cfg.parallel.nproc):
        return spawn_local(cfg.parallel.nproc, argv, command="convert")
    single_process_env()
    parts = build_for_conversion(cfg, sizes)
    rank0 = dist.get_rank() == 0
    log = (lambda line: print(line, flush=True)) if rank0 else (lambda line: None)
    layout = sizes.record()
    if args.mode == "import":
        report = import_hf(parts, cfg.model, args.src, log=log, progress=True)
        print(f"[rank {dist.get_rank()}] {report['loaded']} tensors, sha256 {report['sha256']}", flush=True)
        _summary(report["sha256"], log)
        path = checkpoint.save(
            Path(args.dst), 0, parts, None, {"run_id": "imported", "imported_from": str(args.src)}, layout, keep_last=1
        )
        extra = passthrough_tensors(args.src)
        if rank0 and extra:
            save_file(extra, str(Path(args.dst) / PASSTHROUGH))
        log(f"wrote {path}; start a stage from it with checkpoint.init_from={args.dst}")
    else:
        fresh = checkpoint.load_weights(args.src, parts, layout)
        if fresh:
            log(f"{len(fresh)} indexer tensors are not in {args.src}; exporting their initialisation")
        extra_file = Path(args.src) / PASSTHROUGH
        extra = load_file(str(extra_file)) if extra_file.is_file() else {}
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        index = export_keye_hf(parts, cfg.model, args.dst, passthrough=extra, dtype=dtype)
        if index is not None:
            log(
                f"wrote {len(index['weight_map'])} tensors, {index['metadata']['total_size'] / 2**30:.2f} GiB, "
                f"to {args.dst}"
            )
    destroy_process_groups()
    return 0


def _plan(cfg, sizes, src: str) -> int:
    """Print what every rank of the layout would read, checked against the checkpoint headers (meta device)."""
    from keye_train.convert.importer import import_plan

    plan = import_plan(cfg.model, sizes, src)
    print(f"import plan for {src}: world {sizes.world} = tp {sizes.tp} x pp {sizes.pp} x dp {sizes.dp}, ep {sizes.ep}")
    print(f"{'pipeline stage':>15}{'ep rank':>9}{'tensors':>9}{'bytes read per rank':>22}{'GiB':>9}")
    for (stage, ep_rank), role in sorted(plan["roles"].items()):
        print(f"{stage:>15}{ep_rank:>9}{role['tensors']:>9}{role['bytes']:>22}{role['bytes'] / 2**30:>9.2f}")
    if plan["unused"]:
        print(
            f"unused in the checkpoint ({len(plan['unused'])}): {', '.join(plan['unused'][:5])}"
            + (" ..." if len(plan["unused"]) > 5 else "")
        )
    return 0
