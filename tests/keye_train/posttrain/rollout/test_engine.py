"""Cached decode equals the uncached training forward at every step (fp32, logits within 1e-5): ragged prompts,
chunked prefill, slot reuse, group fork, DSA warm-up and sparse, image and video prompts; rollout log-probs equal
the trainer's recompute before and after an optimizer step; stop ids, max_new_tokens, finish reasons."""

import dataclasses

import pytest
import torch

from keye_train.posttrain.rollout import RolloutEngine, SamplingParams
from tests.keye_train.posttrain.rollout.common import (
    TOKENS,
    assert_matches_full_forward,
    build_parts,
    full_logits,
    image_prompt,
    response_logits,
    text_prompt,
    video_prompt,
    with_dsa,
)

GREEDY = SamplingParams(temperature=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def dense(single_rank):
    return single_rank, build_parts(single_rank)


def engine(model, parts, **options):
    options = {"slots": 4, "capacity": 96, "prefill_tokens": 64, "keep_logits": True, **options}
    return RolloutEngine(parts, model, TOKENS, **options)


def test_ragged_prompts_chunked_prefill_and_slot_reuse(dense):
    model, parts = dense
    prompts = [text_prompt(n, seed) for seed, n in enumerate([5, 19, 12, 1])]
    rollout = engine(model, parts, slots=2, prefill_tokens=7)  # 4 prompts through 2 slots, prompts in chunks of <= 7
    samples = rollout.generate(prompts, GREEDY)
    assert_matches_full_forward(parts, prompts, samples)
    assert [s.finish_reason for s in samples] == ["length"] * 4 and all(len(s.tokens) == 6 for s in samples)
    # every prompt token was prefilled once and the steps mixed prefill chunks with decode tokens
    assert rollout.times.prefill_tokens == 37 and rollout.times.decode_tokens == 4 * 5
    # the engine (and its cache) is reused: a second call gives the same tokens, also after a release
    again = rollout.generate(prompts[::-1], GREEDY)
    assert [s.tokens for s in again] == [s.tokens for s in samples[::-1]]
    rollout.release()
    assert rollout.cache is None
    assert [s.tokens for s in rollout.generate(prompts[:1], GREEDY)] == [samples[0].tokens]


def test_group_fork_shares_the_prefill_and_each_member_samples_its_own(dense):
    model, parts = dense
    prompts = [text_prompt(9, 3), text_prompt(14, 4)]
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=5, seed=17)
    rollout = engine(model, parts, slots=5)  # room for one group of 3 at a time beside the other's leftovers
    samples = rollout.generate(prompts, params, group_size=3)
    assert [(s.prompt, s.member) for s in samples] == [(p, m) for p in range(2) for m in range(3)]
    assert rollout.times.prefill_tokens == 9 + 14  # one prefill per group
    assert_matches_full_forward(parts, prompts, samples, group_size=3, greedy=False)
    for group in (samples[:3], samples[3:]):
        assert all(torch.equal(s.logits[0], group[0].logits[0]) for s in group)  # the shared prompt logits
        assert len({tuple(s.tokens) for s in group}) > 1  # different seeds, different responses
    repeat = rollout.generate(prompts, params, group_size=3)
    assert [s.tokens for s in repeat] == [s.tokens for s in samples]


def test_stop_ids_end_a_response_and_max_new_tokens_zero_is_empty(dense):
    model, parts = dense
    prompts = [text_prompt(7, 8), text_prompt(4, 9)]
    rollout = engine(model, parts)
    free_run = rollout.generate(prompts, GREEDY)
    stop = free_run[0].tokens[2]
    stopped = rollout.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6, stop_ids=(stop,)))
    assert stopped[0].tokens == free_run[0].tokens[:3] and stopped[0].finish_reason == "stop"
    cut = free_run[1].tokens.index(stop) + 1 if stop in free_run[1].tokens else 6
    assert stopped[1].tokens == free_run[1].tokens[:cut]
    empty = rollout.generate(prompts[:1], SamplingParams(max_new_tokens=0))
    assert empty[0].tokens == [] and empty[0].finish_reason == "length"


def test_a_sequence_over_the_capacity_is_refused_by_key(dense):
    model, parts = dense
    with pytest.raises(ValueError, match="rollout.capacity=16"):
        engine(model, parts, capacity=16).generate([text_prompt(10, 0)], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="rollout.group_size=5"):
        engine(model, parts).generate([text_prompt(3, 0)], GREEDY, group_size=5)


def test_image_and_video_prompts(dense):
    model, parts = dense
    prompts = [image_prompt([[4, 4], [2, 4]], seed=1), video_prompt(3, [4, 4], seed=2), text_prompt(6, 5)]
    samples = engine(model, parts, prefill_tokens=9).generate(prompts, GREEDY)
    assert_matches_full_forward(parts, prompts, samples)
    # the pictures matter: other pixels, other logits
    other = image_prompt([[4, 4], [2, 4]], seed=1)
    other.visual.patches.add_(1.0)
    changed = engine(model, parts).generate([other], GREEDY)[0]
    assert not torch.allclose(torch.stack(changed.logits), torch.stack(samples[0].logits))


