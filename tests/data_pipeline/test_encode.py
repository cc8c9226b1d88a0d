"""Tokenization, chat template, loss masks, frame timestamps and M-RoPE ids of encoded samples."""

import json

import jinja2
import pytest
import torch

from data_pipeline.demo import Scene, train_tokenizer, write_image, write_video
from data_pipeline.encode import MediaBudget, encode_sample, media_tokens, text_token_count
from data_pipeline.packing import assemble_pack
from data_pipeline.schema import BadRecord, parse_record
from data_pipeline.shards import probe_media
from data_pipeline.sizing import ImageBudget, VideoBudget, plan_video
from data_pipeline.tokenizer import KeyeTokenizer, TokenIds
from tests.helpers import SHARED, needs_shared_reason

QWEN = SHARED / "tokenizers" / "qwen3_vl"
needs_qwen = pytest.mark.skipif(not QWEN.is_dir(), reason=needs_shared_reason)
BUDGET = MediaBudget(
    ImageBudget(min_tokens=4, max_tokens=16),
    VideoBudget(fps=2.0, frame_min_tokens=4, frame_max_tokens=8, video_total_tokens=64, adaptive=False),
)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(
        ["a red disk moves left", "what moves in this clip ?", "0123456789 . - seconds", "system\nuser\nassistant\n"],
        path,
        vocab_size=300,
    )
    return KeyeTokenizer(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    import random

    write_video(path, Scene(random.Random(3)), seconds=3.0)
    return path.read_bytes()


@needs_qwen
def test_qwen_special_ids_and_frame_timestamp():
    tok = KeyeTokenizer(QWEN / "tokenizer.json")
    assert tok.ids == TokenIds()  # Qwen3-VL's special ids; <|frame|> is added right after </think>
    assert tok.timestamp_ids(12.5) == (151669, *tok.encode("12.5")) and len(tok.encode("12.5")) == 4
    assert 151644 not in tok.encode("<|im_start|>")  # special tokens typed in user text stay text


def test_small_tokenizer_has_every_special_and_splits_digits(small_tokenizer):
    ids = small_tokenizer.ids
    assert (
        len(
            {
                ids.pad,
                ids.im_start,
                ids.im_end,
                ids.vision_start,
                ids.vision_end,
                ids.image_pad,
                ids.video_pad,
                ids.frame,
            }
        )
        == 8
    )
    assert len(small_tokenizer.encode("10.5")) == 4


@needs_qwen
def test_chat_matches_the_qwen_template_and_supervises_assistant_turns_only(clip):
    tok = KeyeTokenizer(QWEN / "tokenizer.json")
    record = {
        "id": "q",
        "kind": "chat",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"video": "clip.mp4"}, {"text": "what moves?"}]},
            {"role": "assistant", "content": "a red disk."},
        ],
    }
    sample = encode_sample("q", record, {"clip.mp4": clip}, tok, BUDGET)

    config = json.loads((QWEN / "tokenizer_config.json").read_text())
    hf_messages = [
        record["messages"][0],
        {"role": "user", "content": [{"type": "video", "video": "x"}, {"type": "text", "text": "what moves?"}]},
        record["messages"][2],
    ]
    text = jinja2.Environment().from_string(config["chat_template"]).render(messages=hf_messages)
    from tokenizers import Tokenizer

    expected = Tokenizer.from_file(str(QWEN / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    ids = sample.input_ids.tolist()
    start, end = ids.index(tok.ids.vision_start), ids.index(tok.ids.vision_end)
    collapsed = ids[: start + 1] + [tok.ids.video_pad] + ids[end:]
    assert collapsed == expected

    answer = tok.encode("a red disk.")
    targets = [t for t, s in zip(ids, sample.supervised.tolist()) if s]
    assert targets == [*answer, tok.ids.im_end]
    assert text_token_count(record, tok) == len(ids) - (end - start + 1)  # media tokens include start/end


def test_video_frames_carry_true_timestamps_and_planned_length_is_exact(small_tokenizer, clip):
    tok = small_tokenizer
    record = parse_record(
        json.dumps(
            {
                "id": "v",
                "kind": "video_caption",
                "video": "clip.mp4",
                "segments": [{"start": 0, "end": 3, "text": "a red disk moves left"}],
            }
        ).encode()
    )
    sample = encode_sample("v", record, {"clip.mp4": clip}, tok, BUDGET)
    ids = sample.input_ids.tolist()
    frames = [k for k, t in enumerate(ids) if t == tok.ids.frame]
    assert len(frames) == sample.patch_grids.shape[0] == 6  # 3 s at 2 fps
    stamps = [tok.decode(ids[k + 1 : k + 4]) for k in frames]
    plan = plan_video(3.0, 8.0, 84, 112, BUDGET.video)
    source_times = [k / 8 for k in range(24)]  # the clip has 24 frames at 8 fps
    nearest = [min(source_times, key=lambda s: abs(s - t)) for t in plan.times]
    assert stamps == [f"{t:.1f}" for t in nearest] and stamps[0] == "0.0" and stamps[-1] == "2.9"
    for k in frames:  # each stamp is followed by its frame's pad tokens
        assert ids[k + 4] == tok.ids.video_pad
    assert not any(sample.supervised[: ids.index(tok.ids.vision_end) + 1])
    assert sample.supervised[-1] and ids[-1] == tok.ids.pad  # the document ends in <|endoftext|>, a target
    meta = probe_media("clip.mp4", clip)
    planned_tokens, planned_patches = media_tokens(meta, BUDGET, tok, 1)
    assert text_token_count(record, tok) + planned_tokens == sample.length
    assert planned_patches == sample.num_patches


def test_pack_positions_restart_per_sample_and_frames_get_grid_offsets(small_tokenizer, clip, tmp_path):
    tok = small_tokenizer
    write_image(tmp_path / "p.png", Scene(__import__("random").Random(1)).render(56, 84, 0.0))
    caption = encode_sample(
        "c",
        {"id": "c", "kind": "caption", "image": "p.png", "text": "a red disk"},
        {"p.png": (tmp_path / "p.png").read_bytes()},
        tok,
        BUDGET,
    )
    video = encode_sample(
        "v",
        {"id": "v", "kind": "grounding", "video": "clip.mp4", "query": "the disk", "start": 0.5, "end": 2.0},
        {"clip.mp4": clip},
        tok,
        BUDGET,
    )
    pack = assemble_pack([caption, video], 256, tok.ids)
    assert pack.cu_seqlens.tolist() == [0, caption.length, caption.length + video.length, 256]
    pos = pack.position_ids
    # the caption's 2x3-token picture right after <|vision_start|> at position 0: (1, 1 + r, 1 + c)
    assert pos[:, 1:7].tolist() == [[1] * 6, [1, 1, 1, 2, 2, 2], [1, 2, 3, 1, 2, 3]]
    assert pos[:, 7].tolist() == [4, 4, 4]  # next text token: s + max(2, 3)
    start = caption.length
    assert pos[:, start].tolist() == [0, 0, 0]  # positions restart for the next sample
    labels_ok = pack.labels[: start - 1] == pack.input_ids[1:start]
    assert bool(labels_ok.all()) and pack.loss_mask[start - 1] == 0  # no target across the sample boundary
    assert pack.visual.grids.tolist()[0] == [4, 6] and pack.visual.num_merged_tokens() == int(
        ((pack.input_ids == tok.ids.image_pad) | (pack.input_ids == tok.ids.video_pad)).sum()
    )


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"id": "x", "kind": "caption", "text": "no image"}', "missing_field"),
        (b'{"kind": "text", "text": "no id"}', "missing_field"),
        (b'{"id": "x", "kind": "text", "text": "caf\xe9"}', "non_utf8"),
        (b'{"id": "x", "kind": "text", "text": "\\ud800"}', "non_utf8"),
        (b'{"id": "x", "kind": "chat", "messages": [{"role": "user", "content": "hi"}]}', "missing_field"),
        (b'{"id": "x", "kind": "poem", "text": "?"}', "bad_field"),
        (b'{"id": "x", "kind": "caption", "image": "../etc/passwd", "text": "t"}', "bad_media_name"),
        (b"[1, 2]", "bad_json"),
        (b"{not json", "bad_json"),
    ],
)
def test_bad_records_are_named(raw, reason):
    with pytest.raises(BadRecord) as err:
        parse_record(raw)
    assert err.value.reason == reason


def test_text_only_sample_is_split_into_sequence_parts(small_tokenizer):
    from data_pipeline.encode import split_part

    record = {"id": "t", "kind": "text", "text": "a red disk moves left " * 40}
    sample = encode_sample("t", record, {}, small_tokenizer, BUDGET)
    parts = [split_part(sample, k, 64) for k in range(-(-sample.length // 64))]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), sample.input_ids)
    assert all(p.length == 64 for p in parts[:-1])
