"""SPARQ: post-training sparsity-aware quantization of activations (array-level core).

Shomron, Gabbay, Kurzum, Weiser, "Post-Training Sparsity-Aware Quantization",
NeurIPS 2021 (arXiv 2105.11010); reference code github.com/gilshm/sparq
(``cu_gemm_2x48/gemm_mt_kernel.cu`` and the ``slices_*bits_macros.h`` tables).

Activations are first quantized to unsigned 8-bit codes (0..255, after ReLU).
SPARQ then keeps only a small *window* of each code's bits:

bSPARQ (bit-level)
    A window of ``window_bits`` bits is placed at the code's most-significant
    set bit, so that leading zero bits are skipped.  The window's lowest bit may
    only sit at a few *placements* (shifts).  With a 4-bit window over 8 bits
    the reference code supports

    ============  =================  ===============================
    placements     shifts allowed     paper name
    ============  =================  ===============================
    5              0, 1, 2, 3, 4      opt5 (``shift_opt 5``)
    3              0, 2, 4            opt3
    2              0, 4               opt2
    ============  =================  ===============================

    and, for other window widths, every shift (3-bit window: 6 placements,
    "opt6"; 2-bit window: 7 placements, "opt7"; 6-bit window: 3 placements).
    The window sits at the *lowest* allowed shift ``s`` that still covers the
    most-significant set bit (``s + window_bits - 1 >= msb``); the kept value
    is ``(q >> s) << s``.

    Rounding (reference ``IS_ROUND_UP``): when ``s > 0`` the dropped bits are
    rounded to nearest with ties to even -- the kept value is incremented by
    one window LSB iff the first dropped bit is set and (the window's LSB is
    set or any lower dropped bit is set).  If the increment overflows the
    window (all window bits were ones), the result saturates at the window's
    all-ones value (reference ``OVRFLW`` -> ``MASK``), it never moves the
    window.  ``rounding=False`` truncates (reference ``RAW`` mode).
    ``rounding="half_up"`` is offered as a non-reference variant (a dropped
    half rounds up, same saturation).

vSPARQ (value-level)
    Codes are taken in pairs of neighbours along an axis (the reference pairs
    adjacent input channels of the im2col'd activation matrix, i.e. channel
    pairs at the same spatial/kernel position).  If either code of a pair is
    zero, the other one borrows its neighbour's budget: it is kept with a
    window of ``2 * window_bits`` bits (every placement; for 4-bit windows this
    is the full 8-bit code, unchanged).  Otherwise both are bSPARQ-trimmed.
    A trailing unpaired element (odd length) is paired with an implicit zero,
    as the reference kernel does at the end of the reduction axis.

All functions work on integer code arrays of any shape; ``*_reference``
functions are slow scalar per-value implementations written after the
reference kernel's structure, used as bit-exact oracles in the tests.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from hago.errors import CalibrationError, SpecError

__all__ = [
    "placement_shifts",
    "bsparq",
    "bsparq_reference",
    "vsparq",
    "vsparq_reference",
    "quantize_uint",
    "fake_quant_sparq",
    "sparq_mse",
]

Placements = Union[int, Sequence[int]]
Rounding = Union[bool, str]

_ROUNDING_MODES = {True: "even", False: "truncate", "even": "even", "nearest": "even",
                   "truncate": "truncate", "raw": "truncate", "half_up": "half_up"}


def _rounding_mode(rounding: Rounding) -> str:
    key = rounding.lower() if isinstance(rounding, str) else bool(rounding)
    if key not in _ROUNDING_MODES:
        raise SpecError(f"unknown rounding {rounding!r}; use True/'even', False/'truncate' or 'half_up'",
                        path="sparq.rounding")
    return _ROUNDING_MODES[key]


def placement_shifts(window_bits: int = 4, placements: Placements = 5, total_bits: int = 8) -> np.ndarray:
    """Allowed shifts (position of the window's lowest bit), ascending.

    ``placements`` is either a count or an explicit sequence of shifts.  A count
    ``n`` means ``n`` evenly spaced shifts from 0 to ``total_bits - window_bits``
    (5 -> 0,1,2,3,4; 3 -> 0,2,4; 2 -> 0,4 for a 4-bit window over 8 bits, which
    are the reference code's opt5/opt3/opt2).  ``n = 1`` keeps only the top
    window (plain truncation to the high bits).  An explicit sequence must
    contain ``total_bits - window_bits`` so that every code is representable.
    """
    if not isinstance(window_bits, (int, np.integer)) or not 1 <= window_bits <= total_bits:
        raise SpecError(f"window_bits must be an integer in 1..{total_bits}, got {window_bits!r}",
                        path="sparq.window_bits")
    top = total_bits - window_bits
    n_all = top + 1
    if isinstance(placements, (int, np.integer)):
        n = int(placements)
        if n < 1 or n > n_all:
            raise SpecError(f"placements must be in 1..{n_all} for a {window_bits}-bit window over "
                            f"{total_bits} bits, got {n}", path="sparq.placements")
        if n == 1:
            return np.array([top], dtype=np.int32)
        if top % (n - 1) != 0:
            raise SpecError(f"{n} evenly spaced placements do not fit shifts 0..{top}; "
                            "pass an explicit list of shifts", path="sparq.placements")
        return np.arange(0, top + 1, top // (n - 1), dtype=np.int32)
    try:
        shifts = sorted({int(s) for s in placements})
    except TypeError as exc:
        raise SpecError(f"placements must be an int or a list of shifts, got {placements!r}",
                        path="sparq.placements") from exc
    if not shifts or shifts[0] < 0 or shifts[-1] != top:
        raise SpecError(f"explicit placements {list(placements)} must lie in 0..{top} and include {top}",
                        path="sparq.placements")
    return np.asarray(shifts, dtype=np.int32)


def _as_codes(q, total_bits: int, name: str = "q") -> np.ndarray:
    a = np.asarray(q)
    if a.dtype.kind not in "iub":
        if a.dtype.kind == "f" and a.size and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise CalibrationError(f"{name}: SPARQ expects integer activation codes, got dtype {a.dtype}")
    a = a.astype(np.int32)
    if a.size and (a.min() < 0 or a.max() > (1 << total_bits) - 1):
        raise CalibrationError(f"{name}: codes must lie in 0..{(1 << total_bits) - 1} "
                               f"(got {int(a.min())}..{int(a.max())})")
    return a


def _bsparq_codes(a: np.ndarray, shifts: np.ndarray, window_bits: int, mode: str) -> np.ndarray:
    """Vectorized bSPARQ on int32 codes (already validated)."""
    # most significant set bit (-1 for zero); frexp is exact for these small ints
    msb = np.frexp(a.astype(np.float64))[1].astype(np.int32) - 1
    need = np.maximum(msb - (window_bits - 1), 0)
    # lowest allowed shift covering the msb: shifts is ascending and contains the top shift
    s = shifts[np.searchsorted(shifts, need, side="left")]
    kept = (a >> s) << s
    if mode != "truncate":
        has_drop = s > 0
        sm1 = np.maximum(s - 1, 0)
        rbit = ((a >> sm1) & 1).astype(bool) & has_drop
        if mode == "even":
            lsb = ((a >> s) & 1).astype(bool)
            sticky = (a & ((1 << sm1) - 1)) != 0
            up = rbit & (lsb | sticky)
        else:  # half_up
            up = rbit
        full = ((1 << window_bits) - 1) << s
        kept = np.minimum(kept + (up.astype(np.int32) << s), full)
    return kept


def bsparq(q, window_bits: int = 4, placements: Placements = 5, rounding: Rounding = True,
           total_bits: int = 8) -> np.ndarray:
    """bSPARQ-trim unsigned activation codes.

    Args:
        q: integer codes in ``0..2**total_bits - 1`` (any shape; uint8 typical).
        window_bits: width of the kept window (4 in the paper's main results).
        placements: number of allowed window positions (5, 3, 2 for 4 bits) or an
            explicit list of shifts; see :func:`placement_shifts`.
        rounding: ``True``/"even" = the reference's round-to-nearest-even of the
            dropped bits with saturation; ``False``/"truncate" = drop them;
            "half_up" = round half up with saturation (non-reference variant).
        total_bits: width of the input codes (8).

    Returns:
        Trimmed codes, same shape, dtype of ``q`` if it is an integer type able
        to hold ``2**total_bits - 1`` else int32.  Values are still on the
        8-bit grid (``window << shift``), so they dequantize with the 8-bit scale.
    """
    shifts = placement_shifts(window_bits, placements, total_bits)
    mode = _rounding_mode(rounding)
    a = _as_codes(q, total_bits)
    out = _bsparq_codes(a, shifts, window_bits, mode)
    return _restore_dtype(out, q)


def _restore_dtype(out: np.ndarray, q) -> np.ndarray:
    dt = np.asarray(q).dtype
    if dt.kind in "iu" and np.iinfo(dt).max >= (out.max() if out.size else 0):
        return out.astype(dt)
    return out


def bsparq_reference(q, window_bits: int = 4, placements: Placements = 5, rounding: Rounding = True,
                     total_bits: int = 8) -> np.ndarray:
    """Slow scalar bSPARQ, one Python int at a time (bit-exact oracle).

    Follows the reference kernel's structure: test "set" masks from the highest
    window down (each mask holds the bits covered by that window and not by the
    next lower one), AND with the window mask, then apply the ``IS_ROUND_UP``
    predicate and the overflow-to-mask rule.
    """
    shifts = [int(s) for s in placement_shifts(window_bits, placements, total_bits)]
    mode = _rounding_mode(rounding)
    arr = _as_codes(q, total_bits)
    wmask = (1 << window_bits) - 1
    desc = shifts[::-1]
    out = np.empty(arr.shape, dtype=np.int32)
    flat_in = arr.reshape(-1)
    flat_out = out.reshape(-1)
    for i in range(flat_in.size):
        a = int(flat_in[i])
        chosen = desc[-1]
        for j, s in enumerate(desc[:-1]):
            lower = desc[j + 1]
            set_mask = ((1 << (s + window_bits)) - 1) & ~((1 << (lower + window_bits)) - 1)
            if a & set_mask:
                chosen = s
                break
        s = chosen
        mask = wmask << s
        h = a & mask
        if mode != "truncate" and s > 0:
            rnd_bit = 1 << (s - 1)
            is_rnd = (1 << s) | rnd_bit
            if mode == "even":
                below = (a & rnd_bit) - (1 if (a & rnd_bit) != 0 else 0)
                round_up = ((a & is_rnd) == is_rnd) or ((a & below) != 0)
            else:
                round_up = (a & rnd_bit) != 0
            if round_up:
                h += (a & rnd_bit) << 1
            if h == (1 << (s + window_bits)):
                h = mask
        flat_out[i] = h
    return _restore_dtype(out, q)


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= int(axis) < ndim:
        raise CalibrationError(f"pair_axis {axis} is out of range for an array of {ndim} dims")
    return int(axis) % ndim


def _pairs_view(a: np.ndarray, axis: int):
    """Move ``axis`` last and pad it to even length with a zero; return (pairs, n, moved shape)."""
    if a.ndim == 0:
        raise CalibrationError("q: vSPARQ needs at least a 1-D array of codes")
    axis = _norm_axis(axis, a.ndim)
    m = np.moveaxis(a, axis, -1)
    n = m.shape[-1]
    if n % 2:
        m = np.concatenate([m, np.zeros(m.shape[:-1] + (1,), dtype=m.dtype)], axis=-1)
    return m.reshape(m.shape[:-1] + (m.shape[-1] // 2, 2)), n, axis


def _wide_config(window_bits: int, total_bits: int):
    wide = min(2 * window_bits, total_bits)
    return wide, placement_shifts(wide, total_bits - wide + 1, total_bits)


def vsparq(q, pair_axis: int = -1, window_bits: int = 4, placements: Placements = 5,
           rounding: Rounding = True, total_bits: int = 8):
    """vSPARQ-trim unsigned activation codes pairwise along ``pair_axis``.

    For NCHW activations pass ``pair_axis=1`` to pair adjacent channels at the
    same position, as the reference kernel does.

    Returns:
        ``(q_trimmed, stats)``; ``q_trimmed`` has the shape of ``q``; ``stats``
        is a dict with ``pairs`` (number of pairs, an odd tail counts as one),
        ``frac_8bit_pairs`` (fraction of pairs with at least one zero, i.e.
        taking the wide/8-bit path), ``frac_both_zero`` and ``frac_zero_values``.
    """
    shifts = placement_shifts(window_bits, placements, total_bits)
    mode = _rounding_mode(rounding)
    a = _as_codes(q, total_bits)
    pairs, n, axis = _pairs_view(a, pair_axis)
    zero_pair = (pairs == 0).any(axis=-1, keepdims=True)
    trimmed = _bsparq_codes(pairs, shifts, window_bits, mode)
    wide_bits, wide_shifts = _wide_config(window_bits, total_bits)
    wide = pairs if wide_bits == total_bits else _bsparq_codes(pairs, wide_shifts, wide_bits, mode)
    res = np.where(zero_pair, wide, trimmed)
    res = res.reshape(res.shape[:-2] + (-1,))[..., :n]
    res = np.moveaxis(res, -1, axis)
    npairs = int(zero_pair.size)
    stats = {
        "pairs": npairs,
        "frac_8bit_pairs": float(zero_pair.mean()) if npairs else 0.0,
        "frac_both_zero": float((pairs == 0).all(axis=-1).mean()) if npairs else 0.0,
        "frac_zero_values": float((a == 0).mean()) if a.size else 0.0,
    }
    return _restore_dtype(res, q), stats


def vsparq_reference(q, pair_axis: int = -1, window_bits: int = 4, placements: Placements = 5,
                     rounding: Rounding = True, total_bits: int = 8):
    """Slow scalar vSPARQ (oracle): walks every pair like the reference kernel."""
    a = _as_codes(q, total_bits)
    if a.ndim == 0:
        raise CalibrationError("q: vSPARQ needs at least a 1-D array of codes")
    pair_axis = _norm_axis(pair_axis, a.ndim)
    m = np.moveaxis(a, pair_axis, -1)
    lead = m.shape[:-1]
    n = m.shape[-1]
    flat = m.reshape(-1, n)
    out = np.empty_like(flat)
    wide_bits, _ = _wide_config(window_bits, total_bits)
    wide_pl = total_bits - wide_bits + 1
    npairs = n8 = nboth = 0

    def trim(v):
        return int(bsparq_reference(np.array([v]), window_bits, placements, rounding, total_bits)[0])

    def widen(v):
        if wide_bits == total_bits:
            return v
        return int(bsparq_reference(np.array([v]), wide_bits, wide_pl, rounding, total_bits)[0])

    for r in range(flat.shape[0]):
        for k in range(0, n, 2):
            a1 = int(flat[r, k])
            a2 = int(flat[r, k + 1]) if k + 1 < n else 0
            npairs += 1
            if a1 == 0 or a2 == 0:
                n8 += 1
                nboth += int(a1 == 0 and a2 == 0)
                h1, h2 = widen(a1), widen(a2)
            else:
                h1, h2 = trim(a1), trim(a2)
            out[r, k] = h1
            if k + 1 < n:
                out[r, k + 1] = h2
    res = np.moveaxis(out.reshape(lead + (n,)), -1, pair_axis)
    stats = {"pairs": npairs, "frac_8bit_pairs": n8 / npairs if npairs else 0.0,
             "frac_both_zero": nboth / npairs if npairs else 0.0,
             "frac_zero_values": float((a == 0).mean()) if a.size else 0.0}
    return _restore_dtype(res, q), stats


def quantize_uint(x, scale, zero_point=0, bits: int = 8) -> np.ndarray:
    """Affine quantization to unsigned ``bits`` codes: ``clip(rint(x / scale) + zp, 0, 2**bits - 1)``."""
    x = np.asarray(x, dtype=np.float64)
    if x.size and not np.all(np.isfinite(x)):
        raise CalibrationError("x: activations contain NaN or Inf")
    scale = np.asarray(scale, dtype=np.float64)
    if np.any(~np.isfinite(scale)) or np.any(scale <= 0):
        raise CalibrationError(f"scale must be positive and finite, got {scale!r}")
    q = np.rint(x / scale) + np.asarray(zero_point, dtype=np.float64)
    return np.clip(q, 0, (1 << bits) - 1).astype(np.int32)


_MODES = ("bsparq", "vsparq", "int4", "int8")


def fake_quant_sparq(x, scale, zero_point=0, mode: str = "bsparq", window_bits: int = 4,
                     placements: Placements = 5, rounding: Rounding = True, pair_axis: int = -1,
                     return_stats: bool = False):
    """Quantize float activations to uint8, apply SPARQ, dequantize.

    Args:
        x: float activations (any shape; SPARQ is meant for non-negative, post-ReLU data).
        scale, zero_point: the 8-bit affine parameters (scalars or broadcastable
            arrays).  SPARQ's zero-skipping assumes ``zero_point == 0`` so that
            code 0 is the real value 0; other zero points are accepted but
            vSPARQ then tests code 0, not value 0.
        mode: "bsparq", "vsparq", "int8" (plain 8-bit), or "int4" (plain uniform
            4-bit over the same real range as the 8-bit grid: 15 steps of
            ``scale * 255 / 15``) -- the baseline SPARQ is compared against.
        window_bits, placements, rounding, pair_axis: see :func:`bsparq`, :func:`vsparq`.
        return_stats: also return the vSPARQ stats dict (empty for other modes).

    Returns:
        float32 array like ``x`` (and the stats dict when ``return_stats``).
    """
    if mode not in _MODES:
        raise SpecError(f"unknown SPARQ mode {mode!r}; expected one of {_MODES}", path="sparq.mode")
    scale_a = np.asarray(scale, dtype=np.float64)
    zp_a = np.asarray(zero_point, dtype=np.float64)
    stats: dict = {}
    if mode == "int4":
        q8max = 255.0
        lo = (0.0 - zp_a) * scale_a
        hi = (q8max - zp_a) * scale_a
        s4 = (hi - lo) / 15.0
        zp4 = np.clip(np.rint(-lo / s4), 0, 15)
        q4 = quantize_uint(x, s4, zp4, bits=4)
        out = (q4 - zp4) * s4
    else:
        q = quantize_uint(x, scale_a, zp_a, bits=8)
        if mode == "bsparq":
            q = bsparq(q, window_bits, placements, rounding)
        elif mode == "vsparq":
            q, stats = vsparq(q, pair_axis, window_bits, placements, rounding)
        out = (q - zp_a) * scale_a
    out = np.asarray(out, dtype=np.float32)
    return (out, stats) if return_stats else out


def sparq_mse(x, scale, zero_point=0, **kwargs) -> dict:
    """MSE of each mode (int8, int4, bsparq, vsparq) on ``x`` with the same 8-bit grid; for reports."""
    x = np.asarray(x, dtype=np.float64)
    res = {}
    for mode in _MODES:
        y = fake_quant_sparq(x, scale, zero_point, mode=mode, **kwargs)
        res[mode] = float(np.mean((y.astype(np.float64) - x) ** 2))
    return res
