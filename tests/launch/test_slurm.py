"""launch/ on its own: SLURM host lists and the rendezvous a node derives from its allocation."""

import pytest

from launch.slurm import expand_hostlist, rendezvous_from_env


def test_hostlists_expand_like_slurm():
    assert expand_hostlist("gpu[01-03,7],login") == ["gpu01", "gpu02", "gpu03", "gpu7", "login"]
    assert expand_hostlist("a[1-2]-ib[0-1]") == ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]
    assert expand_hostlist("node9") == ["node9"]


def test_the_rendezvous_comes_from_the_allocation():
    env = {
        "SLURM_JOB_ID": "777",
        "SLURM_JOB_NODELIST": "dgx[010-011]",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_RESTART_COUNT": "3",
    }
    assert rendezvous_from_env(env, 2) == {
        "master_addr": "dgx010",
        "nodes": 2,
        "node_rank": 1,
        "job_id": "777",
        "restarts": 3,
    }
    with pytest.raises(ValueError, match="launch.nodes=4 but the allocation has 2 nodes"):
        rendezvous_from_env(env, 4)
    with pytest.raises(ValueError, match="SLURM_NODEID unset"):
        rendezvous_from_env({k: v for k, v in env.items() if k != "SLURM_NODEID"}, 2)
