"""Multipoint quantization of weights (array-level core).

Liu, Ye, Zhou, Liu, "Post-training Quantization with Multiple Points: Mixed
Precision without Mixed Precision", AAAI 2021 (arXiv 2002.09049).

Each output channel's weight vector ``w_c`` is approximated by a sum of ``n``
terms, each a real scale times a low-bit integer vector::

    w_c  ~=  sum_{i=1..n}  a_{c,i} * q_{c,i},   q_{c,i} in {-Q..Q}^K,  Q = 2**(bits-1) - 1

Greedy construction (the paper's procedure): start with the residual
``r = w_c``; at step ``i`` find the single-point quantization of ``r`` with the
lowest L2 error, ``min_{a, q} ||r - a q||``, add ``a q`` to the
approximation and set ``r <- r - a q``.  The single-point problem is solved by
a search over candidate step sizes ``s`` (``s = t * max|r| / Q`` for ``t`` on a
grid of ``grid`` values in ``(0, 1]``, always including ``t = 1``, i.e. the
max-abs step): codes ``q = clip(rint(r / s), -Q, Q)``, then the scale is the
least-squares optimum for these codes, ``a = <r, q> / <q, q>`` (``refine_ls``;
without it ``a = s``), and the candidate with the lowest ``||r - a q||`` wins.
Each step therefore never increases the error, and ``n = 1`` with
``scale_search="maxabs", refine_ls=False`` is exactly plain symmetric
per-channel quantization.  Deviation, documented: the paper's exact candidate
grid for ``a`` could not be read here; the grid above contains the max-abs step
so the result is never worse than it.

Adaptive number of points (:func:`allocate_points`): every channel starts with
one point; repeatedly, the channel whose next point gives the largest
reduction of its *output* error on calibration inputs (per unit cost) gets one
more point, until the average number of points reaches the budget.  This gives
the effect of mixed precision with one low-bit operand type: a layer with
``n`` points is ``n`` ordinary low-bit convolutions/matmuls whose per-channel
rescaled outputs are summed (:meth:`MultiPoint.as_split_weights`), or one
layer with ``n`` times the output channels followed by a weighted sum
(:meth:`MultiPoint.as_stacked_weight`).

Network-wide allocation (:func:`allocate_points_global`, an option of the graph
pass): the same greedy rule over the channels of *all* layers at once, a point
of a channel costing that channel's MACs, the per-channel output errors of
each layer multiplied by a layer weight that makes layers comparable (1 / the
layer's output energy, optionally times a measured sensitivity of the network
output to that layer). The paper's abstract says only that the number of
points of each weight vector is decided "based on the error of its output";
whether its budget is per layer or network-wide could not be read here, so
both are offered.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hago.errors import CalibrationError, ModelError, SpecError

__all__ = [
    "MultiPoint",
    "multipoint",
    "quantize_per_channel",
    "output_error",
    "multipoint_output_errors",
    "allocate_points",
    "multipoint_adaptive",
    "allocate_points_global",
]


def _qmax(bits: int) -> int:
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
        raise SpecError(f"bits must be an integer in 2..16, got {bits!r}", path="multipoint.bits")
    return (1 << (int(bits) - 1)) - 1


def _code_dtype(bits: int):
    return np.int8 if bits <= 8 else np.int16


def _check_weight(w, axis: int):
    w = np.asarray(w)
    if w.ndim < 1 or w.dtype.kind != "f":
        raise ModelError(f"multipoint expects a floating-point weight array, got {w.dtype} of shape {w.shape}")
    if w.size and not np.all(np.isfinite(w)):
        raise ModelError("weight has NaN/Inf")
    if not -w.ndim <= axis < w.ndim:
        raise SpecError(f"channel axis {axis} is out of range for a weight of shape {w.shape}",
                        path="multipoint.axis")
    return w, axis % w.ndim


def _to_rows(a: np.ndarray, axis: int) -> np.ndarray:
    """[..., C at axis, ...] -> [C, K] (float64)."""
    m = np.moveaxis(a, axis, 0)
    return m.reshape(m.shape[0], -1)


def _from_rows(rows: np.ndarray, shape: tuple, axis: int) -> np.ndarray:
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return np.moveaxis(rows.reshape(moved), 0, axis)


@dataclass
class MultiPoint:
    """A multipoint-quantized weight.

    Attributes:
        alphas: float32 ``[C, n]``; ``alphas[c, i]`` scales point ``i`` of channel ``c``
            (0 for points a channel does not use).
        codes: integer ``[n, *weight.shape]``; ``codes[i]`` is the i-th low-bit
            integer weight tensor (0 where a channel does not use point ``i``).
        bits: code width (codes lie in ``-(2**(bits-1)-1) .. 2**(bits-1)-1``).
        axis: the output-channel axis of the weight.
        n_points: int ``[C]``, points used by each channel.
    """

    alphas: np.ndarray
    codes: np.ndarray
    bits: int
    axis: int
    n_points: np.ndarray

    @property
    def n(self) -> int:
        """Number of point tensors (the maximum over channels)."""
        return int(self.alphas.shape[1])

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape[1:])

    @property
    def avg_points(self) -> float:
        return float(np.mean(self.n_points))

    def _alpha_bcast(self, i: int) -> np.ndarray:
        shp = [1] * len(self.shape)
        shp[self.axis] = self.shape[self.axis]
        return self.alphas[:, i].astype(np.float32).reshape(shp)

    def dequantize(self, n_points=None) -> np.ndarray:
        """float32 weight ``sum_i alphas[:, i] * codes[i]`` (optionally truncated to ``n_points`` per channel)."""
        mp = self if n_points is None else self.truncate(n_points)
        out = np.zeros(mp.shape, dtype=np.float64)
        for i in range(mp.n):
            out += mp._alpha_bcast(i).astype(np.float64) * mp.codes[i]
        return out.astype(np.float32)

    def truncate(self, n_points) -> "MultiPoint":
        """Keep only the first ``n_points`` (int, or int array [C]) points of each channel.

        The greedy construction makes the first ``m`` points the ``m``-point
        multipoint approximation, so truncation is exact.
        """
        c = self.shape[self.axis]
        npc = np.broadcast_to(np.asarray(n_points, dtype=np.int64), (c,)).copy()
        if np.any(npc < 1) or np.any(npc > self.n_points):
            raise SpecError(f"n_points must lie in 1..available points per channel "
                            f"(max {self.n}), got {np.unique(npc).tolist()}", path="multipoint.n_points")
        keep = np.arange(self.n)[None, :] < npc[:, None]  # [C, n]
        alphas = np.where(keep, self.alphas, 0).astype(np.float32)
        kshape = [self.n] + [1] * len(self.shape)
        kshape[1 + self.axis] = c
        codes = np.where(keep.T.reshape(kshape), self.codes, 0).astype(self.codes.dtype)
        n_new = int(npc.max())
        return MultiPoint(alphas[:, :n_new], codes[:n_new], self.bits, self.axis, npc)

    def as_split_weights(self):
        """``(int_weights, scales)``: ``n`` integer tensors shaped like the weight and ``n`` scale vectors [C].

        ``W ~= sum_i scales[i][c] * int_weights[i]`` along the channel axis, so a
        conv/matmul is realized as ``y[c] = sum_i scales[i][c] * (x (*) int_weights[i])[c]``:
        ``n`` ordinary low-bit ops with per-channel requantization scales.
        Channels that use fewer points have zero scale and zero codes there.
        """
        return [self.codes[i].copy() for i in range(self.n)], \
            [self.alphas[:, i].astype(np.float32).copy() for i in range(self.n)]

    def as_stacked_weight(self):
        """``(w_int, scales)`` with the ``n`` point tensors concatenated along the channel axis.

        ``w_int`` has ``n * C`` channels (point-major: channel ``i * C + c`` is point
        ``i`` of channel ``c``) and ``scales`` is [n * C]; ``y[c] = sum_i
        scales[i*C + c] * y_int[i*C + c]`` -- one wide low-bit op and a weighted sum.
        """
        w_int = np.concatenate([self.codes[i] for i in range(self.n)], axis=self.axis)
        return w_int, self.alphas.T.reshape(-1).astype(np.float32)


def _best_single_point(r: np.ndarray, qmax: int, grid: int, refine_ls: bool):
    """Best ``a * q`` for each row of the residual ``r`` [C, K]. Returns (a [C], q [C, K] int, err [C])."""
    c = r.shape[0]
    amax = np.max(np.abs(r), axis=1)
    rr = np.einsum("ij,ij->i", r, r)
    base = np.where(amax > 0, amax / qmax, 1.0)
    ts = np.linspace(1.0 / grid, 1.0, grid) if grid > 1 else np.array([1.0])
    best_err = rr.copy()  # a = 0, q = 0
    best_a = np.zeros(c)
    best_q = np.zeros(r.shape, dtype=np.int64)
    for t in ts[::-1]:  # t = 1 (max-abs) first: it wins ties
        s = base * t
        q = np.clip(np.rint(r / s[:, None]), -qmax, qmax)
        if refine_ls:
            rq = np.einsum("ij,ij->i", r, q)
            qq = np.einsum("ij,ij->i", q, q)
            a = np.where(qq > 0, rq / np.where(qq > 0, qq, 1.0), 0.0)
            err = rr - a * rq
        else:
            a = s
            d = r - a[:, None] * q
            err = np.einsum("ij,ij->i", d, d)
        better = err < best_err
        if np.any(better):
            best_err = np.where(better, err, best_err)
            best_a = np.where(better, a, best_a)
            best_q[better] = q[better]
    return best_a, best_q, np.maximum(best_err, 0.0)


def multipoint(w, bits: int = 4, n_points: int = 2, axis: int = 0, grid: int = 100,
               refine_ls: bool = True, scale_search: str = "grid") -> MultiPoint:
    """Greedy multipoint quantization of ``w`` with ``n_points`` points per output channel.

    Args:
        w: float weight, output channels along ``axis`` (0 for Conv [O, I, kh, kw]
            and Gemm(transB=1) [O, I]; 1 for MatMul [I, O]).
        bits: width of each integer point (symmetric range ``-(2**(bits-1)-1)..2**(bits-1)-1``).
        n_points: points per channel.
        grid: number of candidate step sizes per step (``scale_search="grid"``).
        refine_ls: use the least-squares scale ``<r,q>/<q,q>`` for the chosen codes.
        scale_search: "grid" (see module doc) or "maxabs" (only ``max|r| / Q``).
    """
    qmax = _qmax(bits)
    w, axis = _check_weight(w, axis)
    if not isinstance(n_points, (int, np.integer)) or n_points < 1:
        raise SpecError(f"n_points must be a positive integer, got {n_points!r}", path="multipoint.n_points")
    if scale_search not in ("grid", "maxabs"):
        raise SpecError(f"scale_search must be 'grid' or 'maxabs', got {scale_search!r}",
                        path="multipoint.scale_search")
    g = 1 if scale_search == "maxabs" else int(grid)
    if g < 1:
        raise SpecError(f"grid must be >= 1, got {grid}", path="multipoint.grid")
    rows = _to_rows(w.astype(np.float64), axis)
    c = rows.shape[0]
    r = rows.copy()
    alphas = np.zeros((c, n_points), dtype=np.float32)
    codes = np.zeros((n_points,) + w.shape, dtype=_code_dtype(bits))
    for i in range(n_points):
        a, q, _ = _best_single_point(r, qmax, g, refine_ls)
        a32 = a.astype(np.float32)  # the stored scale is what the residual must use
        alphas[:, i] = a32
        codes[i] = _from_rows(q, w.shape, axis)
        r = r - a32.astype(np.float64)[:, None] * q
    return MultiPoint(alphas, codes, int(bits), axis, np.full(c, n_points, dtype=np.int64))


def quantize_per_channel(w, bits: int = 4, axis: int = 0):
    """Plain symmetric per-channel max-abs quantization: ``(codes, scale [C])`` with ``w ~= scale * codes``."""
    qmax = _qmax(bits)
    w, axis = _check_weight(w, axis)
    rows = _to_rows(w.astype(np.float64), axis)
    amax = np.max(np.abs(rows), axis=1)
    s = np.where(amax > 0, amax / qmax, 1.0)
    q = np.clip(np.rint(rows / s[:, None]), -qmax, qmax)
    return _from_rows(q, w.shape, axis).astype(_code_dtype(bits)), s.astype(np.float32)


def output_error(w, x_calib, approx, axis: int = 0) -> np.ndarray:
    """Per-output-channel mean squared output error on calibration inputs.

    ``err[c] = mean_n ( x_n . (w_c - approx_c) )**2`` with ``w_c`` the channel's
    weights flattened; for a linear layer ``x_calib`` is [N, in_features]; for a
    conv the caller passes im2col'd patches [N, I*kh*kw] in the weight's
    flattening order.  ``approx`` is an array like ``w`` or a :class:`MultiPoint`.
    """
    w, axis = _check_weight(w, axis)
    a = approx.dequantize() if isinstance(approx, MultiPoint) else np.asarray(approx)
    if a.shape != w.shape:
        raise ModelError(f"approximation shape {a.shape} differs from weight shape {w.shape}")
    d = _to_rows(w.astype(np.float64) - a.astype(np.float64), axis)
    x = np.asarray(x_calib, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != d.shape[1]:
        raise CalibrationError(f"x_calib must be [N, {d.shape[1]}] (inputs per output channel), "
                               f"got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise CalibrationError("x_calib contains NaN or Inf")
    y = x @ d.T  # [N, C]
    return np.mean(y * y, axis=0)


def multipoint_output_errors(mp: MultiPoint, w, x_calib) -> np.ndarray:
    """``errors[c, j]`` = output error of channel ``c`` with ``j + 1`` points (from one greedy run)."""
    cols = [output_error(w, x_calib, mp.dequantize(j), axis=mp.axis) for j in range(1, mp.n + 1)]
    return np.stack(cols, axis=1)


def allocate_points(errors, budget_avg: float, cost=None) -> np.ndarray:
    """Greedy allocation of points per channel under an average budget.

    Args:
        errors: ``[C, N]``; ``errors[c, j]`` is channel ``c``'s output error with
            ``j + 1`` points (e.g. from :func:`multipoint_output_errors`).
        budget_avg: allowed average number of points (cost-weighted), >= 1.
        cost: optional ``[C]`` cost of one point of each channel (default 1, e.g.
            the channel's MACs); the constraint is ``sum cost*n <= budget_avg * sum cost``.

    Every channel starts at 1 point; the channel with the largest error
    reduction per unit cost from one more point gets it, as long as it fits the
    budget and reduces the error; stops when no further point fits or helps.
    Returns int ``[C]`` points per channel.
    """
    e = np.asarray(errors, dtype=np.float64)
    if e.ndim != 2 or e.shape[1] < 1:
        raise SpecError(f"errors must be [channels, max_points], got shape {e.shape}",
                        path="multipoint.errors")
    c, nmax = e.shape
    cst = np.ones(c) if cost is None else np.broadcast_to(np.asarray(cost, dtype=np.float64), (c,)).copy()
    if np.any(cst <= 0):
        raise SpecError("point costs must be positive", path="multipoint.cost")
    if not budget_avg >= 1.0:
        raise SpecError(f"budget_avg must be >= 1 (every channel has one point), got {budget_avg}",
                        path="multipoint.budget_avg")
    n = np.ones(c, dtype=np.int64)
    budget = budget_avg * cst.sum()
    spent = cst.sum()
    eps = 1e-9 * max(budget, 1.0)
    ar = np.arange(c)
    while True:
        can = n < nmax
        nxt = np.minimum(n, nmax - 1)
        gain = np.where(can, e[ar, n - 1] - e[ar, nxt], -np.inf)
        ok = can & (gain > 0) & (spent + cst <= budget + eps)
        if not np.any(ok):
            break
        score = np.where(ok, gain / cst, -np.inf)
        j = int(np.argmax(score))
        n[j] += 1
        spent += cst[j]
    return n


def multipoint_adaptive(w, x_calib, bits: int = 4, budget_avg: float = 1.5, max_points: int = 4,
                        axis: int = 0, cost=None, **kwargs) -> MultiPoint:
    """Multipoint quantization with points allocated by output error under an average budget.

    Runs :func:`multipoint` with ``max_points``, measures every channel's output
    error on ``x_calib`` for 1..max_points points, allocates with
    :func:`allocate_points` and truncates.  ``kwargs`` go to :func:`multipoint`.
    """
    mp = multipoint(w, bits, max_points, axis, **kwargs)
    errs = multipoint_output_errors(mp, w, x_calib)
    return mp.truncate(allocate_points(errs, budget_avg, cost))


def allocate_points_global(errors, budget_avg: float, costs, scales=None) -> list:
    """One greedy allocation over the channels of several layers.

    Args:
        errors: list of ``[C_l, N]`` per-layer error tables (as for :func:`allocate_points`).
        budget_avg: cost-weighted average number of points over all channels of all layers.
        costs: list of ``[C_l]`` (or scalars) cost of one point of each channel, e.g. its MACs.
        scales: optional list of per-layer factors applied to that layer's errors
            (e.g. 1 / output energy, times a sensitivity); default 1.

    Returns a list of int ``[C_l]`` points per channel, one per layer. The
    constraint is ``sum_l sum_c cost * n <= budget_avg * sum_l sum_c cost``.
    """
    errors = [np.asarray(e, dtype=np.float64) for e in errors]
    if not errors:
        return []
    widths = {e.shape[1] if e.ndim == 2 else -1 for e in errors}
    if len(widths) != 1 or -1 in widths:
        raise SpecError("every layer's errors must be [channels, max_points] with the same max_points",
                        path="multipoint.errors")
    if len(costs) != len(errors) or (scales is not None and len(scales) != len(errors)):
        raise SpecError("errors, costs and scales need one entry per layer", path="multipoint.costs")
    sc = [1.0] * len(errors) if scales is None else [float(x) for x in scales]
    if any(not np.isfinite(x) or x < 0 for x in sc):
        raise SpecError(f"layer scales must be finite and >= 0, got {sc}", path="multipoint.scales")
    e_all = np.concatenate([e * x for e, x in zip(errors, sc)], axis=0)
    c_all = np.concatenate([np.broadcast_to(np.asarray(c, dtype=np.float64), (e.shape[0],))
                            for e, c in zip(errors, costs)])
    n_all = allocate_points(e_all, budget_avg, c_all)
    out, start = [], 0
    for e in errors:
        out.append(n_all[start:start + e.shape[0]].copy())
        start += e.shape[0]
    return out
