"""A MOPD scoring pass on the tiny model: SPRR sequences scored by in-process teachers. A teacher with the
student's weights reads exactly the student's logits at the response (A = 0, reverse KL 0), a different teacher
gives a gap, a teacher whose template differs is masked and counted, and each instance loads once."""

import pytest

from data_pipeline.demo import train_tokenizer
from data_pipeline.encode import MediaBudget
from data_pipeline.tokenizer import KeyeTokenizer
from keye_train.config.mopd import MOPDConfig, TeacherConfig
from keye_train.posttrain.mopd.metrics import TeacherMetrics
from keye_train.posttrain.mopd.scoring import ResponseToScore, score_responses
from keye_train.posttrain.mopd.sprr import ChatRenderer, MismatchCounter, teacher_sequence
from keye_train.posttrain.mopd.teachers import InProcessTeacher, TeacherPool


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(["count the red disks", "there are 3 red disks", "system\nuser\nassistant\n<think>\n"], path, 300)
    return KeyeTokenizer(path)


def test_a_scoring_pass_on_the_tiny_model(single_rank, tok):
    from tests.keye_train.posttrain.rollout.common import TOKENS, build_parts, full_logits

    model = single_rank
    student = build_parts(model, seed=51)
    record = {
        "kind": "chat",
        "messages": [{"role": "user", "content": "count the red disks"}, {"role": "assistant", "content": "3"}],
    }
    renderer = ChatRenderer(tok, MediaBudget(), glue="<think>\n")
    prompt = renderer.render(record, {}, 0).input_ids.tolist()
    response = list(tok.encode("there are 3 red disks"))
    seq = teacher_sequence(renderer.render(record, {}, 0), tok, prompt, tok, response)
    assert seq.ok
    student_rows = seq.response_rows(full_logits(student, seq.batch()))  # the student on its own sequence
    bad_seq = teacher_sequence(ChatRenderer(tok, MediaBudget()).render(record, {}, 0), tok, prompt, tok, response)
    assert bad_seq.reason == "template"

    teachers = [
        TeacherConfig("same", "tiny", "seed51"),
        TeacherConfig("other", "tiny", "seed52"),
        TeacherConfig("plain", "tiny", "seed52"),
    ]  # plain shares other's weights

    def loader(config):
        return InProcessTeacher(config.name, build_parts(model, seed=int(config.checkpoint[4:])), TOKENS)

    pool = TeacherPool(teachers, loader)
    mopd = MOPDConfig(
        mode="student_only",  # random tiny models barely overlap: the gap is read on TopK(S)
        top_k=8,
        teachers=teachers,
        category_weights={"format": 1.0, "perception": 1.0, "reasoning": 1.0, "answer": 1.0},
    )
    cats = ["answer"] * len(response)
    items = [
        ResponseToScore("same", seq, student_rows, response, cats),
        ResponseToScore("other", seq, student_rows, response, cats),
        ResponseToScore("plain", bad_seq, student_rows, response, cats),
    ]
    metrics, counter = TeacherMetrics(["same", "other", "plain"], 8), MismatchCounter()
    same, other, masked = score_responses(pool, items, mopd, metrics, counter)
    assert same.abs().max().item() < 1e-5  # float32 models built apart
    assert other.abs().max().item() > 1e-3
    assert masked.tolist() == [0.0] * len(response)
    out = metrics.as_dict()
    assert out["mopd/same/reverse_kl"] < 1e-6 and out["mopd/other/reverse_kl"] > 1e-4
    assert out["mopd/same/overlap_ratio"] == 1.0
    assert counter.rates()["mopd/plain/mismatch/template"] == 1.0 and counter.rates()["mopd/same/mismatch_rate"] == 0
    assert pool.loads == 2  # "plain" would run on "other"'s instance
