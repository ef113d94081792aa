"""Numeric helpers of :mod:`hago.backend.realize`: fixed-point multipliers, bounds, ONNX dtypes.

Pure numpy; no TVM import, so these can be unit-tested and reused (e.g. by a C code generator).
"""
from __future__ import annotations

import numpy as np

from ..errors import CompileError

#: Fractional bits of the fixed-point multiplier: ``M ~= m0 * 2**-shift`` with ``2**30 <= |m0| < 2**31``.
MULT_BITS = 31
#: Largest right shift emitted (int64 arithmetic).
MAX_SHIFT = 62
#: Extra fractional bits kept per term when several terms (residual Add) are summed before the final rounding.
SUM_FRAC_BITS = 16

# ONNX TensorProto data type -> (numpy dtype name, qmin, qmax) for the integer types a Q/DQ may use.
# int4/uint4 values are held in an int8/uint8 container with the narrow range.
_QTYPES = {
    2: ("uint8", 0, 255),
    3: ("int8", -128, 127),
    4: ("uint16", 0, 65535),
    5: ("int16", -32768, 32767),
    6: ("int32", -(2**31), 2**31 - 1),
    21: ("uint8", 0, 15),  # UINT4
    22: ("int8", -8, 7),  # INT4
}


def qtype_info(onnx_dtype: int) -> tuple[str, int, int]:
    """(container dtype, qmin, qmax) of an ONNX integer element type, or raise KeyError."""
    return _QTYPES[int(onnx_dtype)]


def dtype_range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def quantize_multiplier(m: np.ndarray, *, where: str = "", bits: int = MULT_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Decompose real multipliers ``m`` into ``(m0, shift)`` with ``m ~= m0 * 2**-shift``.

    ``m0`` is a signed `bits`-bit integer (``2**(bits-1) <= |m0| <= 2**bits - 1`` unless ``m`` is 0 or tiny;
    31 by default, fewer when the value it multiplies is wider than 32 bits, so that the int64 product cannot
    overflow) and ``shift`` an integer >= 1 (capped at :data:`MAX_SHIFT`, which only loses precision for
    multipliers below ``2**-31``, whose results round to 0 anyway). Both are int64 arrays of ``m``'s shape.
    """
    m = np.asarray(m, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        raise CompileError(f"{where}: requantize multiplier is not finite ({m.ravel()[:4]}...)")
    frac, exp = np.frexp(m)  # m = frac * 2**exp, 0.5 <= |frac| < 1
    m0 = np.round(frac * (1 << bits)).astype(np.int64)
    exp = exp.astype(np.int64)
    full = np.abs(m0) == (1 << bits)
    m0 = np.where(full, m0 // 2, m0)
    exp = np.where(full, exp + 1, exp)
    shift = bits - exp
    zero = m0 == 0
    shift = np.where(zero, 1, shift)
    if np.any(shift < 1):
        big = float(np.max(np.abs(m)))
        raise CompileError(
            f"{where}: requantize multiplier {big:g} >= 2**30 cannot be represented as a 31-bit "
            "fixed-point multiplier (scales are inconsistent)"
        )
    over = shift > MAX_SHIFT
    if np.any(over):
        extra = np.where(over, shift - MAX_SHIFT, 0)
        m0 = np.where(over, np.round(m0 / np.exp2(extra)).astype(np.int64), m0)
        shift = np.where(over, MAX_SHIFT, shift)
    return m0.astype(np.int64), shift.astype(np.int64)


def fixed_point_reference(x: np.ndarray, m0: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Numpy model of the emitted fixed-point rescale, in int64.

    ``v = x*m0; (v + 2**(shift-1) - 1 + ((v >> shift) & 1)) >> shift``: ``x * m0 / 2**shift`` rounded to the
    nearest integer, ties to even.
    """
    v = np.asarray(x, dtype=np.int64) * m0
    half_m1 = np.left_shift(np.int64(1), shift - 1) - 1
    return np.right_shift(v + half_m1 + (np.right_shift(v, shift) & 1), shift)


def round_half_even_f32(v) -> np.ndarray:
    """Round like onnxruntime's QuantizeLinear (float32 arithmetic, ties to even)."""
    return np.rint(np.asarray(v, dtype=np.float32))


def clamp_bounds_to_q(lo: float, hi: float, scale: float, zp: int, qmin: int, qmax: int) -> tuple[int, int]:
    """Integer bounds equivalent to ``Q(clip(y, lo, hi))`` for ``Q`` with (scale, zp) and range [qmin, qmax].

    Rounding is monotone, so ``round(clip(y, lo, hi)/s) == clip(round(y/s), round(lo/s), round(hi/s))``; the
    bound is computed with the same float32 division onnxruntime uses.
    """
    s = np.float32(scale)
    if np.isfinite(lo):
        qmin = max(qmin, int(round_half_even_f32(np.float32(lo) / s)) + int(zp))
    if np.isfinite(hi):
        qmax = min(qmax, int(round_half_even_f32(np.float32(hi) / s)) + int(zp))
    if qmax < qmin:  # an empty clip range: ONNX Clip with min > max gives max everywhere
        qmin = qmax
    return int(qmin), int(qmax)
