"""The training loop shared by every stage."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel

from keye_train import checkpoint
from keye_train.config import KeyeTrainConfig
from keye_train.config import check_model_config, check_train_config
from keye_train.operations import (PREEMPT_REQUEST, LossSpikeGuard, PreemptionWatch, global_loss,
                                   gradients_nonfinite, hang_watchdog, poison_gradients)
from keye_train.metrics import MetricsLogger, MoEBalanceTracker, dsa_metrics, peak_memory_gib
from keye_train.model.builder import build_model, initialize_weights
from keye_train.optim import apply_freezing, build_optimizer, lr_at, set_lr, wrap_ddp
from data_pipeline.loader import ShardLoader
from keye_train.train_step import optimizer_step, reduce_lm_loss, run_microbatches
from parallel import cpu_compat, placement
from parallel.layout import check_batch, check_layout, init_process_groups, require_colocated, resolve_backend


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    choices = {"auto": torch.bfloat16 if on_gpu else torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in choices:
        raise ValueError(f"train.dtype={name!r}; choose auto, bf16 or fp32")
    return choices[name]


def tokenizer_token_ids(cfg: KeyeTrainConfig):
    from data_pipeline.tokenizer import KeyeTokenizer

    tokenizer = KeyeTokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.lm.vocab_size:
        raise ValueError(f"data.tokenizer has {tokenizer.vocab_size} tokens > model.lm.vocab_size {cfg.model.lm.vocab_size}")
    return tokenizer.ids


def data_metrics(loader: ShardLoader) -> dict:
    """Data counters summed over DP ranks (rejects by reason, samples, packing efficiency) plus the plan's."""
    counters = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(counters, loader.counters(), group=parallel_state.get_data_parallel_group())
    total: dict = {}
    for rank_counters in counters:
        for key, value in rank_counters.items():
            if key.startswith("plan/") or key == "epoch":  # the plan is global: the same on every rank
                total[key] = value
            else:
                total[key] = total.get(key, 0) + value
    capacity = total.pop("pack_capacity", 0)
    out = {f"data/{key}": float(value) for key, value in total.items() if key != "pack_tokens"}
    out["data/packing_efficiency"] = total.get("pack_tokens", 0) / capacity if capacity else float("nan")
    return out


