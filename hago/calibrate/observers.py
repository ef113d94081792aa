"""Streaming statistics of edge values and the threshold (clipping range) choices built on them.

Memory is bounded: an observer keeps running min/max, per-batch averages and a
fixed-size histogram, never the activations themselves.

Range methods (``method`` strings):

* ``minmax``: the observed min and max;
* ``avg_range``: HAGO's default, the mean over batches of each batch's min and max;
* ``percentile[:p]``: the p-th percentile of values (default 99.99), both tails;
* ``kl`` / ``entropy``: TensorRT's KL-divergence threshold search on the histogram;
* ``mse``: the clipping range with the lowest expected squared quantization error;
* ``lp:<p>``: the range minimizing the expected ``|error|^p`` (LAPQ's Lp-optimal clipping).
"""
from __future__ import annotations

import numpy as np

from ..errors import CalibrationError
from ..ir.annotation import EdgeAnnotation

HIST_METHODS = ("percentile", "kl", "entropy", "mse", "lp")


def method_name(method: str) -> str:
    return method.split(":", 1)[0]


def needs_histogram(method: str) -> bool:
    return method_name(method) in HIST_METHODS


class EdgeObserver:
    """Running statistics of one edge."""

    def __init__(self, name: str, bins: int = 2048):
        self.name = name
        self.bins = bins
        self.min = np.inf
        self.max = -np.inf
        self.sum_min = 0.0
        self.sum_max = 0.0
        self.batches = 0
        self.count = 0
        self.hist: np.ndarray | None = None
        self.edges: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        x = np.asarray(x, dtype=np.float32)
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise CalibrationError(f"edge {self.name!r}: NaN/Inf values appear in the float model's activations")
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.sum_min += lo
        self.sum_max += hi
        self.batches += 1
        self.count += x.size

    def start_histogram(self) -> None:
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if hi <= lo:
            hi = lo + 1e-8
        self.edges = np.linspace(lo, hi, self.bins + 1, dtype=np.float64)
        self.hist = np.zeros(self.bins, dtype=np.float64)

    def update_histogram(self, x: np.ndarray) -> None:
        lo, hi = self.edges[0], self.edges[-1]
        idx = ((np.asarray(x, dtype=np.float64).ravel() - lo) * (self.bins / (hi - lo))).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=self.bins)

    # -- ranges ------------------------------------------------------------------------
    def range(self, method: str, ann: EdgeAnnotation) -> tuple[float, float]:
        if self.batches == 0:
            raise CalibrationError(f"edge {self.name!r} saw no data during calibration")
        name = method_name(method)
        arg = method.split(":", 1)[1] if ":" in method else None
        if name == "minmax":
            return self.min, self.max
        if name == "avg_range":
            return self.sum_min / self.batches, self.sum_max / self.batches
        if self.hist is None:
            raise CalibrationError(f"edge {self.name!r}: method {method!r} needs a histogram pass")
        centers = 0.5 * (self.edges[:-1] + self.edges[1:])
        if name == "percentile":
            p = float(arg) if arg else 99.99
            return percentile_range(self.hist, self.edges, p)
        if name in ("kl", "entropy"):
            return kl_range(self.hist, self.edges, ann)
        if name == "mse":
            return lp_range(self.hist, centers, ann, 2.0)
        if name == "lp":
            return lp_range(self.hist, centers, ann, float(arg) if arg else 2.0)
        raise CalibrationError(f"unknown calibration method {method!r}; use minmax, avg_range, percentile[:p], kl, mse or lp:<p>")


def percentile_range(hist, edges, p: float) -> tuple[float, float]:
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    lo_i = int(np.searchsorted(cdf, (100.0 - p) / 100.0))
    hi_i = int(np.searchsorted(cdf, p / 100.0))
    lo = edges[lo_i] if edges[0] < 0 else edges[0]
    return float(min(lo, 0.0)), float(edges[min(hi_i + 1, len(edges) - 1)])


def _grid_candidates(lo: float, hi: float, n: int = 100):
    r = np.linspace(1.0 / n, 1.0, n)
    return lo * r, hi * r


def quant_error(values: np.ndarray, weights: np.ndarray, los: np.ndarray, his: np.ndarray,
                ann: EdgeAnnotation, p: float) -> np.ndarray:
    """Expected ``|x - fq(x)|^p`` of weighted values for each candidate range (vectorized)."""
    tmp = ann.copy()
    scale, zp = _qparams_vec(los, his, tmp)
    x = values[None, :]
    q = np.clip(np.rint(x / scale[:, None]) + zp[:, None], tmp.qmin, tmp.qmax)
    err = np.abs((q - zp[:, None]) * scale[:, None] - x) ** p
    return (err * weights[None, :]).sum(axis=1)


