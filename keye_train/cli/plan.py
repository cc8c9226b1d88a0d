"""`keye-train plan [chain <name>]`: the resolved config, the layout, parameter counts, memory per rank and the
token budget of a stage; or the budget of every stage of a chain.

With `parallel.placement=auto` (or `--placement`), also where the ViT should run: pp0 (colocated), split (with
how many ViT ranks) and spread on the cost model (`parallel/simulate.py`, rates from
`parallel/calibration/<--rates>.json`) for a workload profile, with each placement's stage-0 memory:

    keye-train plan recipe=stage1_pretrain parallel.placement=auto [--profile shards|<mix>] [--gpus N]
        [--rates h200] [--profile-packs 32] [--memory-gib 120]

`--profile shards` (the default when data.shards holds an index) plans packs from the recipe's shards without
decoding; a mix name (image_heavy, mixed, video_heavy, long_video, hour_video) takes a synthetic profile."""

from __future__ import annotations

from keye_train.planning.budget import format_tokens, token_budget
from keye_train.planning.memory import GIB, memory_by_placement, plan_memory
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
    if "rollout" in memory:
        print("  (rollout: the training state kept while the engine decodes; its activations are the KV cache)")
    items = ("params", "grads", "optimizer", "activations", "teacher", "total")
    for item in (i for i in items if i in memory[stages[0]]):
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
    _print_memory(plan_memory(cfg, sizes))


PLAN_FLAGS = ("--profile", "--gpus", "--rates", "--profile-packs", "--memory-gib", "--placement")


def split_flags(argv: list[str]) -> tuple[list[str], dict]:
    """(hydra overrides, {flag: value}) from `plan`'s arguments (`--flag value` or `--flag=value`)."""
    overrides, flags, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in PLAN_FLAGS:
            if "=" in arg:
                flags[name] = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                flags[name] = argv[i + 1]
                i += 1
            else:
                raise ValueError(f"keye-train plan {name} needs a value")
        elif arg.startswith("--"):
            raise ValueError(f"keye-train plan: unknown option {arg} (options: {', '.join(PLAN_FLAGS)})")
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags


def run(argv: list[str], world="auto") -> int:
    from keye_train.config.compose import load_checked_config

    overrides, flags = split_flags(argv)
    if "--gpus" in flags:
        world = int(flags["--gpus"])
    cfg, sizes = load_checked_config(overrides, world, check_data=False)
    print_plan(cfg, sizes)
    if str(cfg.parallel.placement) == "auto" or "--placement" in flags:
        print_placement(cfg, sizes, flags)
    return 0


def _profile(cfg, flags: dict):
    from pathlib import Path

    from keye_train.planning.placement import STANDARD_MIXES, profile_from_shards, standard_profile

    packs = int(flags.get("--profile-packs", 32))
    name = flags.get("--profile")
    has_shards = all((Path(s) / "index.json").is_file() for s in str(cfg.data.shards).split(","))
    if name in (None, "shards") and has_shards:
        return profile_from_shards(cfg.data, cfg.train.seq_length, packs, cfg.train.global_batch, cfg.train.seed)
    if name == "shards":
        raise ValueError(f"--profile shards: no shard index under data.shards={cfg.data.shards}")
    if name is None:
        name = next((m for m, spec in STANDARD_MIXES.items() if spec["seq_length"] == cfg.train.seq_length), "mixed")
        print(f"\n(no shard index under data.shards: the synthetic `{name}` profile; pass --profile to choose)")
    if name not in STANDARD_MIXES:
        raise ValueError(f"--profile {name}: not shards or one of {', '.join(STANDARD_MIXES)}")
    work = standard_profile(name, packs=packs)
    import dataclasses

    return dataclasses.replace(work, seq_length=cfg.train.seq_length, global_batch=cfg.train.global_batch)


