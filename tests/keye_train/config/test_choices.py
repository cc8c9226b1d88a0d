"""Every config is checked before any rank starts: each choice field rejects a value outside its choices, and
each section's value checks name the key."""

import dataclasses
import typing
from enum import Enum

import pytest

from keye_train.config import DSAConfig, KeyeTrainConfig
from keye_train.config.compose import load_checked_config
from tests.helpers import QUIET, keye_train


def choice_fields(cls=KeyeTrainConfig, prefix=""):
    """(dotted key, enum type, is a list) of every choice-typed field, found by walking the dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, key = hints[f.name], prefix + f.name
        args = typing.get_args(kind)
        if isinstance(kind, type) and issubclass(kind, Enum):
            yield key, kind, False
        elif typing.get_origin(kind) in (list, typing.List) and args and issubclass(args[0], Enum):
            yield key, args[0], True
        elif dataclasses.is_dataclass(kind):
            yield from choice_fields(kind, key + ".")


CHOICES = list(choice_fields())


def test_the_walk_finds_the_choice_fields_the_issue_names():
    keys = {key for key, _, _ in CHOICES}
    assert {
        "stage.trainable",
        "optim.decay_style",
        "train.dtype",
        "parallel.backend",
        "parallel.placement",
        "parallel.recompute",
        "model.lm.dsa.mode",
        "model.lm.dsa.backend",
        "train.nonfinite_policy",
        "logging.wandb_mode",
        "model.lm.experts_impl",
        "model.lm.loss_impl",
    } <= keys


@pytest.mark.parametrize("key, choices, is_list", CHOICES, ids=[key for key, _, _ in CHOICES])
def test_a_value_outside_the_choices_is_refused_naming_the_key(key, choices, is_list):
    value = "[lm,not_a_choice]" if is_list else "not_a_choice"
    with pytest.raises(ValueError) as refused:
        load_checked_config([*QUIET, f"{key}={value}"], world=1, check_data=False)
    message = str(refused.value)
    assert key in message and "not_a_choice" in message
    assert all(choice.value in message for choice in choices)  # the message lists what is allowed
    good = "[" + next(iter(choices)).value + "]" if is_list else next(iter(choices)).value
    load_checked_config([*QUIET, f"{key}={good}"], world=1, check_data=False)  # each choice composes


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lm.dsa.topk=0", "model.lm.dsa.topk=0"),
        ("model.lm.loss_chunk_tokens=0", "model.lm.loss_chunk_tokens=0"),
        ("model.lm.dsa.index_head_dim=12", "model.lm.dsa.index_head_dim=12"),
        ("train.steps=0", "train.steps=0"),
        ("train.loss_spike_window=0", "train.loss_spike_window=0"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("checkpoint.interval=-1", "checkpoint.interval=-1"),
        ("logging.log_interval=0", "logging.log_interval=0"),
        ("parallel.nproc=0", "parallel.nproc=0"),
        ("launch.nodes=0", "launch.nodes=0"),
    ],
)
def test_a_bad_value_is_refused_naming_its_key(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        load_checked_config([*QUIET, "attention=sparse", override], world=1, check_data=False)
    assert DSAConfig().index_heads * DSAConfig().index_head_dim == 1024  # full-size default 16 x 64


def test_the_command_line_refuses_a_bad_choice_before_any_rank_starts(tmp_path):
    done = keye_train(
        *QUIET, "parallel.nproc=2", "parallel.ep=2", "train.dtype=fp16", f"run_dir={tmp_path}", timeout=120
    )
    assert done.returncode == 2 and "train.dtype='fp16'" in done.stderr and "bf16" in done.stderr
    assert "torch.distributed.run" not in done.stderr + done.stdout and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("override", ["+train.nope=1", "+model.lm.nope=1", "+nope=1"])
def test_added_keys_outside_the_schema_are_refused_by_name(override):
    key = override[1:].split("=")[0]
    with pytest.raises(ValueError, match=rf"{key}: not a key of"):
        load_checked_config([*QUIET, override], world=1, check_data=False)
