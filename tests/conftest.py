"""Builds the generated test corpus once per session (see tests/helpers.py)."""

import pytest

from tests.helpers import ensure_test_data


@pytest.fixture(scope="session", autouse=True)
def test_data():
    return ensure_test_data()
