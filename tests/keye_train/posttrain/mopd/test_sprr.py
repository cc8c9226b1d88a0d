"""SPRR: a teacher rendering the same record gets [its context | the student's ids] with M-RoPE recomputed and the
response read at exactly R positions; a mismatched template, frame sampling or visual-token count is rejected and
counted by reason; a response whose text would re-tokenize differently still aligns (ids are used verbatim)."""

import random

import pytest
import torch

from data_pipeline.demo import Scene, train_tokenizer, write_video
from data_pipeline.encode import MediaBudget
from data_pipeline.sizing import ImageBudget, VideoBudget
from data_pipeline.tokenizer import KeyeTokenizer
from keye_train.posttrain.mopd.sprr import (
    ChatRenderer,
    MismatchCounter,
    RenderedContext,
    boundary_text,
    frame_times,
    teacher_sequence,
)


def budget(fps=2.0):
    return MediaBudget(
        ImageBudget(min_tokens=4, max_tokens=16),
        VideoBudget(fps=fps, frame_min_tokens=4, frame_max_tokens=8, video_total_tokens=64, adaptive=False),
    )


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [
        "what moves in this clip ?",
        "a red disk moves left",
        "reds red redder",
        "0123456789 . seconds",
        "system\nuser\nassistant\n<think>\n</think>",
    ]
    train_tokenizer(texts, path, vocab_size=300)
    return KeyeTokenizer(path)


@pytest.fixture(scope="module")
def record_and_media(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    write_video(path, Scene(random.Random(3)), seconds=3.0)
    record = {
        "kind": "chat",
        "messages": [
            {"role": "user", "content": [{"video": "clip.mp4"}, {"text": "what moves in this clip ?"}]},
            {"role": "assistant", "content": "a red disk"},
            {"role": "user", "content": "what moves ?"},
            {"role": "assistant", "content": "a disk"},
        ],
    }
    return record, {"clip.mp4": path.read_bytes()}


def student_turn(tok, record, media, turn, response_text="a red disk moves left"):
    prompt = ChatRenderer(tok, budget(), glue="<think>\n").render(record, media, turn).input_ids
    return prompt.tolist(), list(tok.encode(response_text))


@pytest.mark.parametrize("turn", [0, 1])
def test_a_matching_teacher_aligns_every_response_token(tok, record_and_media, turn):
    record, media = record_and_media
    prompt, response = student_turn(tok, record, media, turn)
    context = ChatRenderer(tok, budget(), glue="<think>\n").render(record, media, turn)
    seq = teacher_sequence(context, tok, prompt, tok, response)
    assert seq.ok, seq.reason
    L, R = seq.context_length, len(response)
    assert seq.input_ids[L:].tolist() == response and seq.input_ids[:L].tolist() == prompt
    assert len(frame_times(prompt, tok)) == 1 and len(frame_times(prompt, tok)[0]) == 6  # 3 s at 2 fps
    assert boundary_text(prompt, tok) == "assistant\n<think>\n"
    # the response continues the context's M-RoPE ids as text, after the video's spread positions
    assert (
        seq.position_ids[:, L:].tolist()
        == [list(range(int(seq.position_ids[:, :L].max()) + 1, int(seq.position_ids[:, :L].max()) + 1 + R))] * 3
    )
    assert seq.visual is not None and seq.visual.grids.shape[0] == 6
    batch = seq.batch()
    assert batch.labels[L - 1 : L - 1 + R].tolist() == response  # the rows read predict exactly the response
    logits = torch.arange(float(L + R))[:, None].expand(-1, 4)
    assert seq.response_rows(logits)[:, 0].tolist() == list(range(L - 1, L - 1 + R))
    with pytest.raises(ValueError, match="length"):
        seq.response_rows(logits[: L + R - 2])


def test_mismatches_are_rejected_and_counted_by_reason(tok, record_and_media):
    record, media = record_and_media
    prompt, response = student_turn(tok, record, media, 0)
    counter = MismatchCounter()
    good = ChatRenderer(tok, budget(), glue="<think>\n").render(record, media, 0)
    no_glue = ChatRenderer(tok, budget(), glue="").render(record, media, 0)  # a template without the <think>
    other_frames = ChatRenderer(tok, budget(fps=1.0), glue="<think>\n").render(record, media, 0)  # 3 frames
    pads = (good.input_ids == tok.ids.video_pad).nonzero()[:, 0]
    dropped = RenderedContext(
        torch.cat([good.input_ids[: pads[0]], good.input_ids[pads[0] + 1 :]]), good.patches, good.patch_grids
    )  # one visual pad short of the processor's grids
    cases = {"template": no_glue, "frame_sampling": other_frames, "visual_tokens": dropped, None: good}
    for reason, context in cases.items():
        seq = teacher_sequence(context, tok, prompt, tok, response)
        assert seq.reason == reason
        counter.add("video", seq.reason)
    pad_in_response = teacher_sequence(good, tok, prompt, tok, response + [tok.ids.video_pad])
    assert pad_in_response.reason == "mrope"
    counter.add("video", pad_in_response.reason)
    rates = counter.rates()
    assert rates["mopd/video/mismatch_rate"] == pytest.approx(4 / 5)
    for reason in ("template", "frame_sampling", "visual_tokens", "mrope"):
        assert rates[f"mopd/video/mismatch/{reason}"] == pytest.approx(1 / 5)
    assert rates["mopd/video/mismatch/echo"] == 0.0


def test_a_response_that_would_retokenize_differently_still_aligns(tok, record_and_media):
    record, media = record_and_media
    prompt, _ = student_turn(tok, record, media, 0)
    # the student sampled "red" one character at a time: decoding and re-encoding would merge it
    response = [*tok.encode("a "), *tok.encode("r"), *tok.encode("e"), *tok.encode("d")]
    assert list(tok.encode(tok.decode(response))) != response
    context = ChatRenderer(tok, budget(), glue="<think>\n").render(record, media, 0)
    seq = teacher_sequence(context, tok, prompt, tok, response)
    assert seq.ok and seq.input_ids[seq.context_length :].tolist() == response
    assert seq.batch().labels[seq.context_length - 1 : seq.context_length - 1 + len(response)].tolist() == response