def print_placement(cfg, sizes, flags: dict) -> None:
    """The placement table: cost-model step time, tokens/s, bubble, stage-0 memory per placement; the choice."""
    import dataclasses

    from keye_train.planning.placement import SIM_TO_CONFIG, choose, layout_of, model_dims, settings_of
    from parallel import costs
    from parallel.layout import LayoutSizes

    rates = costs.load_rates(flags.get("--rates", "h200"))
    budget_gib = float(flags.get("--memory-gib", 120))
    work = _profile(cfg, flags)
    layout = layout_of(cfg.parallel)
    dims = model_dims(cfg.model)
    # a frozen ViT has no backward (a trainable projector's small one is not modelled)
    settings = settings_of(cfg.parallel, trains_vit="vit" in [str(p) for p in cfg.stage.trainable])
    vit_tp = cfg.parallel.vision.tp
    picked = choose(rates, sizes.world, layout, work, dims, settings, vit_tp=vit_tp)
    results = picked["results"]
    base = results["pp0"]
    patches = sum(p.patches for p in work.packs) / len(work.packs)
    frames = sum(len(p.frames) for p in work.packs) / len(work.packs)
    print(
        f"\nViT placement on {sizes.world} GPUs, LM {layout.label()} (cost model: {rates.device}, "
        f"{rates.provenance.get('source', '?')})"
    )
    print(
        f"  profile {work.name}: {len(work.packs)} packs of {work.seq_length} tokens, {patches:,.0f} patches in "
        f"{frames:.0f} images/frames per pack on average; global batch {work.global_batch}"
    )
    print(f"  recompute: LM {settings.lm_recompute:.2f} of a layer's forward, ViT {settings.vit_recompute:.2f}")
    header = f"  {'placement':<15}{'vit ranks':>10}{'step s':>9}{'tok/s/GPU':>11}{'x colocated':>12}{'bubble':>8}"
    print(header + f"{'stage-0 GiB':>13}{'ViT-rank GiB':>14}  note")
    rows = []
    for key in ("pp0", "pp0_vit_dp", "split", "spread"):
        r = results[key]
        name = {"pp0": "colocated", "pp0_vit_dp": "(colo. ViT-DP)"}.get(key, key)
        if not r.legal:
            print(f"  {name:<15}{'-':>10}  not legal: {r.reason}")
            continue
        if key == "split":
            lm = sizes.world - r.vit_ranks
            lm_sizes = LayoutSizes(
                sizes.world,
                sizes.tp,
                sizes.pp,
                sizes.ep,
                sizes.etp,
                r.dp,
                lm // (sizes.etp * sizes.ep * sizes.pp),
                r.vit_ranks,
            )
            train = dataclasses.replace(cfg.train, global_batch=r.global_batch)
            memory = memory_by_placement(cfg.model, cfg.parallel, train, lm_sizes, "split", r.vit_ranks, vit_tp)
        else:
            placement = "spread" if key == "spread" else "colocated"
            memory = memory_by_placement(cfg.model, cfg.parallel, cfg.train, sizes, placement)
        first = memory["first_stage"]["total"] / GIB
        vision = memory["vision"]["total"] / GIB if "vision" in memory else None
        over = max(first, vision or 0.0) > budget_gib
        note = r.reason + (f"; over the {budget_gib:.0f} GiB budget" if over else "")
        if key == "pp0_vit_dp":
            note = "not trainable today (the tower is unsharded on every TP rank): a reference" + (
                f"; {note}" if note else ""
            )
        print(
            f"  {name:<15}{r.vit_ranks or '-':>10}{r.step_time_s:>9.1f}{r.tokens_per_s / sizes.world:>11.0f}"
            f"{r.tokens_per_s / base.tokens_per_s:>12.2f}{r.bubble:>8.2f}{first:>13.1f}"
            f"{(f'{vision:.1f}' if vision is not None else '-'):>14}  {note}"
        )
        rows.append((key, r, over))
    fits = {key: not over for key, _, over in rows}
    choice = picked["choice"]
    if not fits.get(choice, False):
        trainable = [(k, r) for k, r, over in rows if not over and k != "pp0_vit_dp"]
        if trainable:
            choice = max(trainable, key=lambda kr: kr[1].tokens_per_s)[0]
            picked["why"] = f"the fastest placement within the {budget_gib:.0f} GiB budget"
        else:
            picked["why"] = f"nothing fits the {budget_gib:.0f} GiB budget: {choice} is the fastest"
    r = results[choice]
    extra = f" parallel.vision.ranks={r.vit_ranks}" if choice == "split" else ""
    print(f"choice: {SIM_TO_CONFIG[choice]} ({picked['why']}) -> parallel.placement={SIM_TO_CONFIG[choice]}{extra}")
    from parallel.simulate import pipeline_patch_cost

    cost = pipeline_patch_cost(rates, dims, layout, settings, choice)
    print(
        f"  data.patch_cost for the pack deal under it: {cost:.3f} (a patch's stage-0 compute in LM tokens; "
        "0 where the ViT is off the replica)"
    )
