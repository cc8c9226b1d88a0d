"""The rollout section's checks name the key."""

import pytest

from keye_train.config.rollout import RolloutConfig, SamplingConfig


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"slots": 0}, "rollout.slots=0"),
        ({"capacity": 0}, "rollout.capacity=0"),
        ({"prefill_tokens": -1}, "rollout.prefill_tokens=-1"),
        ({"slots": 2, "group_size": 3}, "rollout.group_size=3"),
    ],
)
def test_bad_rollout_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RolloutConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,key",
    [({"temperature": -1.0}, "temperature=-1.0"), ({"top_p": 0.0}, "top_p=0.0"), ({"top_k": -3}, "top_k=-3")],
)
def test_bad_sampling_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"rollout.sampling.{key}"):
        SamplingConfig(**kwargs)
