"""The bytes the tiny model really keeps for backward in one training micro-batch, against the planner's
activation term (keye_train/planning/memory.py) for the same config and packed length. One CPU process (gloo).

The trainer's own schedule and objective run one micro-batch (forward and backward) in bf16 under
torch.autograd.graph.saved_tensors_hooks; every tensor autograd saves during the forward is counted once per
storage (views of one buffer count it once; parameters not at all), split into the LM's decoder layers and the
rest (ViT, embedding, head + CE). The planner's "kept" bytes of the LM layers (`lm_layer_bytes` x tokens x
layers, plus the DSA terms) are set beside the decoder share. Writes benchmarks/results/saved_activations_cpu.json.

    torchrun --standalone --nproc_per_node=1 benchmarks/saved_activations_cpu.py [--seq-length 512]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel import cpu_compat  # noqa: E402

cpu_compat.install()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.utils import unwrap_model  # noqa: E402

from benchmarks.common import REPO, git_state, write_result  # noqa: E402
from data_pipeline.loader import ShardLoader  # noqa: E402
from kernels import dsa as dsa_ops  # noqa: E402
from keye_train.config.compose import load_config  # noqa: E402
from keye_train.model import attention as attention_module  # noqa: E402
from keye_train.model import dsa as dsa_module  # noqa: E402
from keye_train.model.builder import build_model, initialize_weights  # noqa: E402
from keye_train.model.dsa import LightningIndexer  # noqa: E402
from keye_train.planning.memory import indexer_layer_bytes, lm_layer_bytes, sparse_layer_bytes  # noqa: E402
from keye_train.training.objectives.next_token import NextTokenObjective  # noqa: E402
from keye_train.training.schedules import schedule_for  # noqa: E402
from keye_train.training.setup import wrap_parts  # noqa: E402
from parallel.layout import check_batch, check_layout, init_process_groups  # noqa: E402
from parallel.placement import placement_for  # noqa: E402

CASES = {
    "dense, no recompute": ["attention=dense", "parallel.recompute=none"],
    "dense, selective [moe, layernorm]": ["attention=dense", "parallel.recompute=selective"],
    "dense, full": ["attention=dense", "parallel.recompute=full"],
    "warm-up (indexers only), no recompute": ["attention=warmup", "stage=indexer_only", "parallel.recompute=none"],
    "warm-up (indexers only), full": ["attention=warmup", "stage=indexer_only", "parallel.recompute=full"],
    "sparse, no recompute": ["attention=sparse", "parallel.recompute=none"],
}


class SavedBytes:
    """Counts the storages autograd saves during the forward, by owner: the DSA indexers' own (inside a
    LightningIndexer or the indexer KL), the attention kernel's (dense varlen or sparse attention), the rest of
    the LM decoder, or outside it (ViT, embedding, head + CE). Installs its wrappers; `remove` takes them off."""

    WRAPPED = (
        (dsa_ops, "indexer_kl_loss", "indexer"),  # model/dsa.py calls these through the module
        (dsa_ops, "sparse_gqa_attention", "kernel"),
        (attention_module, "dense_varlen_attention", "kernel"),
        (dsa_module, "dense_varlen_attention", "kernel"),
    )

    def __init__(self, decoder: torch.nn.Module, params):
        self.inside, self.tag, self.forward = False, None, True
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, tuple[int, str]] = {}
        decoder.register_forward_pre_hook(lambda *_: setattr(self, "inside", True))
        decoder.register_forward_hook(lambda *_: setattr(self, "inside", False))
        for module in decoder.modules():
            if isinstance(module, LightningIndexer):
                module.register_forward_pre_hook(lambda *_: setattr(self, "tag", "indexer"))
                module.register_forward_hook(lambda *_: setattr(self, "tag", None))
        self.originals = [(owner, name, getattr(owner, name)) for owner, name, _ in self.WRAPPED]
        for (owner, name, tag), (_, _, fn) in zip(self.WRAPPED, self.originals):
            setattr(owner, name, self.tagged(fn, tag))

    def tagged(self, fn, tag: str):
        def run(*args, **kwargs):
            self.tag = tag
            try:
                return fn(*args, **kwargs)
            finally:
                self.tag = None

        return run

    def remove(self) -> None:
        for owner, name, fn in self.originals:
            setattr(owner, name, fn)

    def owner(self) -> str:
        return "rest" if not self.inside else self.tag or "decoder"

    def pack(self, tensor):
        if self.forward and tensor.device.type == "cpu" and not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.param_ptrs and ptr not in self.seen:
                self.seen[ptr] = (storage.nbytes(), self.owner())
        return tensor

    def unpack(self, tensor):
        self.forward = False  # backward has begun: later packs are recomputation's working set
        return tensor

    def total(self, owner: str) -> int:
        return sum(n for n, who in self.seen.values() if who == owner)


def measure(base: list[str], case: list[str]) -> dict:
    cfg = load_config([*base, *case])
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, 1)
    check_batch(cfg.train, sizes)
    placement = placement_for(cfg.parallel, sizes)
    loader = ShardLoader(cfg.data, cfg.train.seq_length, cfg.train.global_batch, cfg.train.seed, 0, 1)
    cfg.model.tokens = loader.tokenizer.ids
    (batch,) = loader.next_step()[:1]
    loader.close()
    torch.manual_seed(0)
    parts = build_model(cfg.model, cfg.parallel, torch.bfloat16, False, placement)
    initialize_weights(parts, cfg.model, cfg.train.seed)
    model = wrap_parts(parts, cfg.optim, torch.bfloat16, False, placement)
    from keye_train.training.optim import apply_freezing

    apply_freezing(parts, cfg.stage.trainable)
    lm = unwrap_model(model.lm_chunk)
    counter = SavedBytes(lm.decoder, [p for chunk in model.ddp_chunks for p in chunk.parameters()])
    objective = NextTokenObjective(placement, torch.device("cpu"))
    objective.begin_step([batch])
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            objective.end_step(schedule_for(cfg, model, placement).run([batch], objective))
    finally:
        counter.remove()
    tokens, lm_cfg, full = batch.seq_length, cfg.model.lm, cfg.parallel.recompute == "full"
    kept, _ = lm_layer_bytes(lm_cfg, cfg.parallel.recompute, cfg.parallel.recompute_modules)
    own = 0.0 if full else indexer_layer_bytes(lm_cfg, 1, cfg.stage.trainable)  # full: recomputed in backward
    planned_lm = (kept + (0.0 if full else sparse_layer_bytes(lm_cfg))) * tokens * lm_cfg.num_layers
    planned_own = own * tokens * lm_cfg.num_layers
    measured_lm = counter.total("decoder") + counter.total("kernel")
    measured_own = counter.total("indexer")
    return {
        "overrides": case,
        "tokens": tokens,
        "measured_lm_bytes": measured_lm,
        "planned_lm_bytes": planned_lm,
        "lm_measured_over_planned": round(measured_lm / planned_lm, 3),
        "measured_attention_kernel_bytes": counter.total("kernel"),
        "measured_indexer_bytes": measured_own,
        "planned_indexer_bytes": planned_own,
        "measured_outside_decoder_bytes": counter.total("rest"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from tests.helpers import DATA, ensure_test_data

    ensure_test_data()
    base = ["~recipe", "model=tiny", *DATA, f"train.seq_length={args.seq_length}", "train.global_batch=1"]
    base += ["model.lm.dsa.topk=32", *args.overrides]
    cfg = load_config(base)
    init_process_groups(cfg.parallel, check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, 1), "gloo")
    rows = {}
    for name, case in CASES.items():
        rows[name] = measure(base, case)
        row = rows[name]
        print(
            f"{name:40s} LM layers: measured {row['measured_lm_bytes'] / 2**20:6.2f} MiB, planned "
            f"{row['planned_lm_bytes'] / 2**20:6.2f} MiB (x{row['lm_measured_over_planned']}); indexers: measured "
            f"{row['measured_indexer_bytes'] / 2**20:5.3f} MiB, "
            f"planned {row['planned_indexer_bytes'] / 2**20:5.3f} MiB; "
            f"of the LM's: attention kernel {row['measured_attention_kernel_bytes'] / 2**20:5.2f} MiB"
        )
    result = {
        "benchmark": "saved_activations_cpu",
        "device": "cpu (bf16, saved_tensors_hooks; bytes, not timing)",
        **git_state(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "base": base,
        "rows": rows,
    }
    write_result(REPO / "benchmarks" / "results" / "saved_activations_cpu.json", result)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
