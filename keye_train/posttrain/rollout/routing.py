"""Routing replay (R3): record the experts each MoE router picks at rollout, replay them in a training forward.

megatron-core 0.16.1's `RouterReplay` hooks the router's top-k (`topk_routing_with_score_function` calls
`get_replay_topk`). We attach one instance per router of a given model instead of turning on
`moe_enable_routing_replay` in its config: megatron's instance list is global, so a second model built with the
flag (an MOPD teacher, a test's reference) would break its per-layer length check. The instances are taken out of
that global list again and driven per model through `ModelRoutes`.

Replay keeps the target for every forward until cleared (a recompute of the same micro-batch in backward sees
the same routes), which is right for one micro-batch in flight at a time (PP = 1). In training,
`micro_batch_replay` sets each micro-batch's routes (`RLBatch.routes`) as its forward starts and clears them when
the step's forward-backward ends, so nothing reaches the next phase or the rollout. Rows marked -1 in a replayed
route (tokens never fed at rollout, e.g. a response's last token) are routed natively.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction


class PartialRouterReplay(RouterReplay):
    """RouterReplay whose replay target may hold -1 rows, which take the router's own top-k."""

    def __init__(self):
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)  # driven per model, not globally

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.router_replay_action not in (RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD):
            return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)
        target = self.target_topk_idx.to(scores.device)
        if target.shape != (scores.shape[0], topk):
            raise ValueError(
                f"replayed routes {tuple(target.shape)} do not match {scores.shape[0]} tokens x top-{topk}"
            )
        native = (target < 0).any(-1)
        if native.any():
            _, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            target = torch.where(native[:, None], own, target)
        return scores.gather(1, target), target


def routers(model: torch.nn.Module) -> list[TopKRouter]:
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


class ModelRoutes:
    """Record / replay / off for every router of one LM chunk, in layer order. Routes are [T, layers, k] int64
    over the full (sequence-parallel gathered) pack."""

    def __init__(self, lm: torch.nn.Module):
        self.routers = routers(lm)
        if not self.routers:
            raise ValueError("routing replay needs an MoE LM (model.lm.num_experts > 0)")
        for router in self.routers:
            if not isinstance(router.router_replay, PartialRouterReplay):
                router.router_replay = PartialRouterReplay()
        self.topk = self.routers[0].topk
        self.sequence_parallel = self.routers[0].config.sequence_parallel

    def _set_action(self, action: RouterReplayAction | None) -> None:
        for router in self.routers:
            router.router_replay.router_replay_action = action

    def record(self) -> None:
        self.clear()
        self._set_action(RouterReplayAction.RECORD)

    def recorded(self) -> torch.Tensor:
        """[T, layers, k] of the last forward while recording."""
        per_layer = [r.router_replay.get_recorded_indices() for r in self.routers]
        if any(x is None for x in per_layer):
            raise RuntimeError("no routes recorded: call record() before the forward")
        routes = torch.stack([x.long() for x in per_layer], dim=1)
        if self.sequence_parallel:
            routes = tensor_parallel.gather_from_sequence_parallel_region(routes, tensor_parallel_output_grad=False)
        return routes

    def replay(self, routes: torch.Tensor) -> None:
        """routes [T, layers, k] for the next forwards (until clear()); -1 rows route natively."""
        if routes.dim() != 3 or routes.shape[1] != len(self.routers) or routes.shape[2] != self.topk:
            raise ValueError(
                f"routes of shape {tuple(routes.shape)}: expected [tokens, {len(self.routers)}, {self.topk}]"
            )
        if self.sequence_parallel:
            tp, rank = (
                parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank(),
            )
            routes = routes.chunk(tp, dim=0)[rank]
        self.clear()
        for layer, router in enumerate(self.routers):
            router.router_replay.target_topk_idx = routes[:, layer].contiguous()
        self._set_action(RouterReplayAction.REPLAY_FORWARD)

    def clear(self) -> None:
        """Back to native routing, nothing recorded or targeted (between rollout and training phases)."""
        for router in self.routers:
            router.router_replay.clear_indices()
        self._set_action(None)


@contextmanager
def micro_batch_replay(lm: torch.nn.Module, microbatches: list) -> Iterator[Callable[[object], None]]:
    """Yields `select(batch)`, called as each micro-batch's forward starts: replays its `routes` (or routes natively
    when it has none) until the next call; every route is cleared on exit. Megatron's no-pipelining schedule runs
    forward i, backward i, forward i + 1, ..., so micro-batch i's routes hold through its backward (recompute
    included). A no-op when no micro-batch carries routes."""
    if all(getattr(b, "routes", None) is None for b in microbatches):
        yield lambda batch: None
        return
    routes = ModelRoutes(lm)

    def select(batch) -> None:
        if getattr(batch, "routes", None) is None:
            routes.clear()
        else:
            routes.replay(batch.routes.long())

    try:
        yield select
    finally:
        routes.clear()
