"""One rank of the MOPD data-parallel test (started by torchrun from test_objective.py): every other pack of the
toy global batch, the objective as the loop runs it, gradients averaged over DP as DDP does; rank 0 writes JSON."""

import json
import sys

import torch.distributed as dist

from keye_train.training.objectives.mopd import MOPDObjective
from tests.keye_train.posttrain.gspo_toy import WorldPlacement, run_objective, toy_policy
from tests.keye_train.posttrain.mopd.mopd_toy import configs, mopd_packs, sample_responses, teacher_policy


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    responses = sample_responses(toy_policy(0), teacher_policy(), "overlap", 4, 8, seed=3)
    mine = mopd_packs(responses, [1, 3, 2, 2])[rank::world]
    mopd, rl = configs("icepop", 0.5)
    policy = toy_policy(0)
    result, grads = run_objective(MOPDObjective(WorldPlacement(), "cpu", mopd, rl), policy, mine)
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= world
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"loss": result.loss, "grads": {k: g.tolist() for k, g in grads.items()}}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
