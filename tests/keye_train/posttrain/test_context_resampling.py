"""ContextRL re-sampling in the RL data source, on the tiny model (1 rank, CPU) with a deterministic in-process
judge (rl_train_worker.ReportingJudge): all-negative groups are re-sampled after the judge's mistake report and
replaced by the new groups, which train on [conditioned prompt | response] with the log-probs of that context;
the counters add up, and the rollouts are a function of the data state (exact resume)."""

import pytest
import torch

from tests.keye_train.posttrain.rl_source import rl_overrides, rl_source

SEQ = 256  # the conditioned prompt (prompt, failed answer, report turn) is ~180 tokens of the tiny tokenizer
G = 4


@pytest.fixture(scope="module")
def setup(single_rank, tmp_path_factory):
    from data_pipeline.rl_demo import write_counting_prompts

    prompts = write_counting_prompts(tmp_path_factory.mktemp("ctxrl") / "prompts.jsonl", count=8)
    overrides = rl_overrides(
        prompts,
        SEQ,
        f"rl.group_size={G}",
        "rl.prompts_per_step=2",
        "rl.oversample_factor=1",
        "rl.recovered_samples=conditioned",
        "rl.judge=tests.keye_train.posttrain.rl_train_worker:reporting_judge",
        "rl.positive_threshold=1.0",  # even_fraction: a group is all-negative unless a response is all even ids
        f"rollout.capacity={SEQ}",
    )
    cfg, tokenizer, _, _, source = rl_source(overrides)
    calls = []  # (prompt ids, samples) of every generate call
    generate = source.rollout.generate

    def recording(prompts, params, group_size):
        out = generate(prompts, params, group_size)
        calls.append(([p.input_ids.tolist() for p in prompts], out.samples))
        return out

    source.rollout.generate = recording
    state = source.state_dict()
    packs = source.next_step()
    yield cfg, tokenizer, source, state, packs, calls, dict(source.last)
    source.close()


def documents(packs):
    """(pack, start, end) of every document that has supervised tokens."""
    out = []
    for pack in packs:
        bounds = pack.cu_seqlens.tolist()
        out += [(pack, a, b) for a, b in zip(bounds, bounds[1:]) if pack.loss_mask[a:b].sum() > 0]
    return out


def test_all_negative_groups_are_resampled_after_the_report_and_counted(setup):
    _, tokenizer, source, _, packs, calls, last = setup
    assert last["rl_groups_all_negative"] >= 1
    assert last["rl_groups_all_negative"] == (
        last["rl_resample_reports_unusable"] + last["rl_resample_too_long"] + last["rl_groups_resampled"]
    )
    assert last["rl_groups_resampled"] >= 1 and last["rl_recovered_kept"] >= 1
    assert last["rl_recovered_responses"] == G * last["rl_groups_resampled"]
    originals = [ids for prompts, _ in calls for ids in prompts if "reviewer" not in tokenizer.decode(ids)]
    conditioned = [ids for prompts, _ in calls for ids in prompts if "reviewer" in tokenizer.decode(ids)]
    assert len(conditioned) == last["rl_groups_resampled"]
    assert len(originals) == last["rl_groups_generated"]
    for ids in conditioned:  # an original prompt, a failed answer, the report as the next user turn
        assert any(ids[: len(o)] == o for o in originals)
        text = tokenizer.decode(ids)
        assert text.endswith(
            "count the marks one by one .\nPlease solve the problem again from the start, "
            "avoiding these mistakes.<|im_end|>\n<|im_start|>assistant\n"
        )
    # the batch: two groups of G responses, the re-sampled ones in place of the all-negative ones
    docs = documents(packs)
    assert len(docs) == 2 * G and sum(p.advantages.numel() for p in packs) == 2 * G
    recovered = [d for d in docs if "reviewer" in tokenizer.decode(d[0].input_ids[d[1] : d[2]].tolist())]
    assert len(recovered) == G * last["rl_recovered_kept"]


def test_recovered_responses_carry_the_log_probs_of_their_conditioned_context(setup):
    from keye_train.model.keye_vl import embed_inputs, lm_token_losses
    from keye_train.posttrain.batch import TextResponse, pack_text_responses

    cfg, tokenizer, source, _, packs, calls, _ = setup
    samples = {
        (tuple(prompt), tuple(s.tokens)): s
        for prompts, out in calls
        for i, prompt in enumerate(prompts)
        for s in out[i * G : (i + 1) * G]
    }
    lm, checked = source.model.parts.lm, 0
    for pack, a, b in documents(packs):
        ids = pack.input_ids[a:b].tolist()
        mask = pack.loss_mask[a:b] > 0
        first = int(mask.nonzero()[0]) + 1  # the response starts after the first supervised position
        prompt, response = ids[:first], ids[first:]
        if "reviewer" not in tokenizer.decode(prompt):
            continue
        sample = samples[(tuple(prompt), tuple(response))]  # sampled by the engine in exactly this context
        rollout = pack.rollout_logp[a:b][mask]
        assert torch.equal(rollout, torch.tensor(sample.logprobs, dtype=torch.float32))
        assert (pack.old_logp[a:b][mask] - rollout).abs().max() < 1e-4  # the trainer's recompute agrees
        # the same response after the original prompt alone has other log-probs: the context is the report's
        original = next(o for o in (p for ps, _ in calls for p in ps) if prompt[: len(o)] == o and o != prompt)
        alone = pack_text_responses([TextResponse(original, response, 0.0)], cfg.train.seq_length, tokenizer.ids.pad)
        with torch.no_grad():
            lm.eval()
            logp = -lm_token_losses(lm, alone, embed_inputs(lm, None, alone, tokenizer.ids, False)).view(-1)
            lm.train()
        assert (logp[alone.loss_mask > 0] - rollout).abs().max() > 1e-3
        checked += 1
    assert checked >= 1


def test_the_sampling_and_resampling_are_a_function_of_the_data_state(setup):
    _, _, source, state, _, calls, _ = setup
    first, recovery, after = list(calls), dict(source.recovery), source.state_dict()
    source.load_state_dict(state)  # a resume at this step (no weight change in between)
    source.recovery = {}
    source._collect()  # the step's rollouts (original and conditioned): packing and pi_old follow from them
    source.rollout.release()
    again = calls[len(first) :]
    assert source.state_dict()["drawn"] == after["drawn"] and source.recovery == recovery
    assert [prompts for prompts, _ in again] == [prompts for prompts, _ in first]
    for (_, a), (_, b) in zip(first, again):
        assert [(s.tokens, s.logprobs) for s in a] == [(s.tokens, s.logprobs) for s in b]