class Trainer:
    def __init__(self, cfg: KeyeTrainConfig):
        self.cfg = cfg
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            cpu_compat.install()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
        sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, world)
        require_colocated(cfg.parallel)
        check_model_config(cfg.model)
        check_train_config(cfg.train)
        self.preemption = PreemptionWatch(Path(cfg.run_dir) / PREEMPT_REQUEST)
        self.nonfinite_streak = 0
        self.spikes = LossSpikeGuard(cfg.train.loss_spike_factor, cfg.train.loss_spike_window)
        self.num_microbatches = check_batch(cfg.train, sizes)
        init_process_groups(cfg.parallel, sizes, resolve_backend(cfg.parallel, self.on_gpu))
        if self.on_gpu:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.layout = dataclasses.asdict(sizes)
        torch.manual_seed(cfg.train.seed)
        if self.on_gpu:  # megatron's model-parallel CUDA RNG streams (TP-aware dropout and init)
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        self.dtype = resolve_dtype(cfg.train.dtype, self.on_gpu)

        cfg.model.tokens = tokenizer_token_ids(cfg)  # the data's special ids drive the visual-token scatter
        self.parts = build_model(cfg.model, cfg.parallel, self.dtype, self.on_gpu)
        initialize_weights(self.parts, cfg.model, cfg.train.seed)
        apply_freezing(self.parts, cfg.stage.trainable)
        distopt = cfg.parallel.distributed_optimizer
        self.lm_chunk = wrap_ddp(self.parts.lm, distopt)
        self.vision_chunk = wrap_ddp(self.parts.vision, distopt) if self.parts.vision is not None else None
        self.ddp_chunks = [c for c in (self.lm_chunk, self.vision_chunk) if isinstance(c, DistributedDataParallel)]
        self.optimizer = build_optimizer(self.ddp_chunks, cfg.optim, self.dtype, distopt)
        self.sequence_parallel = self.parts.lm.config.sequence_parallel
        self.balance = MoEBalanceTracker(self.parts.lm, cfg.model.lm.num_layers, cfg.model.lm.num_experts)

        dp_rank = parallel_state.get_data_parallel_rank()
        self.data = ShardLoader(cfg.data, cfg.train.seq_length, cfg.train.global_batch, cfg.train.seed, dp_rank,
                                parallel_state.get_data_parallel_world_size(),
                                log=lambda line: print(f"[rank {dist.get_rank()}] {line}", flush=True))
        self.run_dir = Path(cfg.run_dir)
        self.step = 0
        self.run_id = uuid.uuid4().hex[:12]
        if cfg.checkpoint.resume:
            self._resume()
        if self.step == 0 and cfg.checkpoint.init_from:
            fresh = checkpoint.load_weights(cfg.checkpoint.init_from, self.parts, self.layout)
            self.optimizer.reload_model_params()  # mixed precision keeps fp32 main copies of the weights
            if placement.is_metrics_owner():
                print(f"initialised from {cfg.checkpoint.init_from}"
                      + (f"; {len(fresh)} indexer tensors start fresh" if fresh else ""), flush=True)

    def _resume(self) -> None:
        latest = checkpoint.latest_checkpoint(self.run_dir)
        if latest is None:
            return
        extra = checkpoint.load(latest, self.parts, self.optimizer, self.layout)
        self.step = extra["step"]
        self.data.load_state_dict(extra["data"])
        self.run_id = extra["run_id"]
        self.spikes.recent.extend(extra.get("loss_window", []))
        if placement.is_metrics_owner():
            print(f"resumed from {latest} at step {self.step}", flush=True)

    def save(self) -> Path:
        extra = {"data": self.data.state_dict(), "run_id": self.run_id, "loss_window": list(self.spikes.recent)}
        return checkpoint.save(self.run_dir, self.step, self.parts, self.optimizer, extra, self.layout,
                               self.cfg.checkpoint.keep_last)

    def train_step(self) -> dict:
        """One optimizer step over a global batch; returns the step's metrics (meaningful on the owner rank)."""
        started = time.perf_counter()
        microbatches = [batch.to(self.device) for batch in self.data.next_step()]
        for chunk in self.ddp_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        set_lr(self.optimizer, lr)
        ce_sum, n_global = run_microbatches(self.lm_chunk, self.vision_chunk, microbatches, self.cfg.model.tokens,
                                            self.sequence_parallel, self.device)
        if self.step == self.cfg.train.inject_nonfinite_at_step and dist.get_rank() == 0:
            poison_gradients(self.ddp_chunks)
        last = self._last_stage()
        loss = reduce_lm_loss(ce_sum, n_global, self.device) if last else float("nan")
        if self.layout["pp"] > 1:  # only the last pipeline stage has it; every rank judges spikes alike
            loss = global_loss(loss, last, self.device)
        if gradients_nonfinite(self.ddp_chunks, ce_sum, self.device):
            updated, grad_norm = False, float("nan")
            self._count_bad_step("non-finite gradients or loss")
        elif self.spikes.is_spike(loss):
            updated, grad_norm = False, float("nan")
            self._count_bad_step(f"loss spike ({loss:.4g} > train.loss_spike_factor={self.cfg.train.loss_spike_factor}"
                                 f" x the mean of the last {len(self.spikes.recent)} steps)")
        else:
            self.nonfinite_streak = 0
            updated, grad_norm = optimizer_step(self.optimizer, self.ddp_chunks)
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "update_skipped": float(not updated),
                   "nonfinite_skips": float(self.nonfinite_streak), "supervised_tokens": float(n_global)}
        metrics.update(self.balance.collect(self.num_microbatches, self.device))
        if self.cfg.model.lm.dsa.mode != "dense":
            metrics.update(dsa_metrics(self.parts.lm, self.device))
        if self.step % self.cfg.logging.log_interval == 0:
            metrics.update(data_metrics(self.data))
        elapsed = time.perf_counter() - started
        tokens = self.cfg.train.global_batch * self.cfg.train.seq_length
        if self.device.type == "cuda":
            metrics["memory/peak_gib"] = peak_memory_gib(self.device)
        metrics.update({"step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                        "tokens_per_s_per_rank": tokens / elapsed / dist.get_world_size()})
        self.step += 1
        return metrics

    def _count_bad_step(self, reason: str) -> None:
        """The update is skipped (the gradients are zeroed at the next step); abort by policy or streak."""
        self.nonfinite_streak += 1
        train = self.cfg.train
        if train.nonfinite_policy == "abort" or self.nonfinite_streak > train.max_nonfinite_skips:
            raise RuntimeError(f"{reason} at step {self.step + 1} ({self.nonfinite_streak} bad steps in a row, "
                               f"train.nonfinite_policy={train.nonfinite_policy}, train.max_nonfinite_skips="
                               f"{train.max_nonfinite_skips}); the last good checkpoint is untouched")
        if placement.is_metrics_owner():
            print(f"step {self.step + 1}: {reason}, update skipped ({self.nonfinite_streak} in a row)", flush=True)

    @staticmethod
    def is_metrics_owner() -> bool:
        return placement.is_metrics_owner()

    @staticmethod
    def _last_stage() -> bool:
        return parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    def fit(self) -> list[dict]:
        cfg = self.cfg
        logger = None
        if placement.is_metrics_owner():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            logger = MetricsLogger(self.run_dir, cfg.logging, dataclasses.asdict(cfg), cfg.train.steps, self.step,
                                   self.run_id)
        history = []
        try:
            while self.step < cfg.train.steps:
                with hang_watchdog(cfg.train.hang_timeout_s):
                    metrics = self.train_step()
                history.append(metrics)
                if logger is not None:
                    logger.log(self.step, metrics)
                preempted = self.preemption.agreed(self.device)
                every = cfg.checkpoint.interval
                if preempted or (every > 0 and (self.step % every == 0 or self.step == cfg.train.steps)):
                    path = self.save()
                if preempted:
                    if placement.is_metrics_owner():
                        print(f"preempted ({self.preemption.signal_name or 'another rank was signalled'}): "
                              f"checkpoint {path} written at step {self.step}; run again to resume", flush=True)
                    break
        finally:
            self.data.close()
            if logger is not None:
                logger.close()
        return history
