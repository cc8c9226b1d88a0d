"""DSA end to end on the tiny model: warm-up lowers the indexer KL, sparse training continues from it, and
TP=2 / PP=2 / CP=4 x EP=4 layouts compute what one rank computes (the TP ranks' selections are checked to
agree)."""

import json

import numpy as np
import pytest

from tests.helpers import QUIET, keye_train, logged_losses

BASE = [*QUIET, "train.global_batch=4", "train.seq_length=128", "optim.warmup_steps=0", "model.lm.dsa.topk=8"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_warmup_lowers_the_indexer_kl_then_sparse_training_continues(tmp_path):
    warm = tmp_path / "warmup"
    done = keye_train(
        *BASE,
        "train.steps=12",
        "model.lm.dsa.mode=warmup",
        "stage.trainable=[indexer]",
        "optim.lr=1e-2",
        "optim.decay_style=constant",
        f"run_dir={warm}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(warm)
    kl = [r["dsa/kl"] for r in rows]
    recall = [r["dsa/recall"] for r in rows]
    assert np.mean(kl[-4:]) < 0.8 * np.mean(kl[:4]), kl
    assert np.mean(recall[-4:]) > np.mean(recall[:4]), recall
    assert max(abs(r["loss"] - rows[0]["loss"]) for r in rows) < 0.1  # the frozen backbone does not learn

    sparse = tmp_path / "sparse"
    done = keye_train(
        *BASE,
        "train.steps=6",
        "model.lm.dsa.mode=sparse",
        "optim.lr=5e-3",
        f"checkpoint.init_from={warm}",
        f"run_dir={sparse}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"initialised from {warm}" in done.stdout
    rows = metrics(sparse)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert all(0 < r["dsa/recall"] <= 1 and r["dsa/kl"] > 0 for r in rows)


SPARSE = [
    *BASE,
    "train.steps=3",
    "optim.lr=5e-3",
    "model.lm.dsa.mode=sparse",
    "model.lm.dsa.verify_tp_topk=true",
    "checkpoint.interval=3",
]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dsa") / "one"
    done = keye_train(*SPARSE, "parallel.nproc=1", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


SPARSE_LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
}


@pytest.mark.parametrize("layout", list(SPARSE_LAYOUTS))
def test_sparse_layouts_match_one_rank(one_rank, layout, tmp_path):
    nproc, overrides = SPARSE_LAYOUTS[layout]
    done = keye_train(*SPARSE, f"parallel.nproc={nproc}", *overrides, f"run_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = logged_losses(one_rank), logged_losses(tmp_path)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], rtol=2e-6)
    kl_want = [r["dsa/kl"] for r in metrics(one_rank)]
    kl_got = [r["dsa/kl"] for r in metrics(tmp_path)]
    np.testing.assert_allclose(kl_got, kl_want, rtol=1e-5)


def test_full_recompute_computes_the_same_step(one_rank, tmp_path):
    """parallel.recompute=full re-runs every ViT and LM layer (indexer, top-k, sparse attention, KL, MoE) in
    backward: the same losses, indexer KL and MoE balance, and the metrics are still taken once per micro-batch."""
    done = keye_train(*SPARSE, "parallel.nproc=1", "parallel.recompute=full", f"run_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = metrics(one_rank), metrics(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    for name in ("loss", "grad_norm", "dsa/kl", "dsa/recall", "moe/max_over_mean_load", "moe/aux_loss"):
        np.testing.assert_allclose([r[name] for r in got], [r[name] for r in want], rtol=1e-6, err_msg=name)
