"""CP slices of a packed batch reassemble into the padded batch; the padding only appends masked rows to each
document; rank r holds chunks r and 2cp-1-r of every document; visual rows map to the right ViT output rows."""

import pytest
import torch

from data_pipeline.batch import PackedBatch, VisualInput
from data_pipeline.context_parallel import context_shard, pad_documents, padded_length, slice_batch, slice_step

PAD, IMG, VID = 0, 90, 91


def packed(lengths: list[int], seed: int = 0) -> PackedBatch:
    """Random tokens (some visual), labels, masks and positions over documents of `lengths`."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(1, 80, (total,), generator=g)
    visual = torch.rand(total, generator=g) < 0.3
    ids[visual] = torch.where(torch.rand(total, generator=g) < 0.5, IMG, VID)[visual]
    positions = torch.randint(0, 1000, (3, total), generator=g)
    merged = int(visual.sum())
    return PackedBatch(
        input_ids=ids,
        labels=torch.randint(1, 80, (total,), generator=g),
        loss_mask=(torch.rand(total, generator=g) < 0.7).float(),
        position_ids=positions,
        cu_seqlens=torch.tensor([0] + lengths).cumsum(0).int(),
        visual=VisualInput(torch.randn(4 * merged, 12, generator=g), torch.tensor([[2, 2]] * merged)),
        sample_ids=[1, 2],
    )


# uneven documents, documents shorter than 2*cp chunks (1, 2, 3 tokens), a long one, one document alone
CASES = [[7, 1, 30, 2, 13], [3], [64], [5, 5, 5, 3, 40, 1]]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("lengths", CASES)
def test_padding_appends_masked_rows_to_each_document(cp, lengths):
    batch = packed(lengths)
    out, pad = pad_documents(batch, cp, PAD, padded_length(lengths, cp, align=2))
    new = (out.cu_seqlens[1:] - out.cu_seqlens[:-1]).tolist()
    assert all(n % (2 * cp) == 0 and n >= old for n, old in zip(new, lengths))
    assert out.seq_length % (2 * cp) == 0 and (out.seq_length // cp) % 2 == 0
    assert not (out.loss_mask.bool() & pad).any() and int(pad.sum()) == out.seq_length - batch.seq_length
    keep = ~pad
    for key in ("input_ids", "labels", "loss_mask"):
        assert torch.equal(getattr(out, key)[keep], getattr(batch, key))
    assert torch.equal(out.position_ids[:, keep], batch.position_ids)
    assert (out.input_ids[pad] == PAD).all()
    # the pad rows of each document come after all its real rows
    starts = out.cu_seqlens.tolist()
    for a, b, n in zip(starts[:-1], starts[1:], lengths):
        assert not pad[a : a + n].any() and pad[a + n : b].all()


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("lengths", CASES)
def test_slices_reassemble_the_padded_batch(cp, lengths):
    batch = packed(lengths, seed=cp)
    padded, pad = pad_documents(batch, cp, PAD)
    full_visual = (padded.input_ids == IMG) | (padded.input_ids == VID)
    visual_index = torch.full((padded.seq_length,), -1)
    visual_index[full_visual] = torch.arange(int(full_visual.sum()))
    rebuilt = {k: torch.full_like(getattr(padded, k), -7) for k in ("input_ids", "labels", "loss_mask")}
    rebuilt_positions = torch.full_like(padded.position_ids, -7)
    rebuilt_pad = torch.zeros_like(pad)
    owners = torch.full((padded.seq_length,), -1)
    slices = [slice_batch(batch, cp, r, PAD, (IMG, VID)) for r in range(cp)]
    gathered = torch.cat([s.shard.rows for s in slices])
    for r, s in enumerate(slices):
        rows = s.shard.rows
        assert s.seq_length == padded.seq_length // cp and s.full_length == padded.seq_length
        assert (owners[rows] == -1).all()
        owners[rows] = r
        for k in rebuilt:
            rebuilt[k][rows] = getattr(s, k)
        rebuilt_positions[:, rows] = s.position_ids
        rebuilt_pad[rows] = s.shard.pad
        # the visual rows of the slice take the ViT rows of the same global positions, in local order
        local_visual = (s.input_ids == IMG) | (s.input_ids == VID)
        assert torch.equal(s.shard.visual_rows, visual_index[rows][local_visual])
        # the gather order puts every rank's rows back in global order
        assert torch.equal(gathered[s.shard.gather_order], torch.arange(padded.seq_length))
    assert (owners >= 0).all()
    for k in rebuilt:
        assert torch.equal(rebuilt[k], getattr(padded, k))
    assert torch.equal(rebuilt_positions, padded.position_ids) and torch.equal(rebuilt_pad, pad)
    assert sum(s.num_supervised() for s in slices) == batch.num_supervised()


@pytest.mark.parametrize("cp", [2, 3])
def test_rank_r_takes_chunks_r_and_mirror_with_causal_key_prefixes(cp):
    lengths = [4 * cp, 2 * cp, 6 * cp]
    starts = [0, 4 * cp, 6 * cp]
    for r in range(cp):
        shard = context_shard(lengths, cp, r)
        expected, segments = [], []
        for start, n in zip(starts, lengths):
            c = n // (2 * cp)
            for j in (r, 2 * cp - 1 - r):
                expected += list(range(start + j * c, start + (j + 1) * c))
                segments.append((c, start, (j + 1) * c))
        assert shard.rows.tolist() == expected
        assert list(zip(shard.q_lengths, shard.k_starts, shard.k_lengths)) == segments
        # brute force: a query at global position p of a document starting at s sees keys s .. p
        keys = shard.key_rows().tolist()
        cu_q, cu_k = shard.cu_seqlens_q().tolist(), shard.cu_seqlens_k().tolist()
        for i in range(shard.num_segments):
            q_rows = shard.rows[cu_q[i] : cu_q[i + 1]].tolist()
            k_rows = keys[cu_k[i] : cu_k[i + 1]]
            assert k_rows == list(range(shard.k_starts[i], q_rows[-1] + 1))


def test_step_shares_one_length_and_rejects_bad_totals():
    a, b = packed([5, 9]), packed([30, 1, 1, 1])
    sliced = slice_step([a, b], 2, 1, PAD, (IMG, VID), align=2)
    assert sliced[0].full_length == sliced[1].full_length == padded_length([30, 1, 1, 1], 2, 2)
    with pytest.raises(ValueError, match="2\\*cp=4"):
        pad_documents(a, 2, PAD, total=18)
