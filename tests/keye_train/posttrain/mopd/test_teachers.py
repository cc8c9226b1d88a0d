"""MOPD teachers: routing sends each tagged sample to its teacher, teachers sharing weights share one instance,
each instance loads once per step, and an in-process teacher ignores the student's routing replay."""

import pytest
import torch

from keye_train.config.mopd import MOPDConfig, RouteConfig, TeacherConfig
from keye_train.posttrain.mopd.teachers import InProcessTeacher, RoutingTable, SampleTags, TeacherPool

TEACHERS = [
    TeacherConfig("math", "tiny", "/ckpt/math"),
    TeacherConfig("ocr", "tiny", "/ckpt/vision"),
    TeacherConfig("grounding", "tiny", "/ckpt/vision"),  # the same weights as ocr: one instance
    TeacherConfig("general", "tiny", "/ckpt/sft"),
]
ROUTES = [
    RouteConfig("math", "text", "math"),
    RouteConfig("ocr", "image", "ocr"),
    RouteConfig("grounding", "*", "grounding"),
    RouteConfig("math", "image", "math"),
]


def test_routing_sends_each_tagged_sample_to_its_teacher():
    table = RoutingTable(ROUTES, "general")
    tags = [
        SampleTags("text", "math"),
        SampleTags("image", "ocr"),
        SampleTags("video", "grounding"),
        SampleTags("image", "math"),
        SampleTags("video", "counting"),
        SampleTags("text", "ocr"),
    ]
    assert table.assign(tags) == ["math", "ocr", "grounding", "math", "general", "general"]
    with pytest.raises(KeyError, match="modality='video' task='counting'"):
        RoutingTable(ROUTES).teacher_for(SampleTags("video", "counting"))


def test_the_config_names_a_wrong_route_or_teacher():
    with pytest.raises(ValueError, match=r"mopd.routes\[0\].teacher='nope'"):
        MOPDConfig(teachers=TEACHERS, routes=[RouteConfig("nope")])
    with pytest.raises(ValueError, match=r"mopd.teachers\[1\].name='math' is given twice"):
        MOPDConfig(teachers=[TEACHERS[0], TEACHERS[0]])
    with pytest.raises(ValueError, match="mopd.default_teacher='x'"):
        MOPDConfig(teachers=TEACHERS, default_teacher="x")
    with pytest.raises(ValueError, match="mopd.category_weights.style"):
        MOPDConfig(category_weights={"style": 1.0})


def test_each_instance_loads_once_per_step_and_shared_weights_share_it():
    loaded = []

    def loader(config):
        loaded.append(config.checkpoint)
        return f"model@{config.checkpoint}"

    pool = TeacherPool(TEACHERS, loader, resident=1)
    table = RoutingTable(ROUTES, "general")
    tags = [
        SampleTags("image", "ocr"),
        SampleTags("text", "math"),
        SampleTags("video", "grounding"),
        SampleTags("text", "math"),
        SampleTags("image", "ocr"),
        SampleTags("text", "chat"),
    ]
    seen = {}
    result = pool.score(table.assign(tags), lambda model, name, idx: seen.setdefault(name, (model, idx)))
    assert seen == {
        "ocr": ("model@/ckpt/vision", [0, 4]),
        "grounding": ("model@/ckpt/vision", [2]),  # scored on the ocr instance, right after it
        "math": ("model@/ckpt/math", [1, 3]),
        "general": ("model@/ckpt/sft", [5]),
    }
    assert list(result) == ["ocr", "grounding", "math", "general"]
    assert loaded == ["/ckpt/vision", "/ckpt/math", "/ckpt/sft"] and pool.loads == 3
    assert len(pool.loaded) == 1  # one resident at a time
    big = TeacherPool(TEACHERS, loader, resident=3)
    big.score(table.assign(tags), lambda *a: None)
    big.score(table.assign(tags), lambda *a: None)
    assert big.loads == 3  # a second step reloads nothing when all fit


def test_an_in_process_teacher_does_not_share_the_students_routing_replay(single_rank):
    from data_pipeline.batch import PackedBatch
    from keye_train.posttrain.rollout import ModelRoutes
    from keye_train.posttrain.rollout.routing import routers
    from tests.keye_train.posttrain.rollout.common import TOKENS, build_parts, full_logits, text_prompt

    model = single_rank
    student = build_parts(model, seed=41)
    teacher_parts = build_parts(model, seed=41)  # the same weights, a separate model
    prompt = text_prompt(9, 5)
    n = prompt.input_ids.numel()
    batch = PackedBatch(
        input_ids=prompt.input_ids,
        labels=torch.zeros(n, dtype=torch.long),
        loss_mask=torch.zeros(n),
        position_ids=torch.arange(n).expand(3, -1).clone(),
        cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
    )
    native = full_logits(teacher_parts, batch)
    teacher = InProcessTeacher("same", teacher_parts, TOKENS)
    assert teacher.routers == model.lm.num_layers
    student_routes = ModelRoutes(student.lm)
    k = model.lm.moe_topk
    forced = torch.stack([torch.randperm(model.lm.num_experts)[:k] for _ in range(n * model.lm.num_layers)])
    student_routes.replay(forced.view(n, model.lm.num_layers, k))
    assert (full_logits(student, batch) - native).abs().max() > 1e-3  # the student is steered
    shared = {id(r.router_replay) for r in routers(student.lm)} & {
        id(r.router_replay) for r in routers(teacher_parts.lm)
    }
    assert not shared
    torch.testing.assert_close(teacher.logits(batch), native, rtol=0, atol=1e-6)  # the teacher is not
    assert not any(p.requires_grad for p in teacher_parts.lm.parameters())
    student_routes.clear()


def test_a_teacher_loads_from_our_checkpoint_format(single_rank, tmp_path):
    from data_pipeline.batch import PackedBatch
    from keye_train import checkpoint
    from keye_train.config import ParallelConfig
    from keye_train.posttrain.mopd.teachers import load_in_process_teacher
    from parallel.placement import ColocatedPlacement
    from tests.keye_train.posttrain.rollout.common import TOKENS, build_parts, full_logits

    model = single_rank
    source = build_parts(model, seed=61)
    layout = {"tp": 1}
    checkpoint.save(tmp_path / "run", 3, source, None, {"step": 3}, layout, keep_last=1)
    config = TeacherConfig("sft", "tiny", str(tmp_path / "run"))  # a run directory: its latest checkpoint
    teacher = load_in_process_teacher(
        config, ParallelConfig(), ColocatedPlacement(), torch.float32, False, layout, TOKENS
    )
    n = 7
    batch = PackedBatch(
        torch.arange(3, 3 + n),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n),
        torch.arange(n).expand(3, -1).clone(),
        torch.tensor([0, n], dtype=torch.int32),
    )
    torch.testing.assert_close(teacher.logits(batch), full_logits(source, batch), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"mopd.teachers\[sft\].model='huge'"):
        load_in_process_teacher(
            TeacherConfig("sft", "huge", "x"),
            ParallelConfig(),
            ColocatedPlacement(),
            torch.float32,
            False,
            layout,
            TOKENS,
        )
