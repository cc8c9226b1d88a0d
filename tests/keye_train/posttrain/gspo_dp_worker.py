"""One rank of the GSPO data-parallel test (started by torchrun from test_gspo.py): takes every other pack of
the toy global batch, runs the objective as the loop does, averages the gradients over DP as DDP does, and rank 0
writes the loss and gradients as JSON."""

import json
import sys

import torch.distributed as dist

from keye_train.training.objectives.gspo import GSPOObjective
from tests.keye_train.posttrain.gspo_toy import (
    WorldPlacement,
    packs,
    rl_config,
    run_objective,
    toy_policy,
    toy_responses,
)


def main(out: str, correction: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [1, 3, 2, 2]  # uneven packs: rank 0 gets 1 + 2 responses, rank 1 gets 3 + 2
    mine = packs(toy_responses(), sizes)[rank::world]
    policy = toy_policy(0)
    result, grads = run_objective(
        GSPOObjective(WorldPlacement(), "cpu", rl_config(correction=correction)), policy, mine
    )
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= world
    if rank == 0:
        payload = {"loss": result.loss, "metrics": result.metrics, "grads": {k: g.tolist() for k, g in grads.items()}}
        with open(out, "w") as f:
            json.dump(payload, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
