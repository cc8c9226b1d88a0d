"""Compose a typed KeyeTrainConfig from the recipes tree plus command-line overrides."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from keye_train.config import MODEL_PRESETS, KeyeTrainConfig

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def _register() -> None:
    store = ConfigStore.instance()
    store.store(name="keye_train_schema", node=KeyeTrainConfig)
    for name, factory in MODEL_PRESETS.items():
        store.store(group="model", name=name, node=factory())


def load_config(overrides: list[str]) -> KeyeTrainConfig:
    """Unknown keys and wrong types fail here, before any rank starts, with the key in the message."""
    if not RECIPES_DIR.is_dir():
        raise FileNotFoundError(f"recipes folder not found at {RECIPES_DIR}; install keye-train from its repository "
                                "with `pip install -e .`")
    _register()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def load_checked_config(overrides: list[str], world: int | str | None = None, check_data: bool = True):
    """Compose, then validate layout, batch, model, train (and data) settings; returns (cfg, layout sizes).
    world: the rank count (None: parallel.nproc; "launch": launch.nodes x launch.gpus_per_node; "auto": the
    launch's when it spans several nodes, else parallel.nproc).
    Every failure is a ValueError naming the key, raised before any rank starts."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from data_pipeline.loader import check_data_config
    from keye_train.config import check_checkpoint_config, check_model_config, check_train_config
    from parallel.layout import check_batch, check_layout

    try:
        cfg = load_config(overrides)
        if world == "auto":
            world = "launch" if cfg.launch.nodes > 1 else None
        if world == "launch":
            if cfg.launch.nodes < 1 or cfg.launch.gpus_per_node < 1:
                raise ValueError(f"launch.nodes={cfg.launch.nodes}, launch.gpus_per_node={cfg.launch.gpus_per_node}: "
                                 "both must be >= 1")
            world = cfg.launch.nodes * cfg.launch.gpus_per_node
        sizes = check_layout(cfg.parallel, cfg.model.lm, cfg.model.vit, cfg.parallel.nproc if world is None else world)
        check_batch(cfg.train, sizes)
        check_model_config(cfg.model)
        check_train_config(cfg.train)
        check_checkpoint_config(cfg.checkpoint)
        if check_data:
            check_data_config(cfg.data)
    except (HydraException, OmegaConfBaseException) as err:  # layout and value errors are ValueErrors already
        raise ValueError(str(err)) from err
    return cfg, sizes
