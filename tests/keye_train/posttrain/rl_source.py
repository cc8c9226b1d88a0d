"""The RL data source on the tiny model in this process (1 rank, CPU, the `single_rank` groups), for the module
fixtures of the RL data source tests: the base RL overrides, the model with seeded weights, and the source with a
reward on the response ids (rl_train_worker.even_fraction); and the routers' own routing maps, to check replay."""

import torch

from tests.helpers import QUIET
from tests.keye_train.posttrain.rl_train_worker import even_fraction


def rl_overrides(prompts, seq_length: int, *extra: str) -> list[str]:
    """One rank, `rl.prompts`, responses of at most 5 tokens, 8 rollout slots, one pack of `seq_length` a
    micro-batch; `extra` sets the rest (group size, prompts per step, capacity, the feature under test)."""
    return [
        *QUIET,
        "parallel.nproc=1",
        "rl.enabled=true",
        f"rl.prompts={prompts}",
        "rollout.sampling.max_new_tokens=5",
        "rollout.slots=8",
        "train.global_batch=1",
        f"train.seq_length={seq_length}",
        *extra,
    ]


def rl_source(overrides: list[str], optimizer: bool = False):
    """(cfg, tokenizer, model, placement, source): the tiny model initialised with seed 7 (with DDP and an
    optimizer when `optimizer`), the source scoring `even_fraction` of the decoded response ids."""
    from data_pipeline.tokenizer import KeyeTokenizer
    from keye_train.config.compose import load_checked_config
    from keye_train.model.builder import build_model, initialize_weights
    from keye_train.posttrain.rl_data import RLDataSource
    from keye_train.training.optim import build_optimizer, wrap_ddp
    from keye_train.training.setup import TrainModel
    from parallel.placement import ColocatedPlacement

    cfg, _ = load_checked_config(overrides)
    tokenizer = KeyeTokenizer(cfg.data.tokenizer)
    cfg.model.tokens = tokenizer.ids
    placement = ColocatedPlacement()
    parts = build_model(cfg.model, cfg.parallel, torch.float32, False, placement)
    initialize_weights(parts, cfg.model, seed=7)
    if optimizer:
        lm = wrap_ddp(parts.lm, distributed_optimizer=False)
        model = TrainModel(parts, lm, None, build_optimizer([lm], cfg.optim, torch.float32, False))
    else:
        model = TrainModel(parts, parts.lm, None, None)
    source = RLDataSource(cfg, model, placement, tokenizer, reward=even_fraction)
    source.decode = lambda ids: " ".join(str(t) for t in ids)
    return cfg, tokenizer, model, placement, source


class RoutingMaps:
    """Forward hooks on every TopKRouter: the [T, E] routing map of each forward, in layer order."""

    def __init__(self, lm):
        from keye_train.posttrain.rollout.routing import routers

        self.maps: list[torch.Tensor] = []
        self.handles = [r.register_forward_hook(self._hook) for r in routers(lm)]
        self.layers = len(self.handles)

    def _hook(self, module, inputs, output):
        self.maps.append(output[1].detach().clone())

    def take(self) -> list[torch.Tensor]:
        """Per forward run since the last take: [T, layers, E] bool."""
        maps, self.maps = self.maps, []
        return [torch.stack(maps[i : i + self.layers], dim=1) for i in range(0, len(maps), self.layers)]


def chosen(routes: torch.Tensor, experts: int) -> torch.Tensor:
    """[T, layers, k] expert ids -> [T, layers, E] bool."""
    out = torch.zeros(*routes.shape[:2], experts, dtype=torch.bool)
    return out.scatter_(2, routes.long().clamp(min=0), True)
