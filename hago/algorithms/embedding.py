"""Row-wise low-bit quantization of embedding tables (array-level core).

Guan, Malevich, Yang, Park, Yuen, "Post-Training 4-Bit Quantization on
Embedding Tables", 2019 (arXiv 1911.02079).

Row-wise uniform quantization
    Every row ``x`` (one embedding vector) gets its own range ``[lo, hi]``;
    ``bias = fp16(lo)``, ``scale = fp16((hi - bias) / (2**bits - 1))`` (1.0 for a
    constant row), codes ``clip(rint((x - bias) / scale), 0, 2**bits - 1)``,
    packed ``8 // bits`` per byte (for 4 bits two codes per byte, the even
    column in the low nibble as FBGEMM's fused n-bit rowwise format), and the
    row dequantizes as ``codes * scale + bias``.  Storage per row:
    ``ceil(D * bits / 8) + 4`` bytes (fp16 scale and bias).

Greedy range search (``method="greedy"``)
    Start from ``[min(x), max(x)]``; with step ``(max - min) / n_bins``, at each
    step evaluate shrinking the range from the left (``lo + step``) and from the
    right (``hi - step``) and move to the one with the lower L2 reconstruction
    error (the left move on ties); stop after ``round(n_bins * ratio)`` steps,
    i.e. when the range has shrunk to ``(1 - ratio)`` of the original.  Defaults
    ``n_bins=200, ratio=0.16`` are those of the authors' production
    implementation (Caffe2/FBGEMM ``param_search_greedy``; the paper describes
    the search with a bin count and a ratio but we could not read its text
    here).  The losses are computed exactly as the stored table reconstructs
    (fp16 bias and scale), all rows at once (vectorized over rows).
    Deviation, documented: the authors' code keeps the best *local optimum*
    visited and falls back to ``[min, max]`` when there is none; we keep the best
    range over every visited state including the start, which can only be
    better and guarantees the greedy result is never worse than min-max per row.

Codebook quantization (:func:`quantize_codebook`)
    ``k`` (16) centroids per row (``per="row"``) or one shared codebook
    (``per="table"``) found by Lloyd's k-means initialised at quantiles;
    centroids stored fp16 and codes (``log2 k`` bits) packed like above.  Per
    row, Lloyd's iterations start from the greedy uniform grid by default, so
    the codebook result refines (never worsens, up to the fp16 rounding of the
    centroids) the row-wise uniform one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hago.errors import ModelError, SpecError

__all__ = [
    "PackedTable",
    "CodebookTable",
    "quantize_rowwise",
    "quantize_codebook",
    "pack_codes",
    "unpack_codes",
    "rowwise_l2_error",
]

_SUPPORTED_BITS = (1, 2, 4, 8)


def _check_bits(bits: int, field: str = "bits") -> int:
    if bits not in _SUPPORTED_BITS:
        raise SpecError(f"{field} must be one of {_SUPPORTED_BITS} (a divisor of 8), got {bits!r}",
                        path=f"embedding.{field}")
    return int(bits)


def _check_table(table) -> np.ndarray:
    t = np.asarray(table)
    if t.ndim != 2:
        raise ModelError(f"embedding table must be 2-D [rows, dim], got shape {t.shape}")
    if t.dtype.kind != "f":
        raise ModelError(f"embedding table must be floating point, got dtype {t.dtype}")
    if t.size and not np.all(np.isfinite(t)):
        bad = int(np.argwhere(~np.isfinite(t))[0, 0])
        raise ModelError(f"embedding table has NaN/Inf (first in row {bad})")
    return t.astype(np.float32, copy=False)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``[R, D]`` (each < 2**bits) into uint8 ``[R, ceil(D*bits/8)]``.

    Code ``j`` of a row goes to byte ``j // (8 // bits)`` at bit offset
    ``(j % (8 // bits)) * bits`` (lowest bits first).
    """
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    per = 8 // bits
    r, d = codes.shape
    nb = -(-d // per)
    padded = np.zeros((r, nb * per), dtype=np.uint8)
    padded[:, :d] = codes
    padded = padded.reshape(r, nb, per)
    out = np.zeros((r, nb), dtype=np.uint8)
    for k in range(per):
        out |= (padded[:, :, k] << np.uint8(k * bits)).astype(np.uint8)
    return out


def unpack_codes(packed: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` for any leading shape: ``[..., nbytes] -> [..., dim]`` uint8."""
    bits = _check_bits(bits)
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    packed = np.asarray(packed, dtype=np.uint8)
    parts = [(packed >> np.uint8(k * bits)) & mask for k in range(per)]
    out = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * per,))
    return out[..., :dim]


def _check_indices(indices, rows: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.dtype.kind not in "iu":
        raise ModelError(f"gather indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < -rows or idx.max() >= rows):
        raise ModelError(f"gather indices out of range for a table of {rows} rows "
                         f"(got {int(idx.min())}..{int(idx.max())})")
    return idx.astype(np.int64) % max(rows, 1)


@dataclass
class PackedTable:
    """A row-wise uniformly quantized table.

    Attributes:
        packed: uint8 ``[rows, ceil(dim * bits / 8)]`` packed codes.
        scale, bias: float16 ``[rows]``; a row is ``codes * scale + bias``.
        dim: number of columns; bits: code width.
    """

    packed: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    dim: int
    bits: int = 4

    @property
    def shape(self) -> tuple:
        return (int(self.packed.shape[0]), int(self.dim))

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes + fp16 scale + fp16 bias."""
        return int(self.packed.nbytes + self.scale.nbytes + self.bias.nbytes)

    @property
    def fp32_ratio(self) -> float:
        """``nbytes`` over the size of the fp32 table."""
        return self.nbytes / (4.0 * self.shape[0] * self.shape[1])

    def codes(self, rows=None) -> np.ndarray:
        """Unpacked uint8 codes ``[rows, dim]`` (all rows, or the given row indices)."""
        p = self.packed if rows is None else self.packed[rows]
        return unpack_codes(p, self.bits, self.dim)

    def dequantize(self) -> np.ndarray:
        """float32 ``[rows, dim]``."""
        return _dequant(self.codes(), self.scale, self.bias)

    def gather(self, indices) -> np.ndarray:
        """Dequantize only the looked-up rows: float32 ``indices.shape + (dim,)``."""
        idx = _check_indices(indices, self.shape[0])
        flat = idx.reshape(-1)
        rows = _dequant(unpack_codes(self.packed[flat], self.bits, self.dim),
                        self.scale[flat], self.bias[flat])
        return rows.reshape(idx.shape + (self.dim,))


def _dequant(codes, scale16, bias16) -> np.ndarray:
    return codes.astype(np.float32) * scale16.astype(np.float32)[..., None] + bias16.astype(np.float32)[..., None]


def _row_params(lo: np.ndarray, hi: np.ndarray, bits: int):
    """fp16-rounded (scale, bias) as float32 arrays, plus 1/scale, for ranges ``[lo, hi]``."""
    bias = lo.astype(np.float16).astype(np.float32)
    rng = hi - bias
    scale = (rng / np.float32((1 << bits) - 1)).astype(np.float16).astype(np.float32)
    bad = (rng <= 0) | (scale <= 0) | ~np.isfinite(scale)
    scale = np.where(bad, np.float32(1.0), scale)
    return scale, bias, np.float32(1.0) / scale


def _quantize_rows(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int):
    """Codes (float32, integral) and fp16-exact params for rows ``x`` with ranges ``[lo, hi]``."""
    scale, bias, inv = _row_params(lo, hi, bits)
    codes = np.clip(np.rint((x - bias[:, None]) * inv[:, None]), 0, (1 << bits) - 1)
    return codes, scale, bias


def _row_loss(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    codes, scale, bias = _quantize_rows(x, lo, hi, bits)
    recon = codes * scale[:, None] + bias[:, None]
    d = x - recon
    return np.einsum("ij,ij->i", d, d)


def _greedy_ranges(x: np.ndarray, bits: int, n_bins: int, ratio: float):
    lo = x.min(axis=1)
    hi = x.max(axis=1)
    step = (hi - lo) / np.float32(n_bins)
    n_steps = int(round(n_bins * ratio))
    cur_lo, cur_hi = lo.copy(), hi.copy()
    best_lo, best_hi = lo.copy(), hi.copy()
    best_loss = _row_loss(x, lo, hi, bits)
    for _ in range(n_steps):
        l1 = _row_loss(x, cur_lo + step, cur_hi, bits)
        l2 = _row_loss(x, cur_lo, cur_hi - step, bits)
        left = l1 < l2
        cur_lo = np.where(left, cur_lo + step, cur_lo)
        cur_hi = np.where(left, cur_hi, cur_hi - step)
        cur_loss = np.where(left, l1, l2)
        better = cur_loss < best_loss
        best_loss = np.where(better, cur_loss, best_loss)
        best_lo = np.where(better, cur_lo, best_lo)
        best_hi = np.where(better, cur_hi, best_hi)
    return best_lo, best_hi


def quantize_rowwise(table, bits: int = 4, method: str = "greedy", n_bins: int = 200,
                     ratio: float = 0.16, chunk_rows: int = 4096) -> PackedTable:
    """Quantize each row of ``table`` [rows, dim] to ``bits`` with its own fp16 scale and bias.

    Args:
        table: float array [rows, dim].
        bits: 4 (also 1, 2, 8).
        method: "minmax" (range = [row min, row max]) or "greedy" (range search, see module doc).
        n_bins, ratio: greedy step is ``(max - min) / n_bins``; the search runs
            ``round(n_bins * ratio)`` steps (defaults 200 and 0.16 -> 32 steps).
        chunk_rows: rows processed at once (memory bound: ~``chunk_rows * dim * 16`` bytes).
    """
    bits = _check_bits(bits)
    if method not in ("minmax", "greedy"):
        raise SpecError(f"unknown method {method!r}; use 'minmax' or 'greedy'", path="embedding.method")
    if n_bins < 1 or not 0.0 <= ratio < 1.0:
        raise SpecError(f"need n_bins >= 1 and 0 <= ratio < 1, got n_bins={n_bins}, ratio={ratio}",
                        path="embedding.greedy")
    t = _check_table(table)
    r, d = t.shape
    if d == 0:
        raise ModelError("embedding table has zero columns")
    per = 8 // bits
    packed = np.empty((r, -(-d // per)), dtype=np.uint8)
    scale16 = np.empty(r, dtype=np.float16)
    bias16 = np.empty(r, dtype=np.float16)
    for s in range(0, r, max(1, int(chunk_rows))):
        x = t[s:s + chunk_rows]
        if method == "greedy":
            lo, hi = _greedy_ranges(x, bits, n_bins, ratio)
        else:
            lo, hi = x.min(axis=1), x.max(axis=1)
        codes, scale, bias = _quantize_rows(x, lo, hi, bits)
        packed[s:s + chunk_rows] = pack_codes(codes.astype(np.uint8), bits)
        scale16[s:s + chunk_rows] = scale.astype(np.float16)
        bias16[s:s + chunk_rows] = bias.astype(np.float16)
    return PackedTable(packed, scale16, bias16, d, bits)


@dataclass
class CodebookTable:
    """A codebook-quantized table: ``row[i, j] = centroids[i or 0, codes[i, j]]``.

    Attributes:
        packed: uint8 ``[rows, ceil(dim * bits / 8)]`` packed indices.
        centroids: float16 ``[rows, k]`` (per-row) or ``[1, k]`` (per-table).
        dim, bits: columns and index width (``log2 k``).
    """

    packed: np.ndarray
    centroids: np.ndarray
    dim: int
    bits: int = 4
    per: str = "row"

    @property
    def shape(self) -> tuple:
        return (int(self.packed.shape[0]), int(self.dim))

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed indices + fp16 codebook(s)."""
        return int(self.packed.nbytes + self.centroids.nbytes)

    @property
    def fp32_ratio(self) -> float:
        return self.nbytes / (4.0 * self.shape[0] * self.shape[1])

    def _lookup(self, rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
        cb = self.centroids.astype(np.float32)
        if self.per == "table":
            return cb[0][codes]
        return np.take_along_axis(cb[rows], codes.astype(np.int64), axis=1)

    def dequantize(self) -> np.ndarray:
        rows = np.arange(self.shape[0])
        return self._lookup(rows, unpack_codes(self.packed, self.bits, self.dim))

    def gather(self, indices) -> np.ndarray:
        idx = _check_indices(indices, self.shape[0])
        flat = idx.reshape(-1)
        out = self._lookup(flat, unpack_codes(self.packed[flat], self.bits, self.dim))
        return out.reshape(idx.shape + (self.dim,))


def _assign_sorted(x: np.ndarray, cent: np.ndarray) -> np.ndarray:
    """Nearest centroid index for rows ``x`` [R, D] given sorted centroids ``cent`` [R, k]."""
    mids = 0.5 * (cent[:, 1:] + cent[:, :-1])  # [R, k-1]
    # index = number of midpoints strictly below x (nearest, ties to the lower centroid)
    out = np.zeros(x.shape, dtype=np.uint8)
    for j in range(mids.shape[1]):
        out += x > mids[:, j:j + 1]
    return out


def _init_rows(x: np.ndarray, k: int, init: str, n_bins: int, ratio: float) -> np.ndarray:
    """Initial sorted centroids [R, k]: a uniform grid over the min-max or greedy range, or quantiles."""
    if init == "quantile":
        qs = (np.arange(k, dtype=np.float64) + 0.5) / k
        return np.quantile(x, qs, axis=1).T.astype(np.float32)
    bits = int(np.log2(k))
    if init == "greedy":
        lo, hi = _greedy_ranges(x, bits, n_bins, ratio)
    else:
        lo, hi = x.min(axis=1), x.max(axis=1)
    scale, bias, _ = _row_params(lo, hi, bits)
    return bias[:, None] + scale[:, None] * np.arange(k, dtype=np.float32)[None, :]


def _lloyd_rows(x: np.ndarray, cent: np.ndarray, iters: int, tol: float) -> np.ndarray:
    """Vectorized 1-D Lloyd's k-means, independently per row, from sorted ``cent`` [R, k].

    Each iteration never increases a row's squared error (assignment to the
    nearest centroid, then centroids to their cluster means; an empty cluster
    keeps its centroid).  Stops when no centroid moves more than ``tol`` times
    its row's range.
    """
    r, d = x.shape
    k = cent.shape[1]
    span = np.maximum(x.max(axis=1) - x.min(axis=1), np.float32(1e-30))[:, None]
    base = (np.arange(r, dtype=np.int64) * k)[:, None]
    for _ in range(iters):
        flat = (_assign_sorted(x, cent) + base).reshape(-1)  # int64 via base
        sums = np.bincount(flat, weights=x.reshape(-1), minlength=r * k).reshape(r, k)
        cnts = np.bincount(flat, minlength=r * k).reshape(r, k)
        new = np.where(cnts > 0, sums / np.maximum(cnts, 1), cent).astype(np.float32)
        new.sort(axis=1)
        moved = np.max(np.abs(new - cent) / span)
        cent = new
        if moved <= tol:
            break
    return cent


def _lloyd_scalar(values: np.ndarray, k: int, iters: int) -> np.ndarray:
    """1-D Lloyd's k-means on one large vector; sorted centroids [k]."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    cent = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        mids = 0.5 * (cent[1:] + cent[:-1])
        a = np.searchsorted(mids, v, side="left")
        sums = np.bincount(a, weights=v, minlength=k)
        cnts = np.bincount(a, minlength=k)
        new = np.sort(np.where(cnts > 0, sums / np.maximum(cnts, 1), cent))
        if np.allclose(new, cent, rtol=0, atol=0):
            break
        cent = new
    return cent.astype(np.float32)


def quantize_codebook(table, k: int = 16, per: str = "row", iters: int = 15, init: str = "greedy",
                      tol: float = 1e-4, chunk_rows: int = 2048, n_bins: int = 200,
                      ratio: float = 0.16) -> CodebookTable:
    """Codebook (k-means) quantization of an embedding table.

    Args:
        table: float [rows, dim].
        k: codebook size, a power of two with ``log2 k`` in (1, 2, 4, 8) (16 -> 4-bit indices).
        per: "row" (k fp16 centroids per row) or "table" (one shared codebook).
        iters: at most this many Lloyd iterations (stops early once no centroid
            moves more than ``tol`` times the row's range).
        init: per-row initial centroids: "greedy" (the 2**bits levels of the
            greedy-searched uniform grid, so the result is no worse than
            row-wise uniform greedy quantization up to fp16 rounding of the
            centroids), "minmax" (uniform grid over [min, max]) or "quantile".
            Per-table clustering always starts at the k mid-quantiles.
        chunk_rows: rows clustered at once for ``per="row"``.
        n_bins, ratio: greedy-search parameters for ``init="greedy"``.

    Each value is coded with the nearest fp16-rounded centroid, so the error
    measured on :meth:`CodebookTable.dequantize` is the stored table's.
    """
    if init not in ("greedy", "minmax", "quantile"):
        raise SpecError(f"init must be 'greedy', 'minmax' or 'quantile', got {init!r}",
                        path="embedding.codebook.init")
    if per not in ("row", "table"):
        raise SpecError(f"per must be 'row' or 'table', got {per!r}", path="embedding.codebook.per")
    bits = int(np.log2(k)) if k > 1 else 0
    if k < 2 or (1 << bits) != k:
        raise SpecError(f"k must be a power of two >= 2, got {k}", path="embedding.codebook.k")
    _check_bits(bits, "codebook bits")
    t = _check_table(table)
    r, d = t.shape
    per_byte = 8 // bits
    packed = np.empty((r, -(-d // per_byte)), dtype=np.uint8)
    if per == "table":
        cent16 = np.sort(_lloyd_scalar(t, k, iters).astype(np.float16))
        c32 = cent16.astype(np.float32)
        mids = 0.5 * (c32[1:] + c32[:-1])
        for s in range(0, r, chunk_rows):
            codes = np.searchsorted(mids, t[s:s + chunk_rows], side="left").astype(np.uint8)
            packed[s:s + chunk_rows] = pack_codes(codes, bits)
        return CodebookTable(packed, cent16[None, :], d, bits, per="table")
    cents = np.empty((r, k), dtype=np.float16)
    for s in range(0, r, chunk_rows):
        x = t[s:s + chunk_rows]
        cent = _lloyd_rows(x, _init_rows(x, k, init, n_bins, ratio), iters, tol)
        c16 = np.sort(cent.astype(np.float16), axis=1)
        codes = _assign_sorted(x, c16.astype(np.float32)).astype(np.uint8)
        packed[s:s + chunk_rows] = pack_codes(codes, bits)
        cents[s:s + chunk_rows] = c16
    return CodebookTable(packed, cents, d, bits, per="row")


def rowwise_l2_error(table, recon) -> np.ndarray:
    """Per-row L2 norm of ``table - recon`` (float64)."""
    diff = np.asarray(table, dtype=np.float64) - np.asarray(recon, dtype=np.float64)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))
