"""Cost model of the heterogeneous ViT/LM scheduler: seconds for ViT frames, LM packs and embedding transfers.

Pure functions over plain numbers (no torch, no keye_train): the balancer (`parallel/balance.py`), the simulator
(`parallel/simulate.py`) and `keye-train plan` read the same rates.

One *term* is the time of one module call over a list of segments (a ViT frame of p patches, an LM document
of s tokens) on one GPU:

    t = per_item_s * sum(s_i) + per_item_sq_s * sum(s_i^2) + per_segment_s * len(s) + fixed_s

The ViT and the LM each have a per-layer term, forward and forward + backward, and an `ends` term per call
(ViT: patch embedding, position interpolation, 2D RoPE, 2x2 merge and projector; LM: token embedding, LM head and
cross-entropy). Recompute re-runs the forward of a layer in backward: factor 1 (full), a fraction (selective),
0 (none). The rates live in `parallel/calibration/<device>.json`, measured by `benchmarks/hetero_rates.py`
with their provenance; `load_rates` reads them.

Fitting (`fit_term`) is a non-negative least squares on relative errors, so that small points count as much
as large ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
TERM_KEYS = ("per_item_s", "per_item_sq_s", "per_segment_s", "fixed_s")
# Achieved per-GPU transfer rates assumed until a multi-GPU kind measures them (NCCL tests): NVLink 4 within an
# H100/H200 node, one 400 Gb/s InfiniBand NIC per GPU between nodes.
DEFAULT_LINKS = {
    "intra_node": {"bandwidth_bytes_per_s": 150e9, "latency_s": 10e-6},
    "inter_node": {"bandwidth_bytes_per_s": 40e9, "latency_s": 25e-6},
}


@dataclass(frozen=True)
class Term:
    """Seconds of one call over segments of `sizes` items: linear, quadratic, per-segment and fixed parts."""

    per_item_s: float = 0.0
    per_item_sq_s: float = 0.0
    per_segment_s: float = 0.0
    fixed_s: float = 0.0

    def __call__(self, sizes) -> float:
        sizes = list(sizes)
        if not sizes:
            return 0.0
        n = sum(sizes)
        sq = sum(s * s for s in sizes)
        return self.per_item_s * n + self.per_item_sq_s * sq + self.per_segment_s * len(sizes) + self.fixed_s

    def of_totals(self, items: float, items_sq: float, segments: float, calls: float = 1.0) -> float:
        """The same from precomputed sums (profiles carry sums, not every segment)."""
        return (
            self.per_item_s * items
            + self.per_item_sq_s * items_sq
            + self.per_segment_s * segments
            + self.fixed_s * calls
        )

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in TERM_KEYS}

    @classmethod
    def from_dict(cls, d: dict) -> Term:
        return cls(**{k: float(d.get(k, 0.0)) for k in TERM_KEYS})


@dataclass(frozen=True)
class ModuleRates:
    """One module (the ViT or the LM): per-layer and per-call terms, forward and forward + backward."""

    layers: int
    layer_fwd: Term
    layer_fwd_bwd: Term
    ends_fwd: Term = field(default_factory=Term)
    ends_fwd_bwd: Term = field(default_factory=Term)

    def time(self, sizes, recompute: float = 0.0, layers: float | None = None, ends: bool = True) -> float:
        """Forward + backward of `layers` layers (default all) over `sizes`, recompute re-running `recompute`
        of each layer's forward; `ends` adds the per-call term."""
        sizes = list(sizes)
        n = self.layers if layers is None else layers
        t = n * (self.layer_fwd_bwd(sizes) + recompute * self.layer_fwd(sizes))
        return t + (self.ends_fwd_bwd(sizes) if ends else 0.0)

    def time_of_totals(
        self, items, items_sq, segments, calls=1.0, recompute=0.0, layers=None, ends=True, forward_only=False
    ) -> float:
        n = self.layers if layers is None else layers
        if forward_only:
            t = n * self.layer_fwd.of_totals(items, items_sq, segments, calls)
            return t + (self.ends_fwd.of_totals(items, items_sq, segments, calls) if ends else 0.0)
        t = n * (
            self.layer_fwd_bwd.of_totals(items, items_sq, segments, calls)
            + recompute * self.layer_fwd.of_totals(items, items_sq, segments, calls)
        )
        return t + (self.ends_fwd_bwd.of_totals(items, items_sq, segments, calls) if ends else 0.0)

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "layer_fwd": self.layer_fwd.as_dict(),
            "layer_fwd_bwd": self.layer_fwd_bwd.as_dict(),
            "ends_fwd": self.ends_fwd.as_dict(),
            "ends_fwd_bwd": self.ends_fwd_bwd.as_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModuleRates:
        return cls(
            layers=int(d["layers"]),
            layer_fwd=Term.from_dict(d["layer_fwd"]),
            layer_fwd_bwd=Term.from_dict(d["layer_fwd_bwd"]),
            ends_fwd=Term.from_dict(d.get("ends_fwd", {})),
            ends_fwd_bwd=Term.from_dict(d.get("ends_fwd_bwd", {})),
        )


