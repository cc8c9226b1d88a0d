"""Compose a typed KeyeTrainConfig from the recipes tree plus command-line overrides, and check it."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    from keye_train.config.model import MODEL_PRESETS
    from keye_train.config.root import KeyeTrainConfig

    store = ConfigStore.instance()
    store.store(name="keye_train_schema", node=KeyeTrainConfig)
    for name, factory in MODEL_PRESETS.items():
        store.store(group="model", name=name, node=factory())


def _config_error(err: Exception) -> ValueError:
    """Hydra's message, then the key and first line of the OmegaConf error under it (which carries full_key)."""
    lines, seen = [str(err).split("\n")[0]], err.__cause__ or err.__context__
    while seen is not None:
        if getattr(seen, "full_key", None):
            value = f"={seen.value!r}" if getattr(seen, "value", None) is not None else ""
            lines.append(f"{seen.full_key}{value}: {str(seen).splitlines()[0]}")
            break
        seen = seen.__cause__ or seen.__context__
    return ValueError("; ".join(lines))


def load_config(overrides: list[str]):
    """Unknown keys, wrong types and bad choices fail here (Hydra's and OmegaConf's own errors, each naming the
    key), and each section's value checks (ValueError), before any rank starts."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    if not RECIPES_DIR.is_dir():
        raise FileNotFoundError(
            f"recipes folder not found at {RECIPES_DIR}; install keye-train from its repository with `pip install -e .`"
        )
    _register()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    refuse_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)


def refuse_unknown_keys(node, prefix: str = "") -> None:
    """A key the typed schema lacks (e.g. added with `+train.nope=1`, which Hydra lets through) is an error that
    names it, not a value the run would silently drop."""
    import dataclasses

    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        schema = OmegaConf.get_type(node)
        known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in node.keys():
            if known is not None and key not in known:
                raise ValueError(f"{prefix}{key}: not a key of {schema.__name__} (no such setting)")
            refuse_unknown_keys(node._get_node(key), f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node._iter_ex(resolve=False)):
            refuse_unknown_keys(item, f"{prefix}{i}.")


def load_checked_config(overrides: list[str], world: int | str | None = None, check_data: bool = True):
    """Compose, then validate layout, batch (and data) settings; returns (cfg, layout sizes).
    world: the rank count (None: parallel.nproc; "launch": launch.nodes x launch.gpus_per_node; "auto": the
    launch's when it spans several nodes, else parallel.nproc).
    Every failure is a ValueError naming the key, raised before any rank starts."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from data_pipeline.loader import check_data_config
    from parallel.layout import check_batch, check_layout

    try:
        cfg = load_config(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise _config_error(err) from err
    if world == "auto":
        world = "launch" if cfg.launch.nodes > 1 else None
    if world == "launch":
        world = cfg.launch.nodes * cfg.launch.gpus_per_node
    sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, cfg.parallel.nproc if world is None else world)
    check_batch(cfg.train, sizes)
    if check_data:
        check_data_config(cfg.data)
        check_tokenizer_fits(cfg)
    return cfg, sizes


def check_tokenizer_fits(cfg) -> None:
    from data_pipeline.tokenizer import KeyeTokenizer

    vocab = KeyeTokenizer(cfg.data.tokenizer).vocab_size
    if vocab > cfg.model.lm.vocab_size:
        raise ValueError(f"data.tokenizer has {vocab} tokens > model.lm.vocab_size {cfg.model.lm.vocab_size}")
