"""Streaming statistics of edge values and the threshold (clipping range) choices built on them.

Memory is bounded: an observer keeps running min/max, per-batch averages and a
fixed-size histogram, never the activations themselves.

Range methods (``method`` strings):

* ``minmax``: the observed min and max;
* ``avg_range``: HAGO's default, the mean over batches of each batch's min and max;
* ``percentile[:p]``: the p-th percentile of values (default 99.99), both tails;
* ``kl`` / ``entropy``: TensorRT's KL-divergence threshold search on the histogram; with small calibration
  sets it can clip a ReLU output far too hard (docs/BENCHMARKS.md, issue 2: on 4 and 7 of ten 128-digit
  sets of two MNIST models), so prefer ``auto``, which scores it against the other methods;
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


# TensorRT's KL search is chaotic in the histogram's bin edges (on mnist_mobilenetv2, 2040 or 2056 bins
# instead of 2048 move one threshold from 3.9 to 0.7 and top-1 from 97.8 to 73-75 %): it gets the histogram a
# second pass builds on the final [min, max], not the one-pass streaming one.
EXACT_HIST_METHODS = ("kl", "entropy")


def needs_histogram(method: str) -> bool:
    return method_name(method) in HIST_METHODS


def needs_exact_histogram(method: str) -> bool:
    """Whether ``method`` reads a histogram on exactly the final range (a second pass over the data)."""
    return method_name(method) in EXACT_HIST_METHODS


class EdgeObserver:
    """Running statistics of one edge.

    With ``histogram=True`` :meth:`update` also fills a histogram in the same
    pass (one run of the model feeds every method). That streaming histogram
    has ``FINE`` times more bins than ``bins``; it starts on the first batch's
    range and, when a later batch falls outside, grows by merging an integer
    number of adjacent bins (counts are only summed, never split). Read back
    (``hist``/``edges``), it is re-binned to ``bins`` bins on exactly the
    observed ``[min(min, 0), max(max, 0)]``, the histogram a second pass on the
    final range would give up to a fraction of a bin at bin boundaries.
    :meth:`start_histogram` / :meth:`update_histogram` are that second pass.
    """

    FINE = 4

    def __init__(self, name: str, bins: int = 2048, histogram: bool = False):
        self.name = name
        self.bins = bins
        self.min = np.inf
        self.max = -np.inf
        self.sum_min = 0.0
        self.sum_max = 0.0
        self.batches = 0
        self.count = 0
        self._hist: np.ndarray | None = None  # counts on self._edges (fine bins while streaming)
        self._edges: np.ndarray | None = None
        self.streaming = histogram
        self._zeros = 0  # values of all-zero batches seen before the streaming histogram had a range
        self._view = None  # cached (hist, edges) on the observed range

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
        if self.streaming:
            self._stream(x, min(lo, 0.0), max(hi, 0.0))

    # -- histograms ----------------------------------------------------------------------
    @property
    def hist(self) -> np.ndarray | None:
        return self._histogram()[0]

    @property
    def edges(self) -> np.ndarray | None:
        return self._histogram()[1]

    def _histogram(self):
        if not self.streaming:
            return self._hist, self._edges
        if self._view is None:
            if self._hist is None and not self._zeros:
                return None, None
            lo, hi = min(self.min, 0.0), max(self.max, 0.0)
            if hi <= lo:
                hi = lo + 1e-8
            edges = np.linspace(lo, hi, self.bins + 1, dtype=np.float64)
            if self._hist is None:  # every value was 0
                hist = np.zeros(self.bins, dtype=np.float64)
                hist[0] = self._zeros
            else:  # each fine bin goes whole to the final bin holding its center
                centers = 0.5 * (self._edges[:-1] + self._edges[1:])
                idx = np.clip(((centers - lo) * (self.bins / (hi - lo))).astype(np.int64), 0, self.bins - 1)
                hist = np.bincount(idx, weights=self._hist, minlength=self.bins)
            self._view = (hist, edges)
        return self._view

    def start_histogram(self) -> None:
        """Start a fixed-range histogram on the observed [min, max] (second pass of the two-pass mode)."""
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if hi <= lo:
            hi = lo + 1e-8
        self._edges = np.linspace(lo, hi, self.bins + 1, dtype=np.float64)
        self._hist = np.zeros(self.bins, dtype=np.float64)
        self.streaming, self._view, self._zeros = False, None, 0

    def update_histogram(self, x: np.ndarray) -> None:
        """Second pass: bin ``x`` on the fixed range (float64 index arithmetic)."""
        lo, hi = self._edges[0], self._edges[-1]
        idx = ((np.asarray(x, dtype=np.float64).ravel() - lo) * (self.bins / (hi - lo))).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self._hist += np.bincount(idx, minlength=self.bins)

    def _accumulate(self, x: np.ndarray, inside: bool) -> None:
        """Add ``x`` to the stored histogram; ``inside``: all values are within its edges (else the end bins
        take what lies outside)."""
        bins = len(self._hist)
        lo, hi = self._edges[0], self._edges[-1]
        # float32 index arithmetic (a value may land one bin off at a boundary: ~1e-7 relative); truncation
        # toward zero sends rounding below 0 to bin 0, and index ``bins`` (the maximum) joins the last bin
        f = np.float32(bins / (hi - lo))
        idx = x.ravel() * f
        if lo != 0.0:
            idx -= np.float32(lo * f)
        if not inside:
            np.clip(idx, 0, bins - 1, out=idx)
        h = np.bincount(idx.astype(np.intp), minlength=bins + 1)
        h[bins - 1] += h[bins:].sum()
        self._hist += h[:bins]

    def _stream(self, x: np.ndarray, lo: float, hi: float) -> None:
        self._view = None
        if self._hist is None:
            if hi <= lo:  # all zeros so far: no scale for the histogram yet
                self._zeros += x.size
                return
            n = self.bins * self.FINE
            self._edges = np.linspace(lo, hi, n + 1, dtype=np.float64)
            self._hist = np.zeros(n, dtype=np.float64)
            if self._zeros:
                self._hist[self._bin_of(0.0)] += self._zeros
                self._zeros = 0
        elif lo < self._edges[0] or hi > self._edges[-1]:
            self._grow(lo, hi)
        self._accumulate(x, inside=True)

    def _bin_of(self, v: float) -> int:
        e0, e1, n = self._edges[0], self._edges[-1], len(self._hist)
        return int(min(max((v - e0) / (e1 - e0) * n, 0), n - 1))

    def _grow(self, lo: float, hi: float) -> None:
        """Widen the stored histogram to cover [lo, hi]: new bin j holds old bins [j*k - m, (j+1)*k - m)."""
        n = len(self._hist)
        e0, e1 = float(self._edges[0]), float(self._edges[-1])
        w = (e1 - e0) / n
        if max(e0 - lo, hi - e1) / w > 2.0**40:  # the old range is a point at the new scale
            total = self._hist.sum()
            self._edges = np.linspace(min(lo, e0), max(hi, e1), n + 1, dtype=np.float64)
            self._hist = np.zeros(n, dtype=np.float64)
            self._hist[self._bin_of(0.5 * (e0 + e1))] += total
            return
        m = int(np.ceil((e0 - min(lo, e0)) / w - 1e-9))
        new_lo = e0 - m * w
        k = max(1, int(np.ceil((max(hi, e1) - new_lo) / (n * w) - 1e-9)))
        while new_lo + k * n * w < max(hi, e1):
            k += 1
        idx = (np.arange(n, dtype=np.int64) + m) // k
        self._hist = np.bincount(idx, weights=self._hist, minlength=n)[:n]
        self._edges = np.linspace(new_lo, new_lo + k * n * w, n + 1, dtype=np.float64)

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
        hist, edges = self._histogram()
        if hist is None:
            raise CalibrationError(f"edge {self.name!r}: method {method!r} needs a histogram pass")
        dlo, dhi = min(self.min, 0.0), max(self.max, 0.0)
        if name == "percentile":
            p = float(arg) if arg else 99.99
            lo, hi = percentile_range(hist, edges, p)
        elif name in ("kl", "entropy"):
            lo, hi = kl_range(hist, edges, ann)
        elif name in ("mse", "lp"):
            centers = 0.5 * (edges[:-1] + edges[1:])
            lo, hi = lp_range(hist, centers, ann, float(arg) if (name == "lp" and arg) else 2.0)
        else:
            raise CalibrationError(f"unknown calibration method {method!r}; use minmax, avg_range, percentile[:p], "
                                   "kl, mse or lp:<p>")
        # a threshold never goes past what was observed (the histogram may extend beyond it)
        return float(min(max(lo, dlo), 0.0)), float(max(min(hi, dhi), 0.0))


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
    non-negative ones; the negative end is scaled with the same ratio. All
    candidate thresholds are scored at once (:func:`kl_search`).
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
        h, top = np.asarray(hist, dtype=np.float64).copy(), hi
    # exact zeros (the ReLU spike) are represented exactly at any threshold: leave them out of the divergence
    h[0] = 0  # bin 0 holds |x| < top/bins, which rounds to 0 at any threshold considered
    nq = 2 ** (ann.bits - 1) if ann.signed or (lo < 0 < hi) else 2**ann.bits
    nq = min(nq, bins)
    if h.sum() <= 0:
        return float(min(lo, 0)), float(hi)
    best_i = kl_search(h, nq, max(stride, (bins - nq) // 128))
    thr = top * best_i / bins
    if lo < 0 < hi:  # shrink both ends by the same ratio
        ratio = best_i / bins
        return float(lo * ratio), float(hi * ratio)
    return float(min(lo, 0.0)), float(thr)


def kl_search(h: np.ndarray, nq: int, step: int) -> int:
    """The bin count ``i`` (of ``range(nq, len(h) + 1, step)``) minimizing KL(P || Q) (TensorRT's entropy
    calibration): P is ``h[:i]`` with the tail added to its last bin; Q merges ``h[:i]`` into ``nq`` bins and
    spreads each merged count evenly over its nonzero bins. Vectorized over all candidates with prefix sums."""
    h = np.asarray(h, dtype=np.float64)
    B = len(h)
    cand = np.arange(nq, B + 1, step, dtype=np.int64)
    total = h.sum()
    C = np.concatenate([[0.0], np.cumsum(h)])
    NZ = np.concatenate([[0.0], np.cumsum(h > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        H = np.concatenate([[0.0], np.cumsum(np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0))])
    bounds = np.linspace(0, cand, nq + 1).astype(np.int64).T  # (candidates, nq + 1), as the per-i merge
    S = C[bounds[:, 1:]] - C[bounds[:, :-1]]  # merged sums
    N = NZ[bounds[:, 1:]] - NZ[bounds[:, :-1]]  # nonzero bins per merged bin
    avg = np.where(N > 0, S / np.maximum(N, 1), 0.0)
    qs = C[cand]
    ok = qs > 0
    qs1 = np.where(ok, qs, 1.0)
    last = h[cand - 1]
    S[:, -1] -= last  # P's bins before the last one
    lq = np.log(np.maximum(avg / qs1[:, None], 1e-12))
    kl = (H[cand - 1] - np.log(total) * C[cand - 1] - (S * lq).sum(axis=1)) / total
    pl = last + (total - C[cand])  # P's last bin: its count plus the clipped tail
    ql = np.where(last > 0, avg[:, -1], 0.0) / qs1
    with np.errstate(divide="ignore", invalid="ignore"):
        kl += np.where(pl > 0, (pl / total) * np.log(np.where(pl > 0, pl / total, 1.0) / np.maximum(ql, 1e-12)), 0.0)
    kl = np.where(ok, kl, np.inf)
    if not np.isfinite(kl).any():
        return B
    return int(cand[int(np.argmin(kl))])


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
