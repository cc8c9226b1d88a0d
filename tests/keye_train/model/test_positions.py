import math

import torch

from keye_train.model.positions import vit_rope_angles


def _reference_vit_angles(grids, head_dim, theta=10000.0):
    n = head_dim // 4
    freqs = [theta ** (-2 * i / (head_dim / 2)) for i in range(n)]
    rows = []
    for h, w in grids:
        for r in range(h):
            for c in range(w):
                e = [r * f for f in freqs] + [c * f for f in freqs]
                rows.append(e + e)
    return torch.tensor(rows, dtype=torch.float64)


def test_vit_rope_angles_match_direct_loop():
    grids = [[2, 4], [4, 2]]
    got = vit_rope_angles(torch.tensor(grids), head_dim=16)
    assert got.dtype == torch.float32 and got.shape == (16, 16)
    torch.testing.assert_close(got.double(), _reference_vit_angles(grids, 16), rtol=1e-6, atol=1e-6)


def test_vit_rope_rows_and_cols_restart_per_frame():
    got = vit_rope_angles(torch.tensor([[2, 2], [2, 2]]), head_dim=72)
    assert got.shape == (8, 72)
    # 18 frequencies: column 1 is f_1 * row, column 19 is f_1 * col; second frame starts at (0, 0).
    f1 = 10000.0 ** (-2 / 36)
    assert torch.equal(got[4], torch.zeros(72))
    assert torch.equal(got[:4], got[4:])
    assert math.isclose(float(got[2, 1]), f1, rel_tol=1e-6)  # patch (1, 0)
    assert math.isclose(float(got[1, 19]), f1, rel_tol=1e-6)  # patch (0, 1)
    assert torch.equal(got[:, :36], got[:, 36:])
