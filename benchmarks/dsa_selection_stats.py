"""How local our own lightning indexer's top-k sets are: the DSA warm-up checkpoint of a chain (default
recipes/chain/dsa_locality_cpu.yaml) runs forward over held-out packs; every DSA layer's indexer output is
captured, its top-k taken with kernels.dsa.indexer_topk (what sparse mode attends to), and
kernels.dsa_sets.selection_stats is computed per layer and per document. The same for the untrained indexer (the
warm-up's start: the pre-trained LM, indexers at their seeded init), for kernels.dsa_sets.structured_indices and
random_indices at the same L and k. Writes benchmarks/results/dsa_selection_stats.json and prints a table.

    .venv/bin/python benchmarks/dsa_selection_prepare.py --real-videos ../shared/testdata/videos
    .venv/bin/python -m keye_train.cli chain dsa_locality_cpu
    .venv/bin/python benchmarks/dsa_selection_stats.py [--packs 4] [overrides...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
sys.path.insert(0, str(REPO))
from benchmarks.common import cpu_description, git_state, write_result  # noqa: E402
from kernels import dsa as dsa_ops  # noqa: E402
from kernels.dsa_sets import random_indices, selection_stats, structured_indices  # noqa: E402


class SelectionCapture:
    """Forward hooks on every DSA layer's indexer: per call, each layer's top-k sets [T, k] of the packed sequence
    (kernels.dsa.indexer_topk on the indexer's outputs, as sparse mode computes them). `cu_seqlens` is set by the
    caller before each forward (the indexer does not see the document boundaries)."""

    def __init__(self, attentions, topk: int):
        self.topk, self.cu_seqlens = topk, None
        self.selections: list[torch.Tensor | None] = [None] * len(attentions)
        self.handles = [a.indexer.register_forward_hook(self._hook(i)) for i, a in enumerate(attentions)]

    def _hook(self, layer: int):
        def hook(module, inputs, outputs):
            index_q, index_w, index_k = (t.detach() for t in outputs)
            self.selections[layer] = dsa_ops.indexer_topk(index_q, index_w, index_k, self.cu_seqlens, self.topk)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def document_sets(indices: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Packed [T, k] sets -> one [len, k] per document, positions relative to its start (-1 kept)."""
    bounds = cu_seqlens.tolist()
    return [torch.where(indices[s:e] >= 0, indices[s:e] - s, -1) for s, e in zip(bounds[:-1], bounds[1:])]


def pooled(stats: list[dict]) -> dict:
    """Row-weighted means over documents (documents with no measurable rows drop out)."""
    rows = sum(s["rows"] for s in stats)
    if rows == 0:
        return {"jaccard": float("nan"), "union16_over_k": float("nan"), "rows": 0}
    mean = lambda key: sum(s[key] * s["rows"] for s in stats if s["rows"]) / rows  # noqa: E731
    return {"jaccard": mean("jaccard"), "union16_over_k": mean("union16_over_k"), "rows": rows}


@torch.no_grad()
def measure(parts, cfg, batches) -> dict:
    from keye_train.model.dsa import dsa_core_attentions
    from keye_train.model.keye_vl import embed_inputs, packed_params, visual_token_mask

    attentions = dsa_core_attentions(parts.lm)
    capture = SelectionCapture(attentions, cfg.model.lm.dsa.topk)
    per_layer = [[] for _ in attentions]
    documents = []
    try:
        for module in parts.modules():
            module.eval()
        for pack, batch in enumerate(batches):
            capture.cu_seqlens = batch.cu_seqlens
            decoder_input = embed_inputs(parts.lm, parts.vision, batch, cfg.model.tokens, False)
            parts.lm(
                input_ids=batch.input_ids.view(1, -1),
                position_ids=batch.position_ids.view(3, 1, -1),
                attention_mask=None,
                decoder_input=decoder_input,
                labels=None,
                packed_seq_params=packed_params(batch),
            )
            bounds = batch.cu_seqlens.tolist()
            visual = visual_token_mask(batch.input_ids, cfg.model.tokens)
            layer_docs = [document_sets(sel, batch.cu_seqlens) for sel in capture.selections]
            for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
                doc = {"pack": pack, "length": e - s, "visual_tokens": int(visual[s:e].sum()), "layers": []}
                for layer, docs in enumerate(layer_docs):
                    stats = selection_stats(docs[d])
                    doc["layers"].append(stats)
                    per_layer[layer].append(stats)
                if any(s["rows"] for s in doc["layers"]):
                    documents.append(doc)
    finally:
        capture.remove()
    return {"layers": [pooled(stats) for stats in per_layer], "documents": documents}


def load_parts(cfg, ctx, checkpoint: str):
    from keye_train import checkpoint as store
    from keye_train.model.builder import build_model, initialize_weights

    parts = build_model(cfg.model, cfg.parallel, ctx.dtype, ctx.device.type == "cuda", ctx.placement)
    initialize_weights(parts, cfg.model, cfg.train.seed)  # the warm-up's seeded indexer init
    fresh = store.load_weights(checkpoint, parts, ctx.layout)
    return parts, fresh


def held_out_batches(cfg, packs: int, video_packs: int, scan: int):
    """The first `packs` packs of the held-out stream, then (scanning up to `scan` packs) the first `video_packs`
    others holding a document with more than k visual tokens (a video or picture document)."""
    from data_pipeline.loader import ShardLoader
    from data_pipeline.tokenizer import KeyeTokenizer
    from keye_train.model.keye_vl import visual_token_mask

    loader = ShardLoader(cfg.data, cfg.train.seq_length, 1, cfg.train.seed + 1)
    tokens, least = KeyeTokenizer(cfg.data.tokenizer).ids, cfg.model.lm.dsa.topk
    chosen, videos = [], []
    try:
        for _ in range(scan):
            if len(chosen) >= packs and len(videos) >= video_packs:
                break
            batch = loader.next_step()[0]
            visual = visual_token_mask(batch.input_ids, tokens)
            bounds = batch.cu_seqlens.tolist()
            if any(int(visual[s:e].sum()) > least for s, e in zip(bounds[:-1], bounds[1:])):
                if len(videos) < video_packs:
                    videos.append(batch)
            elif len(chosen) < packs:
                chosen.append(batch)
    finally:
        loader.close()
    return chosen + videos


def last_metrics(run_dir: Path, keys=("step", "loss", "dsa/kl", "dsa/recall", "dsa/overlap", "dsa/union16")) -> dict:
    """The final logged step of a training run (its metrics.jsonl), the keys it has."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return {key: last[key] for key in keys if key in last}


def fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", default="dsa_locality_cpu")
    parser.add_argument("--stage", default="dsa_warmup", help="the chain's warm-up stage (the one before: untrained)")
    parser.add_argument("--held-out", default="runs/dsa_locality/data/held_out", help="shards/ and tokenizer.json")
    parser.add_argument("--packs", type=int, default=4, help="held-out packs without a long visual document")
    parser.add_argument("--video-packs", type=int, default=1, help="packs with a document of > k visual tokens")
    parser.add_argument("--scan", type=int, default=200, help="held-out packs read at most to find them")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/dsa_selection_stats.json"))
    args, overrides = parser.parse_known_args()

    from data_pipeline.tokenizer import KeyeTokenizer
    from keye_train.cli.chain import load_chain, stage_arguments
    from keye_train.cli.spawn import single_process_env
    from keye_train.config.compose import load_checked_config
    from keye_train.training.setup import start_rank
    from parallel.layout import destroy_process_groups

    chain = load_chain(args.chain)
    index = [s.name for s in chain.stages].index(args.stage)
    held = Path(args.held_out)
    stage_args = stage_arguments(chain, index, [*overrides, "parallel.nproc=1", "parallel.ep=1"])
    eval_args = [*stage_args, f"data.shards={held / 'shards'}", f"data.tokenizer={held / 'tokenizer.json'}"]
    cfg, _ = load_checked_config(eval_args, 1, check_data=True)
    single_process_env()
    ctx = start_rank(cfg)
    cfg.model.tokens = KeyeTokenizer(cfg.data.tokenizer).ids
    trained_dir = Path(chain.run_root) / args.stage
    untrained_dir = Path(chain.run_root) / chain.stages[index - 1].name
    batches = held_out_batches(cfg, args.packs, args.video_packs, args.scan)

    parts, fresh = load_parts(cfg, ctx, str(untrained_dir))
    if not fresh:
        raise RuntimeError(f"{untrained_dir} already holds indexer weights: it is not the warm-up's start")
    untrained = measure(parts, cfg, batches)
    parts, fresh = load_parts(cfg, ctx, str(trained_dir))
    if fresh:
        raise RuntimeError(f"{trained_dir} lacks indexer weights {fresh[:3]}")
    trained = measure(parts, cfg, batches)
    destroy_process_groups()

    lm, dsa = cfg.model.lm, cfg.model.lm.dsa
    length, k = cfg.train.seq_length, dsa.topk
    scale = k / 2048  # the generator's defaults are set for k 2048: its parts scaled to this k
    structured_options = {
        "sinks": max(1, round(64 * scale)),
        "window": max(1, round(512 * scale)),
        "span_length": max(1, round(64 * scale)),
        "tail": max(1, round(128 * scale)),
    }
    structured = selection_stats(structured_indices(length, k, **structured_options))
    structured_default = selection_stats(structured_indices(16384, 2048))
    random_sets = selection_stats(random_indices(length, k))

    stages = {s.name: s.overrides for s in chain.stages}
    result = {
        "benchmark": "dsa_selection_stats",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": cpu_description(),
        **git_state(),
        "settings": {"torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "model": {
            "preset": cfg.model.name,
            "lm_layers": lm.num_layers,
            "hidden": lm.hidden_size,
            "heads": lm.num_heads,
            "kv_heads": lm.num_kv_heads,
            "head_dim": lm.head_dim,
            "experts": lm.num_experts,
            "moe_topk": lm.moe_topk,
            "index_heads": dsa.index_heads,
            "index_head_dim": dsa.index_head_dim,
            "vit_layers": cfg.model.vit.num_layers,
        },
        "k": k,
        "context_length": length,
        "training": {
            "chain": args.chain,
            "common": chain.common,
            "stages": stages,
            "untrained_checkpoint": str(untrained_dir),
            "trained_checkpoint": str(trained_dir),
            "final_step_metrics": {"pretrain": last_metrics(untrained_dir), "warmup": last_metrics(trained_dir)},
        },
        "held_out": {
            "shards": str(held / "shards"),
            "packs": len(batches),
            "documents_measured": len(trained["documents"]),
            "document_lengths": [d["length"] for d in trained["documents"]],
            "document_visual_tokens": [d["visual_tokens"] for d in trained["documents"]],
        },
        "trained": trained,
        "untrained": untrained,
        "structured": {"length": length, "k": k, "options": structured_options, **structured},
        "structured_default_16k_k2048": {"length": 16384, "k": 2048, **structured_default},
        "random": {"length": length, "k": k, **random_sets},
        "published_range": {"jaccard": [0.85, 0.95], "union16_over_k": [1.5, 2.5]},
    }
    write_result(Path(args.out), result)

    held_docs = list(zip(result["held_out"]["document_lengths"], result["held_out"]["document_visual_tokens"]))
    print(f"L {length}, k {k}; held-out documents measured (length, visual tokens): {held_docs}")
    print("| sets | layer | Jaccard | U16/k | rows |")
    print("|---|---|---|---|---|")
    for name, run in (("trained indexer", trained), ("untrained indexer", untrained)):
        for layer, s in enumerate(run["layers"]):
            print(f"| {name} | {layer} | {fmt(s['jaccard'])} | {fmt(s['union16_over_k'])} | {s['rows']} |")
    generated = (
        ("structured (scaled to k)", structured),
        ("structured (16K, k 2048)", structured_default),
        ("random", random_sets),
    )
    for name, s in generated:
        print(f"| {name} | - | {fmt(s['jaccard'])} | {fmt(s['union16_over_k'])} | {s['rows']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
