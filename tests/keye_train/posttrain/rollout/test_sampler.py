"""The sampler draws from the filtered, temperature-scaled distribution (chi-square on a 16-token vocab) and
reports log-probs of the unfiltered scaled one."""

import math

import pytest
import torch

from keye_train.posttrain.rollout.sampler import SamplingParams, sample

# chi-square critical values at alpha = 0.001 by degrees of freedom (standard table)
CHI2_999 = {
    1: 10.828,
    2: 13.816,
    3: 16.266,
    4: 18.467,
    5: 20.515,
    6: 22.458,
    7: 24.322,
    8: 26.124,
    9: 27.877,
    10: 29.588,
    11: 31.264,
    12: 32.909,
    13: 34.528,
    14: 36.123,
    15: 37.697,
}
VOCAB, DRAWS = 16, 6000


def logits16():
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) * 1.5


def expected_probs(logits, temperature, top_k, top_p):
    """By hand in float64: scale, keep the top_k largest, renormalise, keep the descending prefix whose mass
    before each token is < top_p, renormalise."""
    z = [float(x) / temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    kept = order[:top_k] if top_k else order
    weights = {i: math.exp(z[i] - z[kept[0]]) for i in kept}
    total = sum(weights.values())
    probs, mass = {}, 0.0
    for i in kept:
        if mass >= top_p:
            break
        probs[i] = weights[i] / total
        mass += probs[i]
    norm = sum(probs.values())
    return [probs.get(i, 0.0) / norm for i in range(len(z))]


def draw_counts(logits, params, draws=DRAWS):
    generator = params.generator(0, "cpu")
    tokens, logprobs = sample(logits.expand(draws, -1), [params] * draws, [generator] * draws)
    return torch.bincount(tokens, minlength=VOCAB).tolist(), tokens, logprobs


def chi_square(counts, probs):
    draws = sum(counts)
    cells = [(c, p * draws) for c, p in zip(counts, probs) if p > 0]
    return sum((c - e) ** 2 / e for c, e in cells), len(cells) - 1


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.75), (0.9, 8, 0.8), (2.0, 3, 0.9)]
)
def test_sampled_frequencies_pass_a_chi_square_test(temperature, top_k, top_p):
    logits = logits16()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=123)
    counts, tokens, logprobs = draw_counts(logits, params)
    probs = expected_probs(logits.tolist(), temperature, top_k, top_p)
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0)  # nothing outside the filter
    statistic, dof = chi_square(counts, probs)
    assert dof >= 1 and statistic < CHI2_999[dof], (statistic, dof, counts)
    # the log-probs are those of the unfiltered scaled distribution, computed in float64
    full = torch.log_softmax(logits.double() / temperature, dim=0)
    torch.testing.assert_close(logprobs.double(), full[tokens], rtol=0, atol=1e-6)


def test_the_chi_square_test_rejects_a_wrong_temperature():
    logits = logits16()
    counts, _, _ = draw_counts(logits, SamplingParams(temperature=0.7, seed=123))
    statistic, dof = chi_square(counts, expected_probs(logits.tolist(), 1.0, 0, 1.0))
    assert statistic > CHI2_999[dof]


def test_greedy_is_the_argmax_with_the_unscaled_logprob():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    tokens, logprobs = sample(logits, [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


def test_a_seed_fixes_the_draws_and_members_differ():
    logits = logits16()
    params = SamplingParams(temperature=1.0, seed=9)
    draw = lambda member: sample(logits.expand(64, -1), [params] * 64, [params.generator(member, "cpu")] * 64)[0]  # noqa: E731
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


@pytest.mark.parametrize(
    "key,value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", -2)],
)
def test_bad_params_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"sampling.{key}="):
        SamplingParams(**{key: value})


def test_the_two_level_inverse_cdf_is_a_full_float64_search():
    from keye_train.posttrain.rollout.sampler import inverse_cdf

    g = torch.Generator().manual_seed(2)
    probs = torch.rand(64, 3000, generator=g) ** 4
    probs[:, 1000:1100] = 0  # zero-probability runs across a block edge
    probs[5, :] = 0
    probs[5, 2999] = 1.0  # all mass on the last token
    uniforms = torch.rand(64, generator=g)
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1])[:, None], right=True)[:, 0]
    assert torch.equal(inverse_cdf(probs, uniforms), expected)
