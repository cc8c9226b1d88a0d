"""MOPD teachers: routing samples to teachers by their (modality, task) tags, one instance per distinct weights, and
forward-only scoring grouped by teacher so each is loaded once per step.

Placement (mopd.placement) and its memory trade-off, for T distinct teachers of W bytes of weights each:
- in_process (built): teachers run forward-only on the student's own ranks and layout, one resident at a time
  (`TeacherPool(resident=1)`): peak extra GPU memory is one teacher's W / (TP * PP * EP shards) plus its
  activations for the largest scored pack (no optimizer state, no gradients); each step reads each routed
  teacher's checkpoint once (T loads per step, from page cache or local disk). `resident=T` trades T * W of memory
  for no reloads. Thirteen 30B teachers do not fit resident on one node (13 x 61 GB in bf16).
- off_rank (not built): teachers on their own ranks serve log-probs over the network: no student memory at all,
  but T * W / (their TP) of dedicated GPUs and a transfer of [R, k] top-k log-probs per response.
- host_stream (not built): all teachers' weights pinned in host memory (T * W of host RAM per node; 13 x 61 GB
  = 0.8 TB), streamed layer by layer to the GPU for each forward: one layer's W / L resident, paid in PCIe
  bandwidth (~W / 25 GB/s per teacher per step).

Teachers never share the student's RouterReplay state: every MoE router of a teacher gets its own replay object
outside megatron's global list, set to native routing (`isolate_routers`), so replaying the student's routes
(R3) cannot steer a teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleTags:
    modality: str  # e.g. "text", "image", "video"
    task: str  # e.g. "math", "ocr", "grounding"


class RoutingTable:
    """mopd.routes in order, the first matching rule wins; "*" matches any tag; else mopd.default_teacher."""

    def __init__(self, routes: Sequence, default_teacher: str = ""):
        self.routes, self.default = list(routes), default_teacher

    def teacher_for(self, tags: SampleTags) -> str:
        for route in self.routes:
            if route.modality in ("*", tags.modality) and route.task in ("*", tags.task):
                return route.teacher
        if not self.default:
            raise KeyError(
                f"no mopd.routes entry matches modality={tags.modality!r} task={tags.task!r} and "
                "mopd.default_teacher is empty"
            )
        return self.default

    def assign(self, tags: Sequence[SampleTags]) -> list[str]:
        return [self.teacher_for(t) for t in tags]


def weights_key(teacher) -> tuple[str, str, str]:
    """What makes two teachers the same instance: the model preset, the checkpoint and its format."""
    return (teacher.model, str(teacher.checkpoint), str(teacher.format))


def group_by_instance(assigned: Sequence[str], teachers: Sequence) -> dict[tuple, dict[str, list[int]]]:
    """{weights key: {teacher name: [sample indices]}}, keys in first-use order (the load order of a step)."""
    by_name = {t.name: t for t in teachers}
    groups: dict[tuple, dict[str, list[int]]] = {}
    for i, name in enumerate(assigned):
        if name not in by_name:
            raise KeyError(f"teacher {name!r} is not in mopd.teachers: {list(by_name)}")
        groups.setdefault(weights_key(by_name[name]), {}).setdefault(name, []).append(i)
    return groups


class TeacherPool:
    """Loads teachers through `loader(teacher_config) -> scorer` and keeps at most `resident` instances (least
    recently used goes first). `score(assigned, score_fn)` runs score_fn(scorer, teacher_name, indices) for each
    routed teacher, grouped so each instance is loaded at most once per call."""

    def __init__(self, teachers: Sequence, loader: Callable, resident: int = 1):
        if resident < 1:
            raise ValueError(f"TeacherPool resident={resident} must be >= 1")
        self.teachers, self.loader, self.resident = list(teachers), loader, resident
        self.loaded: dict[tuple, object] = {}
        self.loads = 0  # instances loaded so far (a test and the step metrics read it)

    def instance(self, name: str):
        config = next((t for t in self.teachers if t.name == name), None)
        if config is None:
            raise KeyError(f"teacher {name!r} is not in mopd.teachers: {[t.name for t in self.teachers]}")
        key = weights_key(config)
        if key in self.loaded:
            self.loaded[key] = self.loaded.pop(key)  # most recently used last
            return self.loaded[key]
        while len(self.loaded) >= self.resident:
            self.loaded.pop(next(iter(self.loaded)))  # release before loading: one resident at a time
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.loaded[key] = self.loader(config)
        self.loads += 1
        return self.loaded[key]

    def score(self, assigned: Sequence[str], score_fn: Callable) -> dict[str, object]:
        """{teacher name: score_fn's result}; teachers sharing weights run on one instance, back to back."""
        out = {}
        for names in group_by_instance(assigned, self.teachers).values():
            for name, indices in names.items():
                out[name] = score_fn(self.instance(name), name, indices)
        return out


def isolate_routers(lm: torch.nn.Module) -> int:
    """Give each MoE router of a teacher LM its own replay object, outside megatron's global list, with native
    routing. Returns the number of routers (0 for a dense LM)."""
    from keye_train.posttrain.rollout.routing import ModelRoutes, routers

    if not routers(lm):
        return 0
    routes = ModelRoutes(lm)  # installs a PartialRouterReplay per router, taken out of megatron's global list
    routes.clear()
    for router in routes.routers:
        router.router_replay.router_replay_action = None  # native routing: neither record nor replay
    return len(routes.routers)


class InProcessTeacher:
    """A teacher's parts on this rank (PP = 1: the logits come from the one chunk), scored forward-only."""

    def __init__(self, name: str, parts, tokens, sequence_parallel: bool = False):
        self.name, self.parts, self.tokens, self.sequence_parallel = name, parts, tokens, sequence_parallel
        for module in parts.modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        self.routers = isolate_routers(parts.lm)

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        """[S, V_local] logits of the packed batch (this rank's vocab shard under TP)."""
        return forward_logits(self.parts, batch, self.tokens, self.sequence_parallel)


def forward_logits(parts, batch, tokens, sequence_parallel: bool) -> torch.Tensor:
    """[S, V_local] logits of a packed batch through a model's parts (PP = 1); the caller picks no_grad / eval."""
    from keye_train.model.keye_vl import embed_inputs, packed_params

    lm = parts.lm
    decoder_input = embed_inputs(lm, parts.vision, batch, tokens, sequence_parallel)
    out = lm(
        input_ids=batch.input_ids.view(1, -1),
        position_ids=batch.position_ids.view(3, 1, -1),
        attention_mask=None,
        decoder_input=decoder_input,
        labels=None,
        packed_seq_params=packed_params(batch),
    )
    return out.reshape(-1, out.shape[-1])


def load_in_process_teacher(
    teacher, par, placement, dtype: torch.dtype, on_gpu: bool, layout: dict, tokens, student_model=None
):
    """A `TeacherPool` loader body: build the teacher's preset (model "student": `student_model`, the student's
    model config) under the student's layout and read its weights, ours (checkpoint.load_weights, the same layout)
    or HF (convert.import_hf)."""
    import copy

    from keye_train.checkpoint.store import load_weights
    from keye_train.config.model import MODEL_PRESETS
    from keye_train.model.builder import build_model

    if placement.pipeline_size() > 1:
        raise ValueError("in-process MOPD teachers need parallel.pp=1 (their logits come from one chunk)")
    if teacher.model == "student" and student_model is not None:
        model = copy.deepcopy(student_model)
    elif teacher.model in MODEL_PRESETS:
        model = MODEL_PRESETS[teacher.model]()
    else:
        raise ValueError(
            f"mopd.teachers[{teacher.name}].model={teacher.model!r} is not a preset: {list(MODEL_PRESETS)} or 'student'"
        )
    parts = build_model(model, par, dtype, on_gpu, placement)
    if str(teacher.format) == "hf":
        from keye_train.convert.importer import import_hf

        import_hf(parts, model, teacher.checkpoint)
    else:
        load_weights(teacher.checkpoint, parts, layout)
    sequence_parallel = par.sequence_parallel if par.sequence_parallel is not None else par.tp > 1
    return InProcessTeacher(teacher.name, parts, tokens, bool(sequence_parallel))
