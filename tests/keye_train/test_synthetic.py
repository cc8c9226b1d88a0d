import itertools
import json

import torch

from keye_train.config import TokenIds
from keye_train.synthetic import SyntheticDataConfig, SyntheticPackSource, make_sample

IDS = TokenIds()
NO_LOSS_TARGETS = {IDS.image_pad, IDS.video_pad, IDS.vision_start, IDS.vision_end, IDS.frame, IDS.pad}


def _config(seq_length=160, video_frames=3):
    return SyntheticDataConfig(seq_length=seq_length, video_frames=video_frames)


def _packs(source, n):
    return list(itertools.islice(source, n))


def _documents(batch):
    cu = batch.cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _assert_same(a, b):
    for name in ("input_ids", "labels", "loss_mask", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.sample_ids == b.sample_ids
    assert (a.visual is None) == (b.visual is None)
    if a.visual is not None:
        assert torch.equal(a.visual.patches, b.visual.patches)
        assert torch.equal(a.visual.grids, b.visual.grids)


def test_pack_shapes_and_visual_counts():
    packs = _packs(SyntheticPackSource(_config(), seed=3), 6)
    kinds_seen = set()
    for batch in packs:
        s = batch.seq_length
        assert s == 160 and batch.labels.shape == (s,) and batch.loss_mask.shape == (s,)
        assert batch.position_ids.shape == (3, s) and batch.position_ids.dtype == torch.int64
        assert batch.cu_seqlens.dtype == torch.int32 and int(batch.cu_seqlens[-1]) == s
        num_pads = int(torch.isin(batch.input_ids, torch.tensor([IDS.image_pad, IDS.video_pad])).sum())
        if batch.visual is None:
            assert num_pads == 0
            continue
        kinds_seen.add("visual")
        assert num_pads == batch.visual.num_merged_tokens()
        assert batch.visual.patches.shape == (4 * num_pads, 3 * 14 * 14)
        assert batch.visual.patches.min() >= -1 and batch.visual.patches.max() <= 1
        for start, _ in _documents(batch):
            assert batch.position_ids[:, start].tolist() == [0, 0, 0]
    assert kinds_seen


def test_video_frames_differ_and_have_timestamps():
    config = _config()
    sample = next(make_sample(config, IDS, 0, i) for i in range(100)
                  if IDS.video_pad in make_sample(config, IDS, 0, i).input_ids.tolist())
    assert sample.patch_grids.tolist() == [[4, 4]] * 3
    frames = sample.patches.reshape(3, 16, -1)
    assert not torch.equal(frames[0], frames[1]) and not torch.equal(frames[1], frames[2])
    ids = sample.input_ids.tolist()
    starts = [k for k, t in enumerate(ids) if t == IDS.frame]
    stamps = [ids[k + 1:k + 4] for k in starts]
    assert stamps == [IDS.number_ids("0.0"), IDS.number_ids("0.5"), IDS.number_ids("1.0")]
    assert stamps[1] == [15, 13, 20]


def test_labels_are_next_tokens_and_loss_mask_skips_visual_and_timestamps():
    for batch in _packs(SyntheticPackSource(_config(), seed=1), 6):
        ids, labels, mask = batch.input_ids, batch.labels, batch.loss_mask
        docs = _documents(batch)
        num_samples = len(batch.sample_ids)
        for start, end in docs[:num_samples]:
            assert torch.equal(labels[start:end - 1], ids[start + 1:end])
            assert mask[end - 1] == 0 and ids[start] == IDS.im_start and ids[end - 1] == IDS.im_end
            assert mask[start:end].sum() > 0
        for start, end in docs[num_samples:]:  # padding tail
            assert torch.all(ids[start:end] == IDS.pad) and mask[start:end].sum() == 0
        supervised_targets = set(labels[mask.bool()].tolist())
        assert not supervised_targets & NO_LOSS_TARGETS
        # Timestamp digits: tokens between each frame marker and its first video pad.
        ids_list = ids.tolist()
        for k, token in enumerate(ids_list):
            if token == IDS.frame:
                end = ids_list.index(IDS.video_pad, k)
                assert mask[k - 1:end - 1].sum() == 0
        assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_same_seed_same_output_and_different_seed_differs():
    a = _packs(SyntheticPackSource(_config(), seed=7), 3)
    b = _packs(SyntheticPackSource(_config(), seed=7), 3)
    for x, y in zip(a, b):
        _assert_same(x, y)
    c = _packs(SyntheticPackSource(_config(), seed=8), 1)[0]
    assert not torch.equal(a[0].input_ids, c.input_ids)


def test_global_batches_do_not_depend_on_the_dp_size():
    config, global_batch, steps = _config(), 6, 2
    single = _packs(SyntheticPackSource(config, seed=5), global_batch * steps)
    for dp_size in (2, 3):
        ranks = [_packs(SyntheticPackSource(config, seed=5, dp_rank=r, dp_size=dp_size), global_batch // dp_size * steps)
                 for r in range(dp_size)]
        per_rank = global_batch // dp_size
        for step in range(steps):
            got = [p for rank in ranks for p in rank[step * per_rank:(step + 1) * per_rank]]
            expected = single[step * global_batch:(step + 1) * global_batch]
            key = lambda p: p.sample_ids[0]  # noqa: E731
            for x, y in zip(sorted(got, key=key), sorted(expected, key=key)):
                _assert_same(x, y)
    sample_ids = [i for p in single for i in p.sample_ids]
    assert len(sample_ids) == len(set(sample_ids))


def test_exact_resume():
    total, split = 7, 3
    config = _config(seq_length=128)
    reference = _packs(SyntheticPackSource(config, seed=11, dp_rank=1, dp_size=2), total)

    first = SyntheticPackSource(config, seed=11, dp_rank=1, dp_size=2)
    head = _packs(first, split)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = SyntheticPackSource(config, seed=11, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    tail = _packs(resumed, total - split)

    for x, y in zip(reference, head + tail):
        _assert_same(x, y)
