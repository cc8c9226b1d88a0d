"""`keye-train plan [chain <name>]`: the resolved config, the layout, parameter counts, memory per rank and the
token budget of a stage; or the budget of every stage of a chain."""

from __future__ import annotations

from keye_train.planning.budget import format_tokens, token_budget
from keye_train.planning.memory import GIB, memory_per_rank
from keye_train.planning.parameters import count_parameters


def _print_layout(cfg, sizes) -> None:
    par = cfg.parallel
    sp = par.sequence_parallel if par.sequence_parallel is not None else sizes.tp > 1
    print(f"model {cfg.model.name}: seq_length {cfg.train.seq_length}, global_batch {cfg.train.global_batch}")
    print(
        f"layout: world {sizes.world} = tp {sizes.tp} x cp {sizes.cp} x pp {sizes.pp} x dp {sizes.dp}; "
        f"ep {sizes.ep}, etp {sizes.etp}, expert_dp {sizes.expert_dp}; sequence_parallel {sp}; "
        f"distributed_optimizer {par.distributed_optimizer}"
    )
    print(
        f"  {cfg.model.lm.num_layers // sizes.pp} LM layers per stage, "
        f"{cfg.model.lm.num_experts // sizes.ep} experts per rank, "
        f"{max(1, cfg.train.global_batch // sizes.dp)} micro-batches per DP rank; vision tower on stage 0"
    )
    if sizes.cp > 1:
        print(
            f"  context parallel {sizes.cp}: each rank holds chunks r and {2 * sizes.cp - 1}-r of every document's "
            f"{2 * sizes.cp} (about {cfg.train.seq_length // sizes.cp:,} of {cfg.train.seq_length:,} tokens); "
            "K/V all-gathered per layer; the ViT runs whole on every CP rank"
        )


def _print_parameters(counts: dict) -> None:
    print("\nparameters")
    rows = [("vit", counts["vit"]), ("projector", counts["projector"])]
    rows += [(f"lm.{part}", n) for part, n in counts["lm_parts"].items()]
    rows += [("lm", counts["lm"]), ("total", counts["total"]), ("active per token (LM)", counts["active"])]
    for name, n in rows:
        print(f"  {name:<24}{n:>18,}")


def _print_memory(memory: dict) -> None:
    print("\nmemory per rank, GiB (bf16 params, fp32 grads, Adam fp32 master + moments)")
    stages = list(memory)
    print(f"  {'':<14}" + "".join(f"{s:>14}" for s in stages))
    for item in ("params", "grads", "optimizer", "activations", "total"):
        print(f"  {item:<14}" + "".join(f"{memory[s][item] / GIB:>14.2f}" for s in stages))


def print_chain_budget(names: list[str], configs: list) -> None:
    """One row per stage: its recipe's length, steps, batch and token budget; then the chain's total."""
    print(f"{'stage':<22}{'seq_length':>11}{'steps':>9}{'global_batch':>14}{'tokens':>28}")
    for name, cfg in zip(names, configs):
        t = cfg.train
        print(
            f"{name:<22}{t.seq_length:>11,}{t.steps:>9,}{t.global_batch:>14,}"
            f"{token_budget(t):>22,} {format_tokens(token_budget(t)):>5}"
        )
    total = sum(token_budget(c.train) for c in configs)
    print(f"{'total':<56}{total:>22,} {format_tokens(total):>5}")


def print_plan(cfg, sizes) -> None:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    counts = count_parameters(cfg.model)
    _print_layout(cfg, sizes)
    budget = token_budget(cfg.train)
    print(
        f"token budget: {cfg.train.steps} steps x {cfg.train.global_batch} x {cfg.train.seq_length} = "
        f"{budget:,} tokens ({format_tokens(budget)})"
    )
    _print_parameters(counts)
    _print_memory(memory_per_rank(cfg.model, cfg.parallel, cfg.train, sizes))
