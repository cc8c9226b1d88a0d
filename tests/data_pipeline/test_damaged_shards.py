"""Damaged tars are caught when a corpus opens (size, last key), keep their readable prefix, and are reported
once; `keye-data index --verify` checks every sample offline."""

import pytest

from data_pipeline.cli import main as keye_data
from data_pipeline.loader import ShardLoader
from data_pipeline.shards import ShardSet
from tests.data_pipeline.hostile import (
    LONG_ID,
    damaged_copy,
    entries,
    overwrite_from,
    text_corpus,
    text_data_config,
    truncate,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("text-corpus"))


def test_an_intact_corpus_opens_with_every_sample_and_verifies(corpus, capsys):
    shards = ShardSet(corpus / "shards", verify=True)
    assert shards.damaged == [] and shards.sizes == [10, 10, 10]
    assert keye_data(["index", "--verify", str(corpus / "shards")]) == 0
    assert "3 shards, 30 samples, 0 damaged shard(s), 0 problem(s)" in capsys.readouterr().out


def test_a_truncated_shard_keeps_its_readable_prefix(corpus, tmp_path):
    copy = damaged_copy(corpus, tmp_path / "c")
    truncate(copy / "shards", 1, 7)  # inside the long text, shard 1's sample 7
    assert ShardSet(copy / "shards").sizes == [10, 10, 10]  # decode workers do not check
    shards = ShardSet(copy / "shards", verify=True)
    (damage,) = shards.damaged
    assert (damage.shard, damage.samples, damage.readable, damage.lost) == ("shard-000001.tar", 10, 7, 3)
    assert "bytes, its index says 20480" in damage.describe()
    assert shards.sizes == [10, 7, 10]


def test_a_shard_replaced_at_the_same_size_keeps_the_samples_before_the_change(corpus, tmp_path):
    copy = damaged_copy(corpus, tmp_path / "c")
    overwrite_from(copy / "shards", 2, 4)
    (damage,) = ShardSet(copy / "shards", verify=True).damaged
    assert (damage.shard, damage.readable, damage.lost) == ("shard-000002.tar", 4, 6)
    assert "its last sample does not match" in damage.detail


def test_a_missing_tar_loses_its_samples_and_a_corpus_with_nothing_readable_is_refused(corpus, tmp_path):
    copy = damaged_copy(corpus, tmp_path / "c")
    (copy / "shards" / "shard-000000.tar").unlink()
    shards = ShardSet(copy / "shards", verify=True)
    assert [(d.shard, d.lost, d.detail) for d in shards.damaged] == [("shard-000000.tar", 10, "the tar is missing")]
    for number in (1, 2):
        truncate(copy / "shards", number, 0, inside=100)
    with pytest.raises(ValueError, match="holds no readable samples"):
        ShardSet(copy / "shards", verify=True)


def test_the_loader_reports_a_damaged_shard_once_and_never_plans_its_lost_samples(corpus, tmp_path):
    """The issue's case: a shard copied short of its index, holding a long text the planner splits into pieces."""
    copy = damaged_copy(corpus, tmp_path / "c")
    truncate(copy / "shards", 1, 7)
    lost = {e["id"] for e in entries(copy / "shards", 1)[7:]}
    lines = []
    loader = ShardLoader(text_data_config(copy, max_pack_age=16), 128, 2, seed=0, log=lines.append)
    trained = []
    while loader.consumed_planner_state()["epoch"] < 2:
        for batch in loader.next_step():
            assert batch.num_supervised() > 0
            trained += [sid.split("#")[0].rsplit("@", 1)[0] for sid in batch.sample_ids]
    counters = loader.counters()
    loader.close()
    assert [line for line in lines if "damaged" in line] == [
        (
            "data: shard shard-000001.tar is damaged (7868 bytes, its index says 20480): 3 of 10 samples lost, "
            "its first 7 are used"
        )
    ]
    assert counters["plan/damaged_shards"] == 1 and counters["plan/lost_samples"] == 3
    assert not any(key.startswith("rejected/") for key in counters)
    assert LONG_ID in lost and not lost & set(trained)
    assert set(trained) == {e["id"] for n in range(3) for e in entries(copy / "shards", n)} - lost


def test_verify_reports_every_broken_sample_and_exits_non_zero(corpus, tmp_path, capsys):
    copy = damaged_copy(corpus, tmp_path / "c")
    truncate(copy / "shards", 1, 7)
    tar = copy / "shards" / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    record = entries(copy / "shards", 0)[2]
    data[record["offset"] + 512 + 2] = 0xFF  # inside sample 2's JSON record: not UTF-8
    tar.write_bytes(bytes(data))
    assert keye_data(["index", "--verify", str(copy / "shards")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("3 shards, 30 samples, 2 damaged shard(s), 5 problem(s)")
    assert [line.split(": ")[1] for line in out[:-1]] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000001.tar",
        "shard-000001.tar",
        "shard-000001.tar",
    ]
    assert "sample 2 (key 000000002, id 't2'): record: non_utf8" in out[0]
    assert "sample 7 (key 000000017, id 'long-text'): member 000000017.json ends past the end of the file" in out[2]
    with pytest.raises(SystemExit):  # indexing needs --tokenizer
        keye_data(["index", str(copy / "shards")])
