"""Token categories of the default tagger and their weights; the collapse detector and the localized repetition
penalty: a looping tail is penalised from its first repeat, long healthy answers (even with short repeats) are not."""

import random

import pytest
import torch

from keye_train.posttrain.mopd.categories import Tagger, category_weights
from keye_train.posttrain.mopd.repetition import collapse_point, repetition_penalty


def test_the_default_tagger():
    pieces = [
        "<think>",
        "Count",
        " the",
        " cars",
        ":",
        " 3",
        "</think>",
        "<|box_start|>",
        "(1",
        "2",
        ",",
        "4",
        ")",
        "<|box_end|>",
        " The",
        " text",
        " reads",
        ' "',
        "EX",
        "IT",
        '"',
        "{",
        " at",
        " 12",
        ":",
        "30",
    ]
    ids = list(range(len(pieces)))
    ids[0] = 900  # a special id
    got = Tagger(special_ids=frozenset({900})).tag(ids, pieces)
    expected = [
        "format",
        "reasoning",
        "reasoning",
        "reasoning",
        "format",
        "perception",
        "format",
        "format",
        "perception",
        "perception",
        "format",
        "perception",
        "perception",
        "format",
        "answer",
        "answer",
        "answer",
        "format",
        "perception",
        "perception",
        "format",
        "format",
        "answer",
        "perception",
        "format",
        "perception",
    ]
    assert got == expected
    weights = category_weights(got[:3], {"format": 0.5, "reasoning": 1.2})
    assert weights.tolist() == [0.5, 1.2, 1.2]
    with pytest.raises(ValueError, match="2 ids but 1"):
        Tagger().tag([1, 2], ["a"])
    with pytest.raises(ValueError, match="not one of"):
        category_weights(["style"], {})


def test_a_loop_is_penalised_from_its_first_repeat():
    rng = random.Random(0)
    head = [rng.randrange(100, 1000) for _ in range(200)]
    loop = [rng.randrange(100, 1000) for _ in range(20)]
    ids = head + loop * 6
    assert collapse_point(ids, 64, 3, 48) == 200 + 20
    pen = repetition_penalty(ids, 0.3, 64, 3, 48)
    assert pen[:220].abs().sum().item() == 0 and pen[220:].tolist() == [-0.3] * (len(ids) - 220)
    assert repetition_penalty(ids, 0.0, 64, 3, 48).abs().sum().item() == 0  # off
    one = head + [7] * 60  # a period-1 collapse
    assert collapse_point(one, 64, 3, 48) == 201


def test_long_healthy_answers_are_untouched():
    rng = random.Random(1)
    healthy = [rng.randrange(100, 30000) for _ in range(6000)]
    # short repeats a healthy answer has: "| 0 | 0 | 0 |" rows, a doubled phrase, a short run of one token
    healthy[1000:1012] = [5, 6, 7, 8] * 3
    healthy[3000:3020] = list(range(40, 50)) * 2
    healthy[5000:5030] = [9] * 30
    assert collapse_point(healthy, 64, 3, 48) is None
    assert torch.equal(repetition_penalty(healthy, 1.0, 64, 3, 48), torch.zeros(6000, dtype=torch.float64))


def test_tagging_a_response_with_a_real_tokenizer(tmp_path):
    from data_pipeline.demo import train_tokenizer
    from data_pipeline.tokenizer import KeyeTokenizer
    from keye_train.posttrain.mopd.categories import tag_response

    path = tmp_path / "tokenizer.json"
    train_tokenizer(["<think>\nthe clock shows 12 : 30\n</think>\nit is late", '{"answer": "late"}'], path, 300)
    tok = KeyeTokenizer(path)
    ids = [*tok.encode("<think>\nthe clock shows 12"), tok.ids.im_end]
    cats = tag_response(ids, tok)
    pieces = [tok.decode([t]) for t in ids]
    for piece, cat in zip(pieces, cats):
        if any(ch.isdigit() for ch in piece):
            assert cat == "perception", (piece, cat)
        elif piece.strip() in ("the", "clock", "shows"):
            assert cat == "reasoning", (piece, cat)
    assert cats[-1] == "format"  # <|im_end|>, a special id
    from keye_train.posttrain.mopd.categories import tagger_for

    custom = tag_response(ids, tok, tagger_for(tok, perception_pattern=r"clock"))  # a recipe's own pattern
    assert [c for p, c in zip(pieces, custom) if p.strip() == "clock"] == ["perception"]
    assert [c for p, c in zip(pieces, custom) if p.strip() == "12" or p.strip() == "1"][:1] == ["reasoning"]