def _qparams_vec(los, his, ann: EdgeAnnotation):
    from ..ir.annotation import range_to_qparams

    s, z = range_to_qparams(los, his, ann)
    return np.asarray(s, dtype=np.float64), np.asarray(z, dtype=np.float64)


def lp_range(hist, centers, ann: EdgeAnnotation, p: float) -> tuple[float, float]:
    nz = hist > 0
    values, weights = centers[nz], hist[nz]
    lo, hi = min(centers[0], 0.0), max(centers[-1], 0.0)
    los, his = _grid_candidates(lo, hi)
    err = quant_error(values, weights, los, his, ann, p)
    best = int(np.argmin(err))
    return float(los[best]), float(his[best])


def kl_range(hist, edges, ann: EdgeAnnotation, stride: int = 8) -> tuple[float, float]:
    """TensorRT-style entropy calibration: the clipping threshold minimizing KL(P || Q).

    Works on |x| for signed/symmetric edges and on the positive side for
    non-negative ones; the negative end is scaled with the same ratio.
    """
    bins = len(hist)
    lo, hi = edges[0], edges[-1]
    if lo < 0 < hi:  # fold to |x|
        amax = max(-lo, hi)
        centers = 0.5 * (edges[:-1] + edges[1:])
        idx = np.clip((np.abs(centers) / amax * bins).astype(np.int64), 0, bins - 1)
        h = np.bincount(idx, weights=hist, minlength=bins)
        top = amax
    else:
        h, top = hist.copy(), hi
    # exact zeros (the ReLU spike) are represented exactly at any threshold: leave them out of the divergence
    h[0] = 0  # bin 0 holds |x| < top/bins, which rounds to 0 at any threshold considered
    nq = 2 ** (ann.bits - 1) if ann.signed or (lo < 0 < hi) else 2**ann.bits
    nq = min(nq, bins)
    best_kl, best_i = np.inf, bins
    total = h.sum()
    if total <= 0:
        return float(min(lo, 0)), float(hi)
    step = max(stride, (bins - nq) // 128)
    for i in range(nq, bins + 1, step):
        src = h[:i]
        p = src.astype(np.float64).copy()
        p[-1] += h[i:].sum()
        # merge the i reference bins into nq quantized bins, then spread each back over its nonzero bins
        starts = np.linspace(0, i, nq + 1).astype(np.int64)[:-1]
        nz = (src > 0).astype(np.float64)
        sums = np.add.reduceat(src, starts)
        counts = np.add.reduceat(nz, starts)
        lengths = np.diff(np.append(starts, i))
        q = np.repeat(np.where(counts > 0, sums / np.maximum(counts, 1), 0.0), lengths) * nz
        ps, qs = p.sum(), q.sum()
        if qs <= 0:
            continue
        pn, qn = p / ps, q / qs
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    thr = top * best_i / bins
    if lo < 0 < hi:  # shrink both ends by the same ratio
        ratio = best_i / bins
        return float(lo * ratio), float(hi * ratio)
    return float(min(lo, 0.0)), float(thr)


def weight_range(w: np.ndarray, ann: EdgeAnnotation, method: str = "minmax"):
    """Per-tensor or per-channel range of a constant weight."""
    w = np.asarray(w, dtype=np.float32)
    if ann.axis is not None:
        wc = np.moveaxis(w, ann.axis, 0).reshape(w.shape[ann.axis], -1)
    else:
        wc = w.reshape(1, -1)
    lo, hi = wc.min(axis=1).astype(np.float64), wc.max(axis=1).astype(np.float64)
    name = method_name(method)
    if name in ("mse", "lp"):
        p = float(method.split(":", 1)[1]) if ":" in method else 2.0
        lo, hi = _weight_lp(wc, lo, hi, ann, p)
    elif name not in ("minmax", "avg_range", "percentile", "kl", "entropy"):
        raise CalibrationError(f"unknown weight calibration method {method!r}; use minmax, mse or lp:<p>")
    if ann.axis is None:
        return float(lo[0]), float(hi[0])
    return lo, hi


def _weight_lp(wc, lo, hi, ann: EdgeAnnotation, p: float, n: int = 80):
    """Per-channel Lp-optimal clipping by grid search over shrink ratios (vectorized over channels)."""
    ratios = np.linspace(0.2, 1.0, n)
    best_err = np.full(wc.shape[0], np.inf)
    best_lo, best_hi = lo.copy(), hi.copy()
    tmp = ann.copy(axis=None)
    for r in ratios:
        l, h = lo * r, hi * r
        s, z = _qparams_vec(l, h, tmp)
        q = np.clip(np.rint(wc / s[:, None]) + z[:, None], tmp.qmin, tmp.qmax)
        err = (np.abs((q - z[:, None]) * s[:, None] - wc) ** p).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_lo = np.where(better, l, best_lo)
        best_hi = np.where(better, h, best_hi)
    return best_lo, best_hi
