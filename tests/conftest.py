"""Builds the generated test corpus once per session (see tests/helpers.py); without a GPU, Triton kernels
run in the interpreter (set before any kernel module is imported). Worker processes started by tests import the
tree under test first, not whichever checkout the environment has installed."""

import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

from tests.helpers import ensure_test_data  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def test_data():
    return ensure_test_data()


@pytest.fixture(scope="module", autouse=True)
def remove_module_dirs(request, tmp_path_factory):
    """Removes the dirs a module's fixtures made with tmp_path_factory once its tests pass: a full run writes
    ~19 GB of tiny-model checkpoints, which would otherwise stay until the session ends (for good if it fails)."""
    root = tmp_path_factory.getbasetemp()
    before, failed = set(root.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(root.iterdir()) - before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
