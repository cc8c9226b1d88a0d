"""Builds the generated test corpus once per session (see tests/helpers.py); without a GPU, Triton kernels
run in the interpreter (set before any kernel module is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import ensure_test_data


@pytest.fixture(scope="session", autouse=True)
def test_data():
    return ensure_test_data()
