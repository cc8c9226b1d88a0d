"""Two-level balancing of a step's visual and LM work (pure functions over costs; no torch).

Level 1 (`assign_frames`): every image and video frame is one indivisible item (its patches attend only within
it), with the cost-model time of `parallel/costs.py` (linear in patches plus the frame's quadratic attention
term). Items go to V ViT ranks by longest-processing-time (LPT): largest first, each to the least-loaded rank.
LPT is a list schedule, so Graham's bound holds for every input:

    max rank load <= mean load + (1 - 1/V) * largest item          (`level1_bound`)

and, against the best possible assignment OPT, max <= (4/3 - 1/(3V)) * OPT. Since OPT >= max(mean, largest
item), the first bound is also within 2 - 1/V of optimal. With V >= items every item gets its own rank and the
maximum is the largest item, which no assignment beats.

Level 2 (`deal_equal_counts`): a step's packs go to D data-parallel replicas, the same count each (the
replicas' micro-batches), by LPT on an estimated cost per pack. With the cost `tokens + patch_cost * patches`
this is exactly the data pipeline's deal (`data_pipeline/planner.py::deal`, kept there because the data room
imports nothing of ours; `tests/parallel/test_balance.py` pins the two equal). `pack_cost` gives the cost under a
placement from the cost model (`parallel/simulate.py`), and `parallel.simulate.pipeline_patch_cost` the data
pipeline's linear `patch_cost` that approximates it (`keye-train plan` prints it for `data.patch_cost`).
The equal-count constraint voids Graham's proof (a full replica with small packs no longer takes the next one),
so level 2 states the weaker `level2_bound` (mean + largest item); the tests check the Graham form there too,
and against the brute-force optimum of equal-count assignments on small cases.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

# ---- level 1: frames over ViT ranks ------------------------------------------------------------------------------


def optimal_equal_counts(costs: Sequence[float], bins: int) -> float:
    """Brute force over equal-count assignments (small inputs only: tests)."""
    per_bin = len(costs) // bins
    best = float("inf")
    order = sorted(costs, reverse=True)

    def place(i: int, load: list[float], count: list[int]) -> None:
        nonlocal best
        if max(load) >= best:
            return
        if i == len(order):
            best = max(load)
            return
        seen = set()
        for b in range(bins):
            if count[b] == per_bin or (load[b], count[b]) in seen:
                continue
            seen.add((load[b], count[b]))
            load[b] += order[i]
            count[b] += 1
            place(i + 1, load, count)
            load[b] -= order[i]
            count[b] -= 1

    place(0, [0.0] * bins, [0] * bins)
    return best if costs else 0.0


def lpt(costs: Sequence[float], bins: int) -> list[list[int]]:
    """Indices of `costs` per bin by longest-processing-time; ties go to the lower index and the lower bin.
    Each bin's indices come back in increasing order."""
    if bins < 1:
        raise ValueError(f"bins={bins} must be >= 1")
    heap = [(0.0, b) for b in range(bins)]
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        out[b].append(i)
        heapq.heappush(heap, (load + costs[i], b))
    return [sorted(ix) for ix in out]


def loads(costs: Sequence[float], assignment: list[list[int]]) -> list[float]:
    return [sum(costs[i] for i in ix) for ix in assignment]


def level1_bound(costs: Sequence[float], bins: int) -> float:
    """Graham's list-scheduling bound that `lpt` meets: mean + (1 - 1/bins) * largest item."""
    if not costs:
        return 0.0
    return sum(costs) / bins + (1 - 1 / bins) * max(costs)


def assign_frames(frame_costs: Sequence[float], ranks: int) -> tuple[list[list[int]], list[float]]:
    """Level 1: frames (their cost-model seconds) over `ranks` ViT ranks; (frames per rank, load per rank)."""
    assignment = lpt(frame_costs, ranks)
    return assignment, loads(frame_costs, assignment)


def optimal_makespan(costs: Sequence[float], bins: int) -> float:
    """Brute force over all assignments (small inputs only: tests)."""
    best = float("inf")
    n = len(costs)
    order = sorted(costs, reverse=True)

    def place(i: int, load: list[float]) -> None:
        nonlocal best
        if max(load) >= best:
            return
        if i == n:
            best = max(load)
            return
        seen = set()
        for b in range(bins):
            if load[b] in seen:  # symmetric bins
                continue
            seen.add(load[b])
            load[b] += order[i]
            place(i + 1, load)
            load[b] -= order[i]

    place(0, [0.0] * bins)
    return best if n else 0.0


# ---- level 2: packs over DP replicas -------------------------------------------------------------------------------


def deal_equal_counts(costs: Sequence[float], bins: int) -> list[list[int]]:
    """LPT with the same number of items per bin (len(costs) / bins each): items in decreasing cost (ties: lower
    index), each to the least-loaded bin with room (ties: lower bin). The data pipeline's `deal`, on costs."""
    if len(costs) % bins:
        raise ValueError(f"{len(costs)} packs do not split over {bins} DP ranks")
    per_bin = len(costs) // bins
    load = [0.0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min((r for r in range(bins) if len(out[r]) < per_bin), key=lambda r: (load[r], r))
        out[b].append(i)
        load[b] += costs[i]
    return [sorted(ix) for ix in out]


def level2_bound(costs: Sequence[float], bins: int) -> float:
    """mean + largest item: what `deal_equal_counts` keeps every bin under."""
    if not costs:
        return 0.0
    return sum(costs) / bins + max(costs)


def linear_pack_cost(tokens: float, patches: float, patch_cost: float) -> float:
    """The data pipeline's pack cost (`PlannedPack.cost`)."""
    return tokens + patch_cost * patches


def deal_packs(packs: Sequence, bins: int, cost: Callable[[object], float]) -> list[list]:
    """Level 2 on objects: `cost(pack)` seconds (or any unit); returns the packs per bin in their order."""
    assignment = deal_equal_counts([cost(p) for p in packs], bins)
    return [[packs[i] for i in ix] for ix in assignment]