def test_dsa_warmup_and_sparse_decode_equal_their_full_forwards(single_rank, monkeypatch):
    from keye_train.posttrain.rollout import cache as cache_module

    calls = []
    topk_cached = cache_module.dsa_ops.indexer_topk_cached

    def counted(index_q, index_w, index_k, first_position, topk, **options):
        calls.append(first_position + index_q.shape[0])
        return topk_cached(index_q, index_w, index_k, first_position, topk, **options)

    monkeypatch.setattr(cache_module.dsa_ops, "indexer_topk_cached", counted)
    prompts = [text_prompt(13, 1), text_prompt(5, 2), image_prompt([[4, 4]], seed=3, before=2, after=2)]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    runs = {}
    for mode in ("warmup", "sparse"):
        model = with_dsa(single_rank, mode, topk=8)  # contexts grow to 24 rows: the top-8 selection is real
        parts = build_parts(model, seed=5)  # the same weights in both modes
        calls.clear()
        runs[mode] = engine(model, parts, prefill_tokens=6).generate(prompts, params)
        assert_matches_full_forward(parts, prompts, runs[mode])
        if mode == "sparse":  # sparse attention over selected cache rows once a context passes k
            assert calls and max(calls) == 13 + 11 and min(calls) > 8
        else:
            assert not calls
    # the selection changes the result: sparse and dense logits part once contexts exceed k
    first = lambda mode: torch.stack(runs[mode][0].logits)  # noqa: E731
    assert (first("sparse") - first("warmup")).abs().max() > 1e-3


def test_rollout_logprobs_equal_the_trainer_recompute_before_and_after_an_optimizer_step(single_rank):
    from keye_train.posttrain.rollout import sample_batch

    model = single_rank
    parts = build_parts(model, seed=23)
    prompts = [text_prompt(8, 1), image_prompt([[2, 4]], seed=2)]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=6, seed=4)
    rollout = engine(model, parts, keep_logits=False)

    def check(samples):
        for s in samples:
            batch = sample_batch(prompts[s.prompt], s, TOKENS)
            logits = full_logits(parts, batch)[batch.loss_mask.bool()]  # rows that predict response tokens
            recompute = torch.log_softmax(logits / params.temperature, -1).gather(1, torch.tensor(s.tokens)[:, None])
            torch.testing.assert_close(torch.tensor(s.logprobs), recompute[:, 0], rtol=0, atol=1e-5)

    before = rollout.generate(prompts, params, group_size=2)
    check(before)
    # one SGD step on the sampled responses' cross-entropy: the rollout sees the new weights at once
    parts.lm.train()
    loss = 0
    for s in before:
        batch = sample_batch(prompts[s.prompt], s, TOKENS)
        from keye_train.model.keye_vl import embed_inputs, lm_token_losses

        embeds = embed_inputs(parts.lm, parts.vision, batch, TOKENS, sequence_parallel=False)
        per_token = lm_token_losses(parts.lm, batch, embeds)
        loss = loss + (per_token[0] * batch.loss_mask).sum()
    loss.backward()
    with torch.no_grad():
        for module in parts.modules():
            for p in module.parameters():
                if p.grad is not None:
                    p.sub_(0.05 * p.grad)
                    p.grad = None
    after = rollout.generate(prompts, params, group_size=2)
    check(after)
    assert after[0].logprobs != before[0].logprobs


def test_training_forwards_are_unchanged_without_a_cache(dense):
    """The hook is inert when KeyePackedSeqParams.kv_cache is None: same logits as a PackedSeqParams forward."""
    from megatron.core.packed_seq_params import PackedSeqParams

    model, parts = dense
    prompt = text_prompt(11, 6)
    sample = engine(model, parts).generate([prompt], GREEDY)[0]
    keye = response_logits(parts, prompt, sample)
    ids = torch.cat([prompt.input_ids, torch.tensor(sample.tokens)])
    cu = torch.tensor([0, ids.numel()], dtype=torch.int32)
    plain = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=17, max_seqlen_kv=17)
    with torch.no_grad():
        logits = parts.lm(
            input_ids=ids.view(1, -1),
            position_ids=torch.arange(ids.numel()).expand(3, 1, -1),
            attention_mask=None,
            packed_seq_params=plain,
        )[0]
    assert torch.equal(logits[10:16], keye)


def test_a_rollout_from_config_uses_its_sampling_and_group_size(dense):
    from keye_train.config.rollout import RolloutConfig, SamplingConfig
    from keye_train.posttrain.rollout import Rollout

    model, parts = dense
    cfg = RolloutConfig(slots=4, capacity=32, group_size=2, sampling=SamplingConfig(temperature=0, max_new_tokens=3))
    rollout = Rollout.from_config(parts, model, cfg, TOKENS)
    assert not rollout.engine.decode_ahead
    assert Rollout.from_config(parts, model, dataclasses.replace(cfg, decode_ahead=True)).engine.decode_ahead
    prompts = [text_prompt(5, 1)]
    batch = rollout.generate(prompts)
    assert len(batch.samples) == 2 and [len(t) for t in batch.tokens] == [3, 3]
    assert batch.tokens[0].tolist() == batch.tokens[1].tolist()  # greedy members agree
    assert batch.tokens[0].tolist() == engine(model, parts).generate(prompts, GREEDY)[0].tokens[:3]
    rollout.release()
    assert rollout.engine.cache is None