@dataclass(frozen=True)
class LinkRates:
    """A point-to-point or collective transfer: latency + bytes / bandwidth (per GPU)."""

    bandwidth_bytes_per_s: float = 25e9
    latency_s: float = 20e-6

    def time(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class Rates:
    """Everything the simulator needs about one device kind."""

    vit: ModuleRates
    lm: ModuleRates
    intra_node: LinkRates = field(default_factory=lambda: LinkRates(**DEFAULT_LINKS["intra_node"]))
    inter_node: LinkRates = field(default_factory=lambda: LinkRates(**DEFAULT_LINKS["inter_node"]))
    tp_efficiency: float = 0.8  # LM compute at TP t runs at t * tp_efficiency the one-GPU rate (SP and TP comms)
    ep_overhead: float = 0.1  # extra LM-layer time for the EP all-to-alls, relative to the layer's compute
    optimizer_s_per_param: float = 0.0  # the optimizer step, seconds per locally held parameter element
    device: str = "unknown"
    provenance: dict = field(default_factory=dict)

    def link(self, inter_node: bool) -> LinkRates:
        return self.inter_node if inter_node else self.intra_node


# ---- reading and writing calibration files ----------------------------------------------------------------------


def rates_from_dict(d: dict) -> Rates:
    links = d.get("links", {})
    scaling = d.get("scaling", {})
    return Rates(
        vit=ModuleRates.from_dict(d["vit"]),
        lm=ModuleRates.from_dict(d["lm"]),
        intra_node=LinkRates(**links.get("intra_node", DEFAULT_LINKS["intra_node"])),
        inter_node=LinkRates(**links.get("inter_node", DEFAULT_LINKS["inter_node"])),
        tp_efficiency=float(scaling.get("tp_efficiency", 0.8)),
        ep_overhead=float(scaling.get("ep_overhead", 0.1)),
        optimizer_s_per_param=float(d.get("optimizer", {}).get("s_per_param", 0.0)),
        device=d.get("device", "unknown"),
        provenance=d.get("provenance", {}),
    )


def rates_to_dict(rates: Rates) -> dict:
    return {
        "device": rates.device,
        "provenance": rates.provenance,
        "vit": rates.vit.as_dict(),
        "lm": rates.lm.as_dict(),
        "links": {
            "intra_node": vars(rates.intra_node).copy(),
            "inter_node": vars(rates.inter_node).copy(),
        },
        "scaling": {"tp_efficiency": rates.tp_efficiency, "ep_overhead": rates.ep_overhead},
        "optimizer": {"s_per_param": rates.optimizer_s_per_param},
    }


def load_rates(device: str | Path = "h200") -> Rates:
    """`parallel/calibration/<device>.json`, or a path to such a file."""
    path = Path(device)
    if not path.suffix:
        path = CALIBRATION_DIR / f"{device}.json"
    return rates_from_dict(json.loads(path.read_text()))


# ---- fitting ---------------------------------------------------------------------------------------------------


def term_features(sizes) -> list[float]:
    """The regressors of a Term, in TERM_KEYS order."""
    sizes = list(sizes)
    return [float(sum(sizes)), float(sum(s * s for s in sizes)), float(len(sizes)), 1.0]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting on a small square system (singular columns -> 0)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            continue
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col and m[r][col] != 0.0:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] if abs(m[i][i]) > 1e-300 else 0.0 for i in range(n)]


def nnls(rows: list[list[float]], targets: list[float], weights: list[float] | None = None) -> list[float]:
    """Non-negative weighted least squares by active-set elimination (a handful of columns): solve the normal
    equations on the free columns, drop the most negative coefficient, repeat."""
    k = len(rows[0])
    weights = weights or [1.0] * len(rows)
    free = [j for j in range(k) if any(r[j] != 0.0 for r in rows)]
    while free:
        # scale columns so the normal equations stay well conditioned (items^2 dwarfs the fixed column)
        scale = [max(abs(r[j]) for r in rows) or 1.0 for j in free]
        a = [[0.0] * len(free) for _ in free]
        b = [0.0] * len(free)
        for row, y, w in zip(rows, targets, weights):
            x = [row[j] / s for j, s in zip(free, scale)]
            for p in range(len(free)):
                b[p] += w * x[p] * y
                for q in range(len(free)):
                    a[p][q] += w * x[p] * x[q]
        coef = [c / s for c, s in zip(_solve(a, b), scale)]
        worst = min(range(len(free)), key=lambda p: coef[p])
        if coef[worst] >= 0.0:
            out = [0.0] * k
            for j, c in zip(free, coef):
                out[j] = c
            return out
        free.pop(worst)
    return [0.0] * k


def fit_term(points: list[tuple[list[int], float]], use=TERM_KEYS) -> tuple[Term, float]:
    """Fit a Term to (segment sizes, seconds) points, relative least squares; returns (term, max relative error).
    `use`: the coefficients allowed to be non-zero."""
    rows, targets, weights = [], [], []
    for sizes, seconds in points:
        if not (seconds > 0 and math.isfinite(seconds)):
            continue
        rows.append([f if key in use else 0.0 for f, key in zip(term_features(sizes), TERM_KEYS)])
        targets.append(seconds)
        weights.append(1.0 / seconds**2)
    if not rows:
        return Term(), float("nan")
    term = Term(**dict(zip(TERM_KEYS, nnls(rows, targets, weights))))
    worst = max(abs(term(s) - t) / t for (s, t) in points if t > 0 and math.isfinite(t))
    return term, worst
