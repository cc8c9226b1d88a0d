"""keye-train: megatron-core based training for Keye-VL-2.0 style long-video MoE VLMs.

Public entry points (the rest is internal and may move): `load_config` / `load_checked_config` compose and check a
recipe with overrides; `train` runs a stage on this rank, `build_trainer` returns its Trainer; `main` is the
`keye-train` command line. Imported lazily, so `import keye_train` stays cheap.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "load_config": "keye_train.config.compose",
    "load_checked_config": "keye_train.config.compose",
    "train": "keye_train.training",
    "build_trainer": "keye_train.training",
    "main": "keye_train.cli.main",
}
__all__ = ["build_trainer", "load_checked_config", "load_config", "main", "train"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'keye_train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)
