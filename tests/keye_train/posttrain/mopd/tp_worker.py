"""One rank of the MOPD vocab-parallel test (torchrun from test_advantage.py): the vocab split over 2 gloo ranks,
token_scores through VocabShard's collectives; rank 0 writes every field as JSON."""

import json
import sys

import torch.distributed as dist

from keye_train.posttrain.mopd.advantage import token_scores
from tests.keye_train.posttrain.mopd.tp_inputs import inputs


def main(out: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher, sampled, k = inputs()
    width = student.shape[-1] // world
    cols = slice(rank * width, (rank + 1) * width)
    got = token_scores(student[:, cols], teacher[:, cols], sampled, mode, k, rank * width, dist.group.WORLD, chunk=5)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({name: getattr(got, name).tolist() for name in got.__dataclass_fields__}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
