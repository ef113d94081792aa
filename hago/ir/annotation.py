"""Quantization decisions stored on graph edges (onnx-ir values).

An :class:`EdgeAnnotation` says how one edge is quantized: bit-width, container
dtype, signedness, symmetry, per-tensor or per-axis scale, rounding, and where
its threshold came from. It is stored on the value itself, in
``value.meta["hago.ann"]``, so every pass sees the same decision.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

ANN_KEY = "hago.ann"

# Container dtypes an annotation may use, with (signed, width).
DTYPES: dict[str, tuple[bool, int]] = {
    "int4": (True, 4),
    "uint4": (False, 4),
    "int8": (True, 8),
    "uint8": (False, 8),
    "int16": (True, 16),
    "uint16": (False, 16),
    "int32": (True, 32),
}

KINDS = ("activation", "weight", "bias")
ROUNDINGS = ("nearest", "floor", "adaround")


@dataclasses.dataclass
class EdgeAnnotation:
    """How one edge is quantized.

    ``bits`` may be below the container's width (e.g. 7-bit weights stored in
    int8); the integer range is then ``[qmin, qmax]`` of ``bits``.
    ``axis`` is ``None`` for a per-tensor scale, else the channel axis.
    ``scale``/``zero_point`` are filled by calibration.
    """

    kind: str = "activation"
    dtype: str = "uint8"
    bits: int = 8
    symmetric: bool = False
    axis: int | None = None
    rounding: str = "nearest"
    method: str = "minmax"  # threshold source: minmax, avg_range, percentile, kl, mse, lp, lapq, fixed, ...
    narrow: bool = False  # symmetric signed range without the most negative code ([-127, 127])
    rmin: Any = None  # calibrated real range (float or per-axis array)
    rmax: Any = None
    scale: Any = None
    zero_point: Any = None
    fixed: bool = False  # range fixed by the spec (e.g. Softmax output in [0, 1]); calibration leaves it
    tied_to: str | None = None  # reuse this edge's scale/zero point (outputs of MaxPool, Reshape, Relu...)
    sparq: dict | None = None  # SPARQ trimming of the 8-bit codes: {"mode": "bsparq"|"vsparq", "window_bits", "placements", "pair_axis"}
    note: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"annotation kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"annotation dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        width = DTYPES[self.dtype][1]
        if not 2 <= self.bits <= width:
            raise ValueError(f"{self.bits} bits do not fit the {self.dtype} container")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def signed(self) -> bool:
        return DTYPES[self.dtype][0]

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def per_axis(self) -> bool:
        return self.axis is not None

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def set_range(self, rmin, rmax) -> None:
        """Set the real range and derive scale and zero point from it."""
        self.rmin, self.rmax = rmin, rmax
        self.scale, self.zero_point = range_to_qparams(rmin, rmax, self)

    def copy(self, **changes) -> "EdgeAnnotation":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("rmin", "rmax", "scale", "zero_point"):
            v = d[k]
            if isinstance(v, np.ndarray):
                d[k] = v.tolist()
            elif isinstance(v, np.generic):
                d[k] = v.item()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EdgeAnnotation":
        d = dict(d)
        for k in ("rmin", "rmax", "scale", "zero_point"):
            if isinstance(d.get(k), list):
                d[k] = np.asarray(d[k], dtype=np.int64 if k == "zero_point" else np.float32)
        return cls(**d)

    def short(self) -> str:
        """One-line description, e.g. ``u8 asym per-tensor minmax`` or ``s7 sym axis0``."""
        s = ("s" if self.signed else "u") + str(self.bits)
        s += " sym" if self.symmetric else " asym"
        s += f" axis{self.axis}" if self.per_axis else " tensor"
        s += f" {self.method}"
        return s


def range_to_qparams(rmin, rmax, ann: EdgeAnnotation):
    """Scale and zero point for a real range, as onnxruntime and TVM expect them.

    The range is widened to contain 0 (so that 0 is exact). Symmetric
    annotations use ``max(|rmin|, |rmax|)`` and a zero point of 0 (signed) or
    the middle code (unsigned symmetric is treated as 0-based: ReLU outputs).
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = ann.qmin, ann.qmax
    tiny = np.finfo(np.float32).tiny * 1e3
    if ann.symmetric:
        amax = np.maximum(np.abs(rmin), np.abs(rmax))
        if ann.signed:
            scale = amax / max(qmax, 1)
            zp = np.zeros_like(scale, dtype=np.int64)
        else:  # unsigned symmetric: range [0, amax]
            scale = amax / qmax
            zp = np.zeros_like(scale, dtype=np.int64)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        scale = np.where(scale > tiny, scale, 1.0)
        zp = np.clip(np.round(qmin - rmin / scale), qmin, qmax).astype(np.int64)
    scale = np.where(scale > tiny, scale, 1.0).astype(np.float32)
    if scale.ndim == 0:
        return np.float32(scale), np.int64(zp)
    return scale, zp


def broadcast_qparams(ann: EdgeAnnotation, ndim: int, scale_dtype=np.float32, zp_dtype=np.float32):
    """``(scale, zero_point)`` of the annotation as arrays that broadcast against a tensor of ``ndim`` dimensions
    (per-axis parameters laid along ``ann.axis``; a missing zero point is 0)."""
    scale = np.asarray(ann.scale, dtype=scale_dtype)
    zp = np.asarray(ann.zero_point if ann.zero_point is not None else 0, dtype=zp_dtype)
    if ann.per_axis:
        shape = [1] * ndim
        shape[ann.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


def fake_quantize(x: np.ndarray, ann: EdgeAnnotation) -> np.ndarray:
    """Quantize and dequantize ``x`` with the annotation's parameters (numpy reference)."""
    scale, zp = broadcast_qparams(ann, x.ndim)
    q = np.clip(np.rint(x / scale) + zp, ann.qmin, ann.qmax)
    return ((q - zp) * scale).astype(np.float32)


def dequantize_array(q: np.ndarray, ann: EdgeAnnotation) -> np.ndarray:
    """Float values (float32) of integer codes ``q`` under the annotation: ``(q - zero_point) * scale``."""
    scale, zp = broadcast_qparams(ann, np.ndim(q))
    return ((np.asarray(q, np.float32) - zp) * scale).astype(np.float32)


def quantize_array(x: np.ndarray, ann: EdgeAnnotation) -> np.ndarray:
    """Integer codes of ``x`` (as int64) under the annotation, round half to even."""
    scale, zp = broadcast_qparams(ann, x.ndim, zp_dtype=np.int64)
    return np.clip(np.rint(x.astype(np.float32) / scale) + zp, ann.qmin, ann.qmax).astype(np.int64)
