"""A one-rank gloo world with megatron's groups, for tests that build model modules in-process."""

import pytest

from keye_train.config import ParallelConfig, tiny


@pytest.fixture(scope="module")
def single_rank():
    """Yields the tiny model config; the groups are destroyed after the module's tests."""
    from parallel import cpu_compat
    from parallel.layout import check_layout, destroy_process_groups, init_process_groups

    cpu_compat.install_if_needed()
    model = tiny()
    par = ParallelConfig()
    init_process_groups(par, check_layout(par, model.lm, model.vit, 1), "gloo")
    yield model
    destroy_process_groups()
