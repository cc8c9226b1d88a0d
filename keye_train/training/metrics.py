"""Metrics of a step beyond its loss (MoE balance, the DSA indexer, the data pipeline, GPU memory), reduced to
the one rank that logs, and the logger itself (progress bar, JSONL, W&B)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter


def dsa_metrics(lm: torch.nn.Module, device) -> dict[str, float]:
    """Collective over all ranks: the indexer KL (mean per layer and micro-batch) and the sampled selection
    metrics, from the DSA layers of every pipeline stage (TP rank 0 only: the other TP ranks hold copies)."""
    from megatron.core import parallel_state

    from keye_train.model.dsa import dsa_core_attentions

    names = ("kl", "recall", "overlap", "union16")
    sums = torch.zeros(2 * len(names), dtype=torch.float64, device=device)
    attentions = dsa_core_attentions(lm) if lm is not None else []
    for attention in attentions:
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            for stats in attention.stats:
                for k, name in enumerate(names):
                    if name in stats and stats[name] == stats[name]:
                        sums[2 * k] += stats[name]
                        sums[2 * k + 1] += 1
        attention.stats.clear()
    dist.all_reduce(sums)
    return {f"dsa/{name}": float(sums[2 * k] / sums[2 * k + 1]) for k, name in enumerate(names) if sums[2 * k + 1] > 0}


def data_metrics(loader, placement) -> dict:
    """Collective over data parallelism: the loader's counters summed over DP ranks (rejects by reason, samples,
    packing efficiency) plus the plan's, which are global."""
    total: dict = {}
    for rank_counters in placement.gather_over_data_parallel(loader.counters()):
        for key, value in rank_counters.items():
            if key.startswith(("plan/", "build/")) or key == "epoch":  # global: the same on every rank
                total[key] = value
            else:
                total[key] = total.get(key, 0) + value
    capacity = total.pop("pack_capacity", 0)
    out = {f"data/{key}": float(value) for key, value in total.items() if key != "pack_tokens"}
    out["data/packing_efficiency"] = total.get("pack_tokens", 0) / capacity if capacity else float("nan")
    return out


def peak_memory_gib(device) -> float:
    """Collective: the largest peak of allocated GPU memory over all ranks since the last call, in GiB."""
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    torch.cuda.reset_peak_memory_stats(device)
    return float(peak)


class MoEBalanceTracker:
    """Counts tokens routed to each expert in every layer through forward hooks on the routers."""

    def __init__(self, lm: torch.nn.Module | None, num_layers: int, num_experts: int):
        """lm: None on ranks without one (placement=split's ViT ranks), which still join the collectives."""
        self.counts = None
        self.shape = (num_layers, num_experts)
        for module in lm.modules() if lm is not None else ():
            if isinstance(module, TopKRouter):
                module.register_forward_hook(self._hook(module.layer_number - 1))

    def _hook(self, layer: int):
        def record(_module, _inputs, outputs):
            routing_map = outputs[1].detach()
            if self.counts is None:
                self.counts = torch.zeros(self.shape, dtype=torch.float64, device=routing_map.device)
            self.counts[layer] += routing_map.sum(0)

        return record

    def collect(self, num_microbatches: int, device, lm_groups: bool = True) -> dict[str, float]:
        """Collective over all ranks (and megatron's LM groups where lm_groups). Returns aux loss and
        load-imbalance metrics, then resets."""
        counts = self.counts if self.counts is not None else torch.zeros(self.shape, dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        self.counts = None
        per_layer = counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)
        if lm_groups:
            moe_utils.reduce_aux_losses_tracker_across_ranks()
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        metrics = {
            "moe/max_over_mean_load": float(per_layer.mean()),
            "moe/worst_layer_max_over_mean_load": float(per_layer.max()),
        }
        if "load_balancing_loss" in tracker:
            values = tracker["load_balancing_loss"]["values"] / num_microbatches
            metrics["moe/aux_loss"] = float(values.mean())
        moe_utils.clear_aux_losses_tracker()
        return metrics


class StepMetrics:
    """Collective: everything a step logs besides its loss, gathered from the model, the data and the device."""

    def __init__(self, cfg, parts, data, placement, num_microbatches: int, device):
        self.cfg, self.parts, self.data, self.placement = cfg, parts, data, placement
        self.num_microbatches, self.device = num_microbatches, device
        self.balance = MoEBalanceTracker(parts.lm, cfg.model.lm.num_layers, cfg.model.lm.num_experts)

    def collect(self, step: int) -> dict:
        metrics = self.balance.collect(self.num_microbatches, self.device, lm_groups=self.parts.lm is not None)
        if self.cfg.model.lm.dsa.mode != "dense":
            metrics.update(dsa_metrics(self.parts.lm, self.device))
        if step % self.cfg.logging.log_interval == 0:
            metrics.update(data_metrics(self.data, self.placement))
        if self.device.type == "cuda":
            metrics["memory/peak_gib"] = peak_memory_gib(self.device)
        return metrics


class MetricsLogger:
    """Console progress bar + JSONL + W&B (offline by default). Only instantiate on the metrics-owning rank."""

    def __init__(self, run_dir: Path, logging_cfg, config_dict: dict, total_steps: int, start_step: int, run_id: str):
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if logging_cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=logging_cfg.wandb_project,
                dir=str(run_dir),
                mode=logging_cfg.wandb_mode,
                id=run_id,
                resume="allow",
                config=config_dict,
                name=run_dir.name,
                group=logging_cfg.wandb_group,
            )
        self.bar = None
        if logging_cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                lr=f"{metrics['lr']:.2e}",
                gnorm=f"{metrics['grad_norm']:.3f}",
                refresh=False,
            )
        else:
            print(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
