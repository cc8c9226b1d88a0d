"""The static decode step (what the CUDA graph captures) against the eager engine and the uncached training
forward: the sync-free experts equal megatron's dispatcher + grouped experts, and decoding through the static
step gives the same logits (fp32, 1e-5) and greedy tokens. On CUDA, the captured graph equals the same step run
eagerly."""

import dataclasses

import pytest
import torch

from keye_train.config import ParallelConfig
from keye_train.posttrain.rollout import RolloutEngine, SamplingParams
from keye_train.posttrain.rollout.graphs import graph_unsupported
from tests.keye_train.posttrain.rollout.common import (
    TOKENS,
    assert_matches_full_forward,
    build_parts,
    text_prompt,
    video_prompt,
    with_dsa,
)

GREEDY = SamplingParams(temperature=0, max_new_tokens=6)


def grouped(model):
    return dataclasses.replace(model, lm=dataclasses.replace(model.lm, experts_impl="grouped"))


@pytest.fixture(scope="module")
def grouped_parts(single_rank):
    model = grouped(single_rank)
    return model, build_parts(model)


def engine(model, parts, **options):
    options = {"slots": 4, "capacity": 96, "prefill_tokens": 64, "keep_logits": True, **options}
    return RolloutEngine(parts, model, TOKENS, **options)


@pytest.mark.parametrize("kernel", ["torch", "triton"])  # triton: kernels/moe_decode.py (interpreted on CPU)
def test_sync_free_experts_equal_the_dispatcher_path(grouped_parts, kernel):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from keye_train.model.experts import sync_free_experts

    _, parts = grouped_parts
    layer = next(m for m in parts.lm.modules() if isinstance(m, MoELayer))
    device = layer.router.weight.device
    g = torch.Generator(device).manual_seed(3)
    for tokens in (3, 40):  # 3 tokens x top-k leave most experts empty
        hidden = torch.randn(tokens, 1, layer.config.hidden_size, generator=g, device=device)
        with torch.no_grad():
            reference, _ = layer(hidden)
            probs, routing_map = layer.route(hidden)
            ours = sync_free_experts(hidden.view(tokens, -1), probs, routing_map, layer.experts, kernel)
        torch.testing.assert_close(ours.view_as(reference), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ahead", [False, True], ids=["step_by_step", "queued_ahead"])
def test_static_decode_step_matches_the_full_forward(grouped_parts, ahead):
    """Step by step, and with the steps queued ahead (rollout/ahead.py): there a stop id sampled at step t drops
    the row queued for t + 1. Either way the slots a stop frees admit the waiting prompts."""
    model, parts = grouped_parts
    prompts = [text_prompt(n, seed) for seed, n in enumerate([5, 19, 12, 1, 8])]
    eager = engine(model, parts, slots=3, prefill_tokens=7, decode_graph="off").generate(prompts, GREEDY)
    stop = eager[4].tokens[2]  # prompt 4 runs in the decode-only steps at the end
    static = engine(model, parts, slots=3, prefill_tokens=7, decode_graph="static", decode_ahead=ahead)
    samples = static.generate(prompts, dataclasses.replace(GREEDY, stop_ids=(stop,)))  # slot reuse, chunked prefill
    assert static.graph_off_reason == "" and static.times.graph_steps > 0
    assert (static.times.dropped_rows > 0) == ahead
    assert_matches_full_forward(parts, prompts, samples)
    expected = [s.tokens[: s.tokens.index(stop) + 1] if stop in s.tokens else s.tokens for s in eager]
    assert [s.tokens for s in samples] == expected
    assert [s.finish_reason for s in samples] == ["stop" if stop in s.tokens else "length" for s in eager]
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=5)
    forked = engine(model, parts, slots=4, decode_graph="static", decode_ahead=ahead).generate(
        prompts[:2], params, group_size=2
    )
    assert_matches_full_forward(parts, prompts[:2], forked, group_size=2, greedy=False)


def test_static_decode_step_with_dsa_warmup_and_video(single_rank):
    model = with_dsa(grouped(single_rank), "warmup")
    parts = build_parts(model)
    prompts = [video_prompt(2, (4, 4), 1), text_prompt(6, 2)]
    rollout = engine(model, parts, decode_graph="static", decode_ahead=True)
    samples = rollout.generate(prompts, GREEDY)
    assert rollout.graph_off_reason == "" and rollout.times.graph_steps > 0
    assert_matches_full_forward(parts, prompts, samples)


def test_layouts_the_static_step_does_not_cover_run_eagerly(single_rank, grouped_parts):
    sequential = engine(single_rank, build_parts(single_rank), decode_graph="static")
    assert "not grouped" in graph_unsupported(sequential)
    model, parts = grouped_parts
    assert "record_routes" in graph_unsupported(engine(model, parts, record_routes=True))
    sparse = with_dsa(grouped(single_rank), "sparse", topk=4)
    assert "sparse" in graph_unsupported(engine(sparse, build_parts(sparse)))
    on_cpu = engine(model, parts)  # auto: no capture off CUDA, and fp32 has no grouped kernel there
    assert graph_unsupported(on_cpu, capture=False) is None
    with pytest.raises(ValueError, match="rollout.decode_graph"):
        engine(model, parts, decode_graph="always")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_graph_equals_the_static_step_on_cuda(single_rank):
    from keye_train.model.builder import build_model, initialize_weights
    from parallel.placement import ColocatedPlacement

    model = grouped(single_rank)
    parts = build_model(model, ParallelConfig(), torch.bfloat16, True, ColocatedPlacement())
    initialize_weights(parts, model, seed=11)
    prompts = [text_prompt(n, seed) for seed, n in enumerate([5, 19, 12, 1, 8])]
    runs = {}
    for name, mode, ahead in (
        ("auto", "auto", False),
        ("ahead", "auto", True),
        ("static", "static", False),
        ("off", "off", False),
    ):
        rollout = engine(model, parts, slots=3, prefill_tokens=7, decode_graph=mode, decode_ahead=ahead)
        runs[name] = rollout.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
        if mode == "auto":
            assert rollout.graph_off_reason == "" and rollout.decode_step.graph is not None
    for graphed, ahead, static in zip(runs["auto"], runs["ahead"], runs["static"]):
        assert graphed.tokens == static.tokens == ahead.tokens
        torch.testing.assert_close(torch.stack(graphed.logits), torch.stack(static.logits), rtol=0, atol=0)
        torch.testing.assert_close(torch.stack(ahead.logits), torch.stack(static.logits), rtol=0, atol=0)
    for graphed, eager in zip(runs["auto"], runs["off"]):  # different kernels: the first logits agree in bf16
        torch.testing.assert_close(graphed.logits[0], eager.logits[0], rtol=0, atol=5e-2)
