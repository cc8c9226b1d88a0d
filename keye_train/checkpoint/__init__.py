"""Checkpoints: our own pickle-free per-rank format, published atomically (store.py)."""

from keye_train.checkpoint.store import latest_checkpoint, load, load_weights, save

__all__ = ["latest_checkpoint", "load", "load_weights", "save"]
