"""Maximum-weight assignment between two small sets (the Hungarian match of predicted and reference segments).

Exact dynamic programming over subsets of the smaller side: rows are taken one by one, the state is the set of
columns already used; O(rows * 2^cols * cols) time. The smaller side is capped at `MAX_SIDE` (a grounding answer
has a handful of segments; more is a degenerate output, which the callers truncate before matching).
"""

from __future__ import annotations

MAX_SIDE = 12


def max_weight_assignment(weights: list[list[float]]) -> tuple[float, list[tuple[int, int]]]:
    """weights[i][j] >= 0 for row i and column j. Returns (best total, the matched (row, column) pairs); each row
    and each column is used at most once, and pairs of weight 0 are left out of the list."""
    rows = len(weights)
    cols = len(weights[0]) if rows else 0
    if any(len(row) != cols for row in weights):
        raise ValueError("max_weight_assignment: every row needs the same number of columns")
    if rows == 0 or cols == 0:
        return 0.0, []
    if cols > rows:  # keep the subset side the smaller one
        total, pairs = max_weight_assignment([list(col) for col in zip(*weights)])
        return total, sorted((i, j) for j, i in pairs)
    if cols > MAX_SIDE:
        raise ValueError(f"max_weight_assignment: {rows}x{cols} is over the {MAX_SIDE}-item cap of the exact search")
    if any(w < 0 for row in weights for w in row):
        raise ValueError("max_weight_assignment: weights must be >= 0")
    # best[mask] = best total over the rows seen so far using exactly the columns in mask; choice[i][mask] = the
    # column row i took to reach mask (-1: none).
    neg = float("-inf")
    best = [neg] * (1 << cols)
    best[0] = 0.0
    choices = []
    for row in weights:
        nxt, choice = list(best), [-1] * (1 << cols)
        for mask, value in enumerate(best):
            if value == neg:
                continue
            for j in range(cols):
                bit = 1 << j
                if mask & bit:
                    continue
                candidate = value + row[j]
                if candidate > nxt[mask | bit]:
                    nxt[mask | bit], choice[mask | bit] = candidate, j
        best = nxt
        choices.append(choice)
    mask = max(range(1 << cols), key=lambda m: best[m])
    total, pairs = best[mask], []
    for i in range(rows - 1, -1, -1):
        j = choices[i][mask]
        if j >= 0:
            pairs.append((i, j))
            mask ^= 1 << j
    pairs = sorted((i, j) for i, j in pairs if weights[i][j] > 0)
    return float(total), pairs
