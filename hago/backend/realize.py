"""Lower a QDQ ONNX model to a TVM Relax module whose quantized regions compute in integer.

Input: the QDQ exchange format of docs/DESIGN.md (what ``hago.ir.qdq.to_qdq`` and onnxruntime's
``quantize_static(quant_format=QDQ)`` write). Output: a Relax ``IRModule`` with one ``main`` that takes the float
graph inputs and returns the graph outputs.

How it works. The graph is walked in topological order; every ONNX tensor becomes one lazy *value*:

* ``_QV``      an integer tensor ``q`` (int8/uint8...) that stands for ``(q - zp) * scale`` (a Q output, or the DQ of one);
* ``_AccV``    a sum of integer *terms* ``(x_i - z_i) * s_i`` (a conv/matmul accumulator with its bias, a residual
               Add, a pooling sum); ``s_i`` may be per channel or per element;
* ``_ClampV``  ``clip(inner, lo, hi)`` still in the float domain (Relu/Clip not yet folded);
* ``_ConcatV`` a concatenation of such values, requantized part by part;
* ``_FloatV``  a float32 Relax expression; ``_IntV`` an integer expression with no known scale; ``_Const`` numpy.

Integer ops build these values without going through float: Conv/Gemm/MatMul take ``_QV`` inputs and constant
quantized weights and give an ``_AccV`` (``R.nn.conv2d``/``R.matmul`` with ``out_dtype`` int32 or int16 on the raw
uint8/int8 tensors, zero points folded into a constant per-channel correction); Add/Sub/Mul/Concat/pooling combine
values; MaxPool/Reshape/Flatten/Transpose/Squeeze/Unsqueeze/Relu work on ``_QV`` directly. A QuantizeLinear of such a
value *requantizes* it (fixed-point multiplier and shift, or float scale), with the pending Relu/Clip folded into the
clip bounds. Only when a float consumer needs a value is it dequantized (``(q - zp) * s`` in float32). Every other
op is imported with TVM's ONNX frontend (one node at a time) and run in float; a Q of a float value is
``R.quantize`` (x / s, round half to even, + zp, saturate: onnxruntime's QuantizeLinear).

hago's own representations (see :mod:`hago.backend.realize_seeds`): a SPARQ trim of uint8 codes (the LUT/Where
subgraph of ``hago.ir.qdq``) becomes ``take``/``equal``/``where`` on the codes, which stay a quantized tensor for the
integer conv/matmul behind it; a packed row-wise embedding table (``hago.passes.embedding``) becomes a ``take`` on the
packed uint8 table with nibble unpacking and the per-row scale/bias. Multipoint layers (sums of low-bit convs/matmuls
added in float) stay integer: the branch accumulators are terms of one sum; a MaxPool of such a pending sum whose
output only goes to a QuantizeLinear requantizes first (max commutes with the monotone requantize), and a
GlobalAveragePool of it sums on a per-channel int64 grid as fine as the finest term; Reshape/Flatten/Transpose move
per-channel accumulators.

Rounding of the fixed-point requantize: ``M = s_in / s_out`` is written ``m0 * 2**-shift`` with a 31-bit ``m0``;
``v = x * m0`` in int64 and ``y = (v + 2**(shift-1) - 1 + ((v >> shift) & 1)) >> shift``: round half to *even*, the
rule of onnxruntime's QuantizeLinear (exact ties are common: an average of 4 values, a same-scale residual Add).
onnxruntime computes ``y / s_out`` in float32 while the integer path is exact up to the 31-bit multiplier, so the two
can still differ by one step on near-ties. The float rule (``requantize="float"``) multiplies in float32 and rounds
half to even.

The reference is onnxruntime with graph optimizations *disabled* (ORT_DISABLE_ALL), which runs the Q/DQ nodes and
float ops as written. With optimizations on, onnxruntime fuses the QDQ groups into QLinearConv/QLinearAdd/QGemm
kernels with their own requantize rounding, and its x86 u8s8 kernels may saturate intermediate int16 sums on CPUs
without VNNI: on the test classifier it then differs from its own float simulation by up to 52 steps on ~0.2% of one
conv's outputs, where this backend stays within one step of the simulation.

Every region is within one step of onnxruntime given the same integer inputs; over a deep network these one-step
differences can propagate (light_squeezenet: up to 5 steps on a few values of the last fire modules, same argmax).
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CompileError, ModelError
from .realize_fixed import (
    SUM_FRAC_BITS,
    clamp_bounds_to_q,
    dtype_range,
    qtype_info,
    quantize_multiplier,
)

__all__ = ["realize", "describe", "RealizeOptions"]

_MAX_OPSET = 21
_ACCUMULATORS = ("int32", "int16")
_REQUANTIZE = ("fixed_point", "float")
_BORDERS = ("fused", "separate")
BORDER_ATTR = "hago.border"  # PrimFunc attribute of a border quantize/dequantize kernel (border_kernels="separate")


@dataclasses.dataclass(frozen=True)
class RealizeOptions:
    requantize: str = "fixed_point"
    accumulator: str = "int32"
    fold_relu: bool = True
    border_kernels: str = "fused"

    def __post_init__(self):
        if self.border_kernels not in _BORDERS:
            raise CompileError(f"realize: border_kernels={self.border_kernels!r}, expected one of {_BORDERS}")
        if self.requantize not in _REQUANTIZE:
            raise CompileError(f"realize: requantize={self.requantize!r}, expected one of {_REQUANTIZE}")
        if self.accumulator not in _ACCUMULATORS:
            raise CompileError(f"realize: accumulator={self.accumulator!r}, expected one of {_ACCUMULATORS}")


# --------------------------------------------------------------------------------------------------------------
# lazy values


class _Value:
    """Base of the lazy values (see the module docstring)."""

    origin: str | None = None  # name of the DQ node that dequantizes this value, for describe()


@dataclasses.dataclass(eq=False)
class _Const(_Value):
    array: np.ndarray
    # (q, scale, zp, axis) when this constant is the DequantizeLinear of a quantized initializer
    q: tuple[np.ndarray, np.ndarray, np.ndarray, int | None] | None = None


@dataclasses.dataclass(eq=False)
class _FloatV(_Value):
    expr: Any


@dataclasses.dataclass(eq=False)
class _IntV(_Value):
    expr: Any


@dataclasses.dataclass(eq=False)
class _QV(_Value):
    expr: Any  # integer relax expression of `dtype`
    scale: float
    zp: int
    dtype: str
    qmin: int  # the values the tensor can hold (the Q's range)
    qmax: int
    nodes: frozenset = frozenset()  # integer nodes that produced it (region tracking)
    int_tensor: bool = False  # True: the ONNX tensor itself is this integer tensor (a Q output); else its float DQ


@dataclasses.dataclass(eq=False)
class _Term:
    expr: Any  # integer relax expression
    scale: np.ndarray  # float64, broadcastable to expr's shape (same rank or scalar)
    zp: np.ndarray  # int64, broadcastable likewise
    bits: int = 32  # |expr - zp| < 2**bits (bounds the fixed-point multiplier so the int64 product cannot overflow)


def _dtype_bits(dtype: str) -> int:
    """Bits of ``q - zp`` for a quantized tensor of `dtype` (one more than the container for the subtraction)."""
    return {"uint8": 9, "int8": 9, "uint16": 17, "int16": 17}.get(dtype, 33)


@dataclasses.dataclass(eq=False)
class _AccV(_Value):
    terms: list
    shape: tuple
    nodes: frozenset = frozenset()


@dataclasses.dataclass(eq=False)
class _ClampV(_Value):
    inner: _Value
    lo: float
    hi: float
    nodes: frozenset = frozenset()


@dataclasses.dataclass(eq=False)
class _ConcatV(_Value):
    parts: list
    axis: int
    shape: tuple
    nodes: frozenset = frozenset()


_INTEGER_LIKE = (_QV, _AccV, _ClampV, _ConcatV)
# ops whose result on an integer tensor is the same whether the tensor is read as integers or as its DQ
_INT_TENSOR_OK = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
     "Identity", "Dropout", "Shape"}
)


def _nodes_of(*values) -> frozenset:
    out: set = set()
    for v in values:
        out |= set(getattr(v, "nodes", ()) or ())
    return frozenset(out)


class _Fallback(Exception):
    """An op cannot be realized in integer; the message is the reason (goes to describe())."""


# --------------------------------------------------------------------------------------------------------------
# helpers on relax expressions


def _ty(expr):
    return expr.ty


def _shape(expr) -> tuple:
    ty = _ty(expr)
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        raise CompileError(f"realize: expression of unknown shape {ty}")
    out = []
    for s in shape.values:
        try:
            out.append(int(s))
        except TypeError as exc:  # symbolic
            raise CompileError(f"realize: only static shapes are supported (got {ty})") from exc
    return tuple(out)


def _dtype(expr) -> str:
    return str(_ty(expr).dtype)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _scalar(arr) -> bool:
    return np.asarray(arr).size == 1


def _bshape(*shapes) -> tuple:
    return tuple(np.broadcast_shapes(*shapes))


def _sub_dtype(*dtypes) -> str:
    """Signed type that holds ``q - zp`` for quantized tensors of these dtypes."""
    return "int16" if all(d in ("uint8", "int8") for d in dtypes) else "int32"


# --------------------------------------------------------------------------------------------------------------
# the lowering


class _Lowering:
    def __init__(self, model: onnx.ModelProto, opts: RealizeOptions, input_shapes: dict | None):
        from tvm import relax

        self.relax = relax
        self.R = relax.op
        self.model = model
        self.opts = opts
        self.input_shapes = dict(input_shapes or {})
        self.bb = relax.BlockBuilder()
        self.values: dict[str, _Value] = {}
        self.records: list[dict] = []
        self.opset = 0
        self._fallback_id = itertools.count()
        self._floats: dict[int, Any] = {}
        self._pending_funcs: list = []
        self._consumers: dict[str, list] = {}
        self._skip: set[int] = set()  # ids of nodes already lowered as part of a matched chain

    # ---------------------------------------------------------------- emit helpers
    def emit(self, expr, name: str = ""):
        return self.bb.emit(expr, name) if name else self.bb.emit(expr)

    def const(self, arr, dtype: str):
        return self.relax.const(np.asarray(arr).astype(dtype), dtype)

    def cast(self, expr, dtype: str):
        if _dtype(expr) == dtype:
            return expr
        return self.emit(self.R.astype(expr, dtype))

    def record(self, node, realized: str, detail: str, nodes=()):
        self.records.append(
            {
                "node": node.name or f"{node.op_type}({','.join(node.output)})",
                "op_type": node.op_type,
                "realized": realized,
                "detail": detail,
                "outputs": list(node.output),
                "_links": sorted(nodes),
            }
        )

    # ---------------------------------------------------------------- value conversions
    def to_float(self, v: _Value):
        """float32 relax expression of a value (dequantizing integer values)."""
        key = id(v)
        if key in self._floats:
            return self._floats[key][1]
        R = self.R
        if isinstance(v, _FloatV):
            out = self.cast(v.expr, "float32") if _dtype(v.expr) != "float32" else v.expr
        elif isinstance(v, _Const):
            out = self.relax.const(np.asarray(v.array, dtype=np.float32), "float32")
        elif isinstance(v, _IntV):
            out = self.cast(v.expr, "float32")
        elif isinstance(v, _QV) and self.opts.border_kernels == "separate":
            out = self._border_dequantize(v)
            if v.origin:
                self._mark_dequantized(v.origin)
        elif isinstance(v, _QV):
            # onnxruntime's DequantizeLinear: (float)(int32(q) - zp) * scale
            x = self.cast(v.expr, "int32")
            if v.zp:
                x = self.emit(R.subtract(x, self.const(v.zp, "int32")))
            x = self.cast(x, "float32")
            out = self.emit(R.multiply(x, self.const(np.float32(v.scale), "float32")))
            if v.origin:
                self._mark_dequantized(v.origin)
        elif isinstance(v, _AccV):
            out = None
            for t in v.terms:
                x = self._term_x(t, "int32")
                x = self.cast(x, "float32")
                x = self.emit(R.multiply(x, self.const(t.scale.astype(np.float32), "float32")))
                out = x if out is None else self.emit(R.add(out, x))
        elif isinstance(v, _ClampV):
            out = self._float_clip(self.to_float(v.inner), v.lo, v.hi)
        elif isinstance(v, _ConcatV):
            out = self.emit(R.concat([self.to_float(p) for p in v.parts], axis=v.axis))
        else:  # pragma: no cover - exhaustive
            raise TypeError(type(v))
        self._floats[key] = (v, out)
        return out

    # ---- border kernels of their own (border_kernels="separate")
    # The quantize of a float tensor and the dequantize of an integer one are then kernels that FuseOps leaves alone
    # (op pattern opaque): a float conv keeps the kernel it has in the all-float model and an integer conv the one it
    # has in the all-integer model, so a mixed configuration reuses both models' tuned kernels (see
    # hago.backend.compile.lower_and_fuse). Same arithmetic as the fused form.
    def _border_dequantize(self, v: "_QV"):
        from tvm import te

        zp, scale = int(v.zp), np.float32(v.scale)

        def dequantize(q):
            return te.compute(q.shape, lambda *i: (q[i].astype("int32") - zp).astype("float32") * scale,
                              name="dequantized")

        return self.emit(self.bb.call_te(dequantize, v.expr, primfunc_name_hint="hago_border_dequantize",
                                         primfunc_attrs={BORDER_ATTR: 1, "op_pattern": 8}))

    def _border_quantize(self, xf, scale, zp, dtype, qmin, qmax):
        from tvm import te

        s, z = np.float32(scale), np.float32(zp)

        def quantize(x):
            def f(*i):
                y = te.round(x[i].astype("float32") / s) + z
                return te.max(te.min(y, np.float32(qmax)), np.float32(qmin)).astype(dtype)

            return te.compute(x.shape, f, name="quantized")

        return self.emit(self.bb.call_te(quantize, xf, primfunc_name_hint="hago_border_quantize",
                                         primfunc_attrs={BORDER_ATTR: 1, "op_pattern": 8}))

    def _mark_dequantized(self, dq_name: str):
        for r in self.records:
            if r["node"] == dq_name and r["realized"] == "integer":
                r["realized"] = "border"
                r["detail"] = "dequantize to float (a float consumer uses it)"

    def _float_clip(self, x, lo: float, hi: float):
        R = self.R
        if np.isfinite(lo):
            x = self.emit(R.maximum(x, self.const(np.float32(lo), "float32")))
        if np.isfinite(hi):
            x = self.emit(R.minimum(x, self.const(np.float32(hi), "float32")))
        return x

    def expr_of(self, v: _Value):
        """A relax expression to feed a float-region op: float for quantized values, the raw tensor otherwise."""
        if isinstance(v, _IntV) or (isinstance(v, _QV) and v.int_tensor):
            return v.expr
        if isinstance(v, _FloatV):
            return v.expr
        return self.to_float(v)

    def shape_of(self, v: _Value) -> tuple:
        if isinstance(v, _Const):
            return tuple(np.asarray(v.array).shape)
        if isinstance(v, (_FloatV, _IntV, _QV)):
            return _shape(v.expr)
        if isinstance(v, (_AccV, _ConcatV)):
            return v.shape
        if isinstance(v, _ClampV):
            return self.shape_of(v.inner)
        raise TypeError(type(v))

    def as_qv(self, v: _Value, what: str) -> _QV:
        """The value as a plain quantized tensor, or raise _Fallback."""
        if isinstance(v, _QV):
            return v
        if isinstance(v, _ClampV) and isinstance(v.inner, _QV):
            q = v.inner
            lo_q = (v.lo / q.scale) if np.isfinite(v.lo) else -np.inf
            hi_q = (v.hi / q.scale) if np.isfinite(v.hi) else np.inf
            exact = all(not np.isfinite(b) or abs(b - round(b)) < 1e-4 for b in (lo_q, hi_q))
            if exact:
                qmin, qmax = clamp_bounds_to_q(v.lo, v.hi, q.scale, q.zp, q.qmin, q.qmax)
                return _QV(self._int_clip(q.expr, qmin, qmax, q), q.scale, q.zp, q.dtype, qmin, qmax, _nodes_of(v))
            raise _Fallback(f"{what} is clipped at bounds that are not on its quantization grid")
        if isinstance(v, _Const) and v.q is not None:
            q, s, z, _axis = v.q
            if _scalar(s) and _scalar(z):
                dt = str(q.dtype)
                lo, hi = dtype_range(dt)
                return _QV(self.relax.const(q, dt), float(np.ravel(s)[0]), int(np.ravel(z)[0]), dt, lo, hi)
        if isinstance(v, _Const):
            raise _Fallback(f"{what} is a float constant, not a quantized tensor")
        if isinstance(v, (_FloatV, _IntV)):
            raise _Fallback(f"{what} is not quantized (no QuantizeLinear/DequantizeLinear pair in front of it)")
        raise _Fallback(f"{what} is not a plain quantized tensor (pending requantize: {type(v).__name__[1:]})")

    def _int_clip(self, expr, qmin: int, qmax: int, q: _QV):
        if qmin <= q.qmin and qmax >= q.qmax:
            return expr
        return self.emit(self.R.clip(expr, int(qmin), int(qmax)))

    def terms_of(self, v: _Value, what: str) -> list:
        """The value as a list of integer terms (for Add/Sub), or raise _Fallback."""
        if isinstance(v, _AccV):
            return list(v.terms)
        q = self.as_qv(v, what)
        rank = len(_shape(q.expr))
        return [_Term(q.expr, np.full((1,) * rank, q.scale), np.full((1,) * rank, q.zp, dtype=np.int64),
                      _dtype_bits(q.dtype))]

    def _term_x(self, t: _Term, dtype: str):
        """``t.expr - t.zp`` in `dtype`."""
        x = self.cast(t.expr, dtype)
        if np.any(t.zp != 0):
            x = self.emit(self.R.subtract(x, self.const(t.zp, dtype)))
        return x

    # ---------------------------------------------------------------- requantize
    def requantize(self, v: _Value, scale: float, zp: int, dtype: str, qmin: int, qmax: int, where: str,
                   relu_lo: float = -np.inf, relu_hi: float = np.inf):
        """Integer expression of dtype for ``Q(v)`` with (scale, zp), bounds [qmin, qmax]."""
        R = self.R
        if isinstance(v, _ClampV):
            lo, hi = max(v.lo, relu_lo), min(v.hi, relu_hi)
            if self.opts.fold_relu:
                qmin, qmax = clamp_bounds_to_q(lo, hi, scale, zp, qmin, qmax)
                return self.requantize(v.inner, scale, zp, dtype, qmin, qmax, where)
            # unfolded: requantize, then apply the Relu/Clip as its own integer clip
            out = self.requantize(v.inner, scale, zp, dtype, qmin, qmax, where)
            blo, bhi = clamp_bounds_to_q(lo, hi, scale, zp, qmin, qmax)
            if (blo, bhi) != (qmin, qmax):
                out = self.emit(R.clip(out, blo, bhi))
            return out
        if isinstance(v, _ConcatV):
            parts = [self.requantize(p, scale, zp, dtype, qmin, qmax, where) for p in v.parts]
            return self.emit(R.concat(parts, axis=v.axis))
        if isinstance(v, _QV) and np.float32(v.scale) == np.float32(scale) and v.zp == zp:
            # same grid: Q(DQ(q)) == clip(q)
            x = v.expr
            if v.dtype != dtype:
                x = self.cast(x, "int32")
                lo_c, hi_c = max(qmin, v.qmin), min(qmax, v.qmax)
                if (lo_c, hi_c) != (v.qmin, v.qmax):
                    x = self.emit(R.clip(x, qmin, qmax))
                return self.cast(x, dtype)
            return self._int_clip(x, qmin, qmax, v)
        if isinstance(v, (_QV, _AccV)):
            terms = self.terms_of(v, where)
            return self._requant_terms(terms, scale, zp, dtype, qmin, qmax, where)
        raise _Fallback(f"cannot requantize a {type(v).__name__[1:]}")

    def _requant_terms(self, terms, scale, zp, dtype, qmin, qmax, where):
        R = self.R
        s_out = float(np.float32(scale))
        if self.opts.requantize == "float":
            acc = None
            for t in terms:
                x = self.cast(self._term_x(t, "int32"), "float32")
                m = (t.scale / s_out).astype(np.float32)
                x = self.emit(R.multiply(x, self.const(m, "float32")))
                acc = x if acc is None else self.emit(R.add(acc, x))
            y = self.emit(R.round(acc))  # half to even, like onnxruntime
            if zp:
                y = self.emit(R.add(y, self.const(np.float32(zp), "float32")))
            # max/min rather than clip: Relax's layout conversion moves binary elementwise ops to NHWC but has no
            # rule for clip (it would put a transpose between the conv and its cast to the integer type)
            y = self.emit(R.maximum(y, self.const(np.float32(qmin), "float32")))
            y = self.emit(R.minimum(y, self.const(np.float32(qmax), "float32")))
            return self.cast(y, dtype)
        # fixed point, int64: x * m0 then a rounding right shift (ties to even, like onnxruntime); m0 has at most
        # 31 bits and fewer for wide terms, so |x * m0| < 2**62
        def mult(t):
            bits = max(8, min(31, 62 - int(t.bits)))
            m0, shift = quantize_multiplier(t.scale / s_out, where=where, bits=bits)
            x = self.emit(R.multiply(self._term_x(t, "int64"), self.const(m0, "int64")))
            return x, shift

        if len(terms) == 1:
            x, shift = mult(terms[0])
            acc = self._rshift_rne(x, shift)
        else:
            # several terms (residual Add, separate bias): each rescaled to the output scale keeping `frac` extra
            # fraction bits, summed, then one rounding shift
            prods = [mult(t) for t in terms]
            frac = int(min(SUM_FRAC_BITS, min(int(np.min(sh)) for _x, sh in prods)))
            acc = None
            for x, shift in prods:
                x = self._rshift_rne(x, shift - frac)
                acc = x if acc is None else self.emit(R.add(acc, x))
            acc = self._rshift_rne(acc, np.array(frac, np.int64))
        if zp:
            acc = self.emit(R.add(acc, self.const(np.int64(zp), "int64")))
        acc = self.emit(R.clip(acc, int(qmin), int(qmax)))
        return self.cast(acc, dtype)

    def _rshift_rne(self, x, shift: np.ndarray):
        """``round(x / 2**shift)`` with ties to even, in int64 (shift >= 0, elementwise constant)."""
        R = self.R
        shift = np.asarray(shift, np.int64)
        if not np.any(shift > 0):
            return x
        s_c = self.const(shift, "int64")
        half_m1 = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)) - 1, 0)
        lsb = self.emit(R.bitwise_and(self.emit(R.right_shift(x, s_c)), self.const(np.where(shift > 0, 1, 0), "int64")))
        x = self.emit(R.add(self.emit(R.add(x, self.const(half_m1, "int64"))), lsb))
        return self.emit(R.right_shift(x, s_c))

    # ---------------------------------------------------------------- driver
    def run(self):
        model = self.model
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = int(imp.version)
        if self.opset == 0:
            raise ModelError("realize: the model has no default-domain opset import")
        if self.opset > _MAX_OPSET:
            raise ModelError(f"realize: opset {self.opset} is newer than the supported {_MAX_OPSET}")
        g = model.graph
        for init in g.initializer:
            self.values[init.name] = _Const(numpy_helper.to_array(init))
        params = []
        for inp in g.input:
            if inp.name in self.values:
                continue
            tt = inp.type.tensor_type
            if inp.name in self.input_shapes:
                shape = [int(d) for d in self.input_shapes[inp.name]]
            else:
                shape = []
                for i, d in enumerate(tt.shape.dim):
                    if d.HasField("dim_value") and d.dim_value > 0:
                        shape.append(int(d.dim_value))
                    else:
                        raise ModelError(
                            f"realize: graph input {inp.name!r} has a symbolic dimension {i} "
                            f"({d.dim_param or '?'}); pass input_shapes={{{inp.name!r}: [...]}}"
                        )
            np_dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            var = self.relax.Var(inp.name, self.relax.TensorType(shape, str(np.dtype(np_dtype))))
            params.append(var)
            val = _FloatV(var) if np.issubdtype(np_dtype, np.floating) else _IntV(var)
            self.values[inp.name] = val
        for node in g.node:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        self._graph_outputs = {o.name for o in g.output}
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for node in g.node:
                    if id(node) in self._skip:
                        continue
                    self.lower_node(node)
                outs = []
                for o in g.output:
                    if o.name not in self.values:
                        raise ModelError(f"realize: graph output {o.name!r} is not produced by any node")
                    outs.append(self.output_expr(self.values[o.name]))
                result = outs[0] if len(outs) == 1 else self.relax.Tuple(outs)
                gv = self.bb.emit_output(result)
            self.bb.emit_func_output(gv)
        mod = self.bb.finalize()
        tr = self.relax.transform
        if self._pending_funcs:
            mod = tr.InlinePrivateFunctions()(mod)
        mod = tr.DeadCodeElimination(["main"])(mod)
        return mod, self._finish_records()

    def output_expr(self, v: _Value):
        if isinstance(v, _QV) and v.int_tensor:
            return v.expr
        if isinstance(v, _IntV):
            return v.expr
        if isinstance(v, _Const):
            arr = np.asarray(v.array)
            return self.relax.const(arr, str(arr.dtype))
        return self.to_float(v)

    def _finish_records(self) -> list[dict]:
        # integer regions: connected components of integer nodes linked through the values they exchange
        parent: dict[str, str] = {}

        def find(a):
            while parent.setdefault(a, a) != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        ints = [r for r in self.records if r["realized"] == "integer"]
        names = {r["node"] for r in ints}
        for r in ints:
            find(r["node"])
            for other in r["_links"]:
                if other in names:
                    parent[find(other)] = find(r["node"])
        roots: dict[str, int] = {}
        out = []
        for r in self.records:
            r = dict(r)
            r.pop("_links")
            if r["realized"] == "integer":
                r["region"] = roots.setdefault(find(r["node"]), len(roots))
            else:
                r["region"] = None
            out.append(r)
        return out

    # ---------------------------------------------------------------- nodes
    def lower_node(self, node):
        for name in node.input:
            if name and name not in self.values:
                raise ModelError(
                    f"realize: node {node.name!r} ({node.op_type}) reads {name!r}, which no earlier node produces "
                    "(the graph is not topologically sorted or is missing an initializer)"
                )
        if node.domain not in ("", "ai.onnx"):
            self.float_node(node, f"custom domain {node.domain!r}")
            return
        ins = [self.values[n] if n else None for n in node.input]
        op = node.op_type
        # constant folding: everything constant -> numpy (onnx reference evaluator)
        if op == "Constant":
            self.values[node.output[0]] = _Const(self._constant_attr(node))
            self.record(node, "constant", "constant")
            return
        if op not in ("DequantizeLinear",) and ins and all(v is None or isinstance(v, _Const) for v in ins):
            self.fold_constant(node, ins)
            return
        if op == "Div":
            chain = self._match_sim_quantizer(node)
            if chain is not None:
                self.lower_sim_quantizer(node, chain)
                return
        if op in ("Cast", "Gather"):
            # hago's representations written with plain ONNX ops: SPARQ trims, packed embedding tables
            from . import realize_seeds as seeds

            if op == "Cast":
                m = seeds.match_sparq(self, node)
                if m is not None:
                    seeds.lower_sparq(self, m)
                    return
            else:
                m = seeds.match_embedding(self, node)
                if m is not None:
                    seeds.lower_embedding(self, m)
                    return
        handler = getattr(self, f"op_{op}", None)
        if op not in _INT_TENSOR_OK and any(isinstance(v, _QV) and v.int_tensor for v in ins):
            # an op reading a QuantizeLinear output directly computes on the integers with ONNX semantics
            self.float_node(node, f"{op} reads an integer tensor directly (ONNX integer semantics)")
            return
        if handler is not None:
            try:
                handler(node, ins)
                return
            except _Fallback as why:
                self.float_node(node, str(why))
                return
        self.float_node(node, f"{op} has no integer implementation")

    # ---- hago's simulated quantizer for containers QuantizeLinear lacks (int32):
    #      x -> Div(s) -> Round -> Add(zp) -> Clip(qmin, qmax) -> Sub(zp) -> Mul(s)
    def _only_consumer(self, tensor, op_type):
        users = self._consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type != op_type or tensor in self._graph_outputs:
            return None
        return users[0]

    def _scalar_const(self, name):
        v = self.values.get(name)
        if isinstance(v, _Const) and np.asarray(v.array).size == 1:
            return float(np.asarray(v.array).ravel()[0])
        return None

    def _match_sim_quantizer(self, div):
        if len(div.input) != 2:
            return None
        s = self._scalar_const(div.input[1])
        rnd = self._only_consumer(div.output[0], "Round")
        add = rnd and self._only_consumer(rnd.output[0], "Add")
        clip = add and self._only_consumer(add.output[0], "Clip")
        sub = clip and self._only_consumer(clip.output[0], "Sub")
        mul = sub and self._only_consumer(sub.output[0], "Mul")
        if s is None or s <= 0 or not mul or len(clip.input) != 3:
            return None
        zp_name = add.input[1] if add.input[0] == rnd.output[0] else add.input[0]
        zp = self._scalar_const(zp_name)
        qmin, qmax = self._scalar_const(clip.input[1]), self._scalar_const(clip.input[2])
        if sub.input[0] != clip.output[0] or self._scalar_const(sub.input[1]) != zp:
            return None
        s2 = self._scalar_const(mul.input[1] if mul.input[0] == sub.output[0] else mul.input[0])
        if None in (zp, qmin, qmax, s2) or np.float32(s2) != np.float32(s):
            return None
        if not all(float(v).is_integer() for v in (zp, qmin, qmax)) or qmin > qmax:
            return None
        # the bounds are float32 in the model: +-2**31 stands for the int32 range
        qmin, qmax = max(int(qmin), -(2**31)), min(int(qmax), 2**31 - 1)
        if not qmin <= zp <= qmax:
            return None
        return {"nodes": [rnd, add, clip, sub, mul], "scale": s, "zp": int(zp), "qmin": qmin, "qmax": qmax}

    def lower_sim_quantizer(self, div, chain):
        x = self.values[div.input[0]]
        s, zp, qmin, qmax = chain["scale"], chain["zp"], chain["qmin"], chain["qmax"]
        dtype = "int32"
        what = f"simulated quantizer {div.name!r}"
        expr = None
        if isinstance(x, _INTEGER_LIKE):
            try:
                expr = self.requantize(x, s, zp, dtype, qmin, qmax, where=what)
                nodes = _nodes_of(x) | {div.name}
                self.record(div, "integer", f"Div/Round/Add/Clip/Sub/Mul = Q/DQ to int32 [{qmin}, {qmax}]: requantize "
                            f"({self.opts.requantize})", nodes)
            except _Fallback:
                expr = None
        if expr is None:
            expr = self._float_quantize(self.expr_of(x), s, zp, dtype, qmin, qmax)
            nodes = frozenset({div.name})
            self.record(div, "border", f"Div/Round/Add/Clip = quantize a float tensor to int32 [{qmin}, {qmax}]")
        v = _QV(expr, s, zp, dtype, qmin, qmax, nodes)
        for n in chain["nodes"]:
            self._skip.add(id(n))
            self.record(n, "folded", f"part of the simulated quantizer starting at {div.name!r}")
        v.origin = chain["nodes"][-1].name or f"Mul({chain['nodes'][-1].output[0]})"
        self.values[chain["nodes"][-1].output[0]] = v

    def _constant_attr(self, node):
        from onnx.reference import ReferenceEvaluator

        g = helper.make_graph([node], "c", [], [helper.make_empty_tensor_value_info(node.output[0])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        return np.asarray(ReferenceEvaluator(m).run(None, {})[0])

    def fold_constant(self, node, ins):
        from onnx.reference import ReferenceEvaluator

        names = [n for n in node.input if n]
        inits = []
        for n in dict.fromkeys(names):
            inits.append(numpy_helper.from_array(np.asarray(self.values[n].array), n))
        g = helper.make_graph(
            [node], "c", [], [helper.make_empty_tensor_value_info(o) for o in node.output if o], initializer=inits
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        try:
            res = ReferenceEvaluator(m).run(None, {})
        except Exception as exc:  # noqa: BLE001 - any evaluator failure is a model problem
            raise ModelError(f"realize: cannot fold constant node {node.name!r} ({node.op_type}): {exc}") from exc
        for o, r in zip([o for o in node.output if o], res):
            self.values[o] = _Const(np.asarray(r))
        if node.op_type == "QuantizeLinear":
            self.record(node, "constant", "quantize of a constant, folded")
        else:
            self.record(node, "constant", "all inputs are constant, folded")

    # ---- Q / DQ
    def _qparams(self, node, ins, what: str):
        """(scale array, zp array, onnx elem type) of a Q/DQ node."""
        scale = ins[1]
        if not isinstance(scale, _Const):
            raise ModelError(f"realize: {what} node {node.name!r}: scale {node.input[1]!r} is not a constant")
        s = np.asarray(scale.array, dtype=np.float64)
        zp_v = ins[2] if len(ins) > 2 else None
        if zp_v is not None and not isinstance(zp_v, _Const):
            raise ModelError(f"realize: {what} node {node.name!r}: zero point {node.input[2]!r} is not a constant")
        if zp_v is not None:
            z = np.asarray(zp_v.array)
            elem = helper.np_dtype_to_tensor_dtype(z.dtype)
            z = z.astype(np.int64)
        else:
            elem = _attrs(node).get("output_dtype", 0) or onnx.TensorProto.UINT8
            z = np.zeros_like(s, dtype=np.int64)
        if np.any(s <= 0) or not np.all(np.isfinite(s)):
            raise ModelError(f"realize: {what} node {node.name!r}: scale must be positive and finite, got {s.ravel()[:4]}")
        if np.asarray(scale.array).size > 1 and _attrs(node).get("block_size", 0):
            raise _Fallback("blocked quantization (block_size) is not supported")
        return s, z, elem

    def op_QuantizeLinear(self, node, ins):
        s, z, elem = self._qparams(node, ins, "QuantizeLinear")
        try:
            dtype, qmin, qmax = qtype_info(elem)
        except KeyError:
            raise _Fallback(f"QuantizeLinear to element type {elem} is not an integer type") from None
        x = ins[0]
        out = node.output[0]
        if s.size == 1 and z.size == 1:
            scale, zp = float(np.ravel(s)[0]), int(np.ravel(z)[0])
            if isinstance(x, _INTEGER_LIKE):
                expr = self.requantize(x, scale, zp, dtype, qmin, qmax, where=f"QuantizeLinear {node.name!r}")
                nodes = _nodes_of(x) | {node.name}
                self.values[out] = _QV(expr, scale, zp, dtype, qmin, qmax, nodes, int_tensor=True)
                self.record(node, "integer", f"requantize to {dtype} ({self.opts.requantize})", nodes)
                return
            xf = self.expr_of(x)
            expr = self._float_quantize(xf, scale, zp, dtype, qmin, qmax)
            self.values[out] = _QV(expr, scale, zp, dtype, qmin, qmax, frozenset({node.name}), int_tensor=True)
            self.record(node, "border", "quantize a float tensor")
            return
        # per-axis quantization of an activation: quantize in float, keep the integer tensor unlabelled
        axis = _attrs(node).get("axis", 1)
        xf = self.expr_of(x)
        if qmin != dtype_range(dtype)[0] or qmax != dtype_range(dtype)[1]:
            raise _Fallback("per-axis QuantizeLinear to a sub-byte type")
        expr = self.emit(
            self.R.quantize(xf, self.const(s.astype(np.float32), "float32"), self.const(z, dtype), axis=axis,
                            out_dtype=dtype)
        )
        self.values[out] = _IntV(expr)
        self.record(node, "border", "per-axis quantize of a float tensor")

    def _float_quantize(self, xf, scale, zp, dtype, qmin, qmax):
        R = self.R
        if self.opts.border_kernels == "separate":
            return self._border_quantize(xf, scale, zp, dtype, qmin, qmax)
        if (qmin, qmax) == dtype_range(dtype):
            return self.emit(
                R.quantize(xf, self.const(np.float32(scale), "float32"), self.const(zp, dtype), axis=-1, out_dtype=dtype)
            )
        y = self.emit(R.divide(self.cast(xf, "float32"), self.const(np.float32(scale), "float32")))
        y = self.emit(R.round(y))
        y = self.emit(R.add(y, self.const(np.float32(zp), "float32")))
        y = self.emit(R.clip(y, float(qmin), float(qmax)))
        return self.cast(y, dtype)

    def op_DequantizeLinear(self, node, ins):
        s, z, elem = self._qparams(node, ins, "DequantizeLinear")
        x = ins[0]
        out = node.output[0]
        axis = _attrs(node).get("axis", 1)
        if isinstance(x, _Const):
            q = np.asarray(x.array)
            ax = axis if s.size > 1 else None
            if ax is not None:
                ax = ax % q.ndim
                bshape = [1] * q.ndim
                bshape[ax] = -1
                sf = s.astype(np.float32).reshape(bshape)
                zf = z.reshape(bshape)
            else:
                sf, zf = np.float32(np.ravel(s)[0]), int(np.ravel(z)[0])
            f = ((q.astype(np.int64) - zf).astype(np.float32) * sf).astype(np.float32)
            self.values[out] = _Const(f, (q, s, z, ax))
            self.record(node, "constant", "dequantize of a quantized initializer (kept as integer weights)")
            return
        if s.size == 1 and z.size == 1:
            scale, zp = float(np.ravel(s)[0]), int(np.ravel(z)[0])
            if isinstance(x, _QV):
                v = _QV(x.expr, scale, zp, x.dtype, x.qmin, x.qmax, _nodes_of(x) | {node.name})
            elif isinstance(x, _IntV):
                dt = _dtype(x.expr)
                lo, hi = dtype_range(dt)
                v = _QV(x.expr, scale, zp, dt, lo, hi, frozenset({node.name}))
            else:
                raise ModelError(f"realize: DequantizeLinear {node.name!r} reads a float tensor {node.input[0]!r}")
            v.origin = node.name or f"{node.op_type}({','.join(node.output)})"
            self.values[out] = v
            self.record(node, "integer", "quantized tensor passed on as integer", v.nodes)
            return
        # per-axis dequantize of an activation: float
        xe = x.expr if isinstance(x, (_QV, _IntV)) else self.expr_of(x)
        xi = self.cast(xe, "int32")
        rank = len(_shape(xe))
        bshape = [1] * rank
        bshape[axis % rank] = -1
        xi = self.emit(self.R.subtract(xi, self.const(z.reshape(bshape), "int32")))
        xf = self.cast(xi, "float32")
        self.values[out] = _FloatV(self.emit(self.R.multiply(xf, self.const(s.astype(np.float32).reshape(bshape), "float32"))))
        self.record(node, "border", "per-axis dequantize of an activation, in float")

    # ---- Conv / Gemm / MatMul
    def _weight(self, v, what: str, out_axis: int, ndim: int):
        """(int weights, per-output scale (O,), zero point array) of a quantized constant weight."""
        if not isinstance(v, _Const) or v.q is None:
            raise _Fallback(f"{what} is not a quantized constant (DequantizeLinear of an int initializer)")
        q, s, z, ax = v.q
        if q.ndim != ndim:
            raise _Fallback(f"{what} has rank {q.ndim}, expected {ndim}")
        if str(q.dtype) not in ("int8", "uint8", "int16", "uint16"):
            raise _Fallback(f"{what} has element type {q.dtype}")
        if s.size > 1 and ax != out_axis % ndim:
            raise _Fallback(f"{what} is quantized per channel on axis {ax}, not on the output axis {out_axis}")
        n_out = q.shape[out_axis]
        s_vec = np.broadcast_to(np.ravel(s).astype(np.float64), (n_out,)) if s.size > 1 else np.full(n_out, float(np.ravel(s)[0]))
        z_vec = np.broadcast_to(np.ravel(z).astype(np.int64), (n_out,)) if z.size > 1 else np.full(n_out, int(np.ravel(z)[0]))
        return q, np.array(s_vec, np.float64), np.array(z_vec, np.int64)

    def _bias_acc(self, bias_v, acc_scale: np.ndarray, n_out: int, what: str):
        """The bias as ``(int64 vector in accumulator units, None)`` when it is exact there (an int32 bias with
        scale s_x*s_w), else ``(None, (int64 vector, scale vector))`` on a finer grid, to be added as its own term
        (a float bias, or one whose scale differs: rounding it to accumulator units could cost a step when the output
        grid is finer than the accumulator's, e.g. int16 outputs). ``(None, None)`` without bias."""
        if bias_v is None:
            return None, None
        if not isinstance(bias_v, _Const):
            raise _Fallback(f"{what} is not constant")
        if bias_v.q is not None:
            q, s, z, _ax = bias_v.q
            if q.size not in (1, n_out) or np.asarray(s).size not in (1, n_out) or np.asarray(z).size not in (1, n_out):
                raise _Fallback(f"{what} has {q.size} values for {n_out} output channels")
            qv = np.broadcast_to(q.astype(np.int64).ravel(), (n_out,))
            sv = np.broadcast_to(np.ravel(s).astype(np.float64), (n_out,))
            zv = np.broadcast_to(np.ravel(z).astype(np.int64), (n_out,))
            if np.all(np.abs(sv / acc_scale - 1.0) < 1e-6):
                return (qv - zv).astype(np.int64), None
            b = (qv - zv) * sv
        else:
            b = np.asarray(bias_v.array, dtype=np.float64)
            if b.size not in (1, n_out):
                raise _Fallback(f"{what} has {b.size} values for {n_out} output channels")
            b = np.broadcast_to(b.ravel(), (n_out,))
        fine = np.maximum(acc_scale / 256.0, np.abs(b) / 2.0**30)
        fine = np.where(fine > 0, fine, 1.0)
        return None, (np.rint(b / fine).astype(np.int64), fine)

    def _bias_terms(self, bias_term, shape) -> list:
        if bias_term is None:
            return []
        b, fine = bias_term
        bits = int(np.ceil(np.log2(float(np.max(np.abs(b))) + 2)))
        return [_Term(self.const(b.reshape(shape), "int64"), fine.reshape(shape), np.zeros((1,) * len(shape), np.int64),
                      bits)]

    def _acc_const(self, arr, shape):
        acc_dt = self.opts.accumulator
        lo, hi = dtype_range(acc_dt)
        return self.const(np.clip(np.asarray(arr, np.int64), lo, hi).reshape(shape), acc_dt)

    def op_Conv(self, node, ins):
        R = self.R
        a = _attrs(node)
        x = self.as_qv(ins[0], f"Conv input {node.input[0]!r}")
        xshape = _shape(x.expr)
        if len(xshape) != 4:
            raise _Fallback(f"only 2-D convolutions are realized in integer (input rank {len(xshape)})")
        q, s_w, z_w = self._weight(ins[1], f"Conv weight {node.input[1]!r}", 0, 4)
        o_ch, _cg, kh, kw = q.shape
        group = int(a.get("group", 1))
        strides = list(a.get("strides", [1, 1]))
        dil = list(a.get("dilations", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0, 0, 0, 0]
            for i, (n, k, st, d) in enumerate(zip(xshape[2:], (kh, kw), strides, dil)):
                out_n = -(-n // st)
                total = max(0, (out_n - 1) * st + (k - 1) * d + 1 - n)
                small, big = total // 2, total - total // 2
                pads[i], pads[i + 2] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        elif auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        acc_scale = x.scale * s_w
        bias, bias_term = self._bias_acc(ins[2] if len(ins) > 2 else None, acc_scale, o_ch,
                                         f"Conv bias {node.input[2] if len(node.input) > 2 else ''!r}")
        acc_dt = self.opts.accumulator
        xin = x.expr
        corr = np.zeros(o_ch, np.int64)
        if np.all(z_w == 0) and str(q.dtype) in ("int8", "int16") and x.dtype in ("uint8", "int8", "int16"):
            # zero-point-expanded form: pad with zp_x explicitly, convolve the raw tensors, subtract zp_x * sum(w)
            w = self.const(q, str(q.dtype))
            if x.zp != 0:
                if any(pads):
                    xin = self.emit(R.nn.pad(xin, [0, 0, 0, 0, pads[0], pads[2], pads[1], pads[3]], "constant", float(x.zp)))
                    pads = [0, 0, 0, 0]
                corr = -x.zp * q.astype(np.int64).reshape(o_ch, -1).sum(axis=1)
            form = "zero-point-expanded"
        else:
            # subtract form: (x - zp_x) and (w - zp_w) in int16
            sd = _sub_dtype(x.dtype, str(q.dtype))
            xin = self.emit(R.subtract(self.cast(xin, sd), self.const(x.zp, sd)))
            wz = q.astype(np.int64) - z_w.reshape(-1, 1, 1, 1)
            w = self.const(wz, sd)
            form = f"zero points subtracted in {sd}"
        acc = self.emit(
            R.nn.conv2d(xin, w, strides=strides, padding=[pads[0], pads[1], pads[2], pads[3]], dilation=dil,
                        groups=group, out_dtype=acc_dt)
        )
        total = corr + (bias if bias is not None else 0)
        if np.any(total != 0):
            acc = self.emit(R.add(acc, self._acc_const(total, (1, o_ch, 1, 1))))
        nodes = _nodes_of(ins[0]) | {node.name}
        terms = [_Term(acc, acc_scale.reshape(1, o_ch, 1, 1), np.zeros((1, 1, 1, 1), np.int64))]
        terms += self._bias_terms(bias_term, (1, o_ch, 1, 1))
        self.values[node.output[0]] = _AccV(terms, _shape(acc), nodes)
        self.record(node, "integer",
                    f"conv2d {x.dtype}x{q.dtype}->{acc_dt} ({form}, "
                    f"{'per-channel' if np.unique(s_w).size > 1 else 'per-tensor'} weights"
                    f"{', int32 bias' if bias is not None else ''}{', float bias as its own term' if bias_term else ''})",
                    nodes)

    def _matmul_core(self, a_v, w_q, s_w, z_w):
        """int accumulator of a (..., K) @ w_q (K, N); returns (acc expr, acc scale (N,), correction (N,))."""
        R = self.R
        acc_dt = self.opts.accumulator
        a = a_v
        corr = np.zeros(w_q.shape[1], np.int64)
        if np.all(z_w == 0) and str(w_q.dtype) in ("int8", "int16") and a.dtype in ("uint8", "int8", "int16"):
            acc = self.emit(R.matmul(a.expr, self.const(w_q, str(w_q.dtype)), out_dtype=acc_dt))
            if a.zp:
                corr = -a.zp * w_q.astype(np.int64).sum(axis=0)
        else:
            sd = _sub_dtype(a.dtype, str(w_q.dtype))
            ai = self.emit(R.subtract(self.cast(a.expr, sd), self.const(a.zp, sd)))
            wz = w_q.astype(np.int64) - z_w.reshape(1, -1)
            acc = self.emit(R.matmul(ai, self.const(wz, sd), out_dtype=acc_dt))
        return acc, a.scale * s_w, corr

    def op_Gemm(self, node, ins):
        R = self.R
        at = _attrs(node)
        alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
        trans_a, trans_b = int(at.get("transA", 0)), int(at.get("transB", 0))
        a = self.as_qv(ins[0], f"Gemm input {node.input[0]!r}")
        if trans_a:
            a = _QV(self.emit(R.permute_dims(a.expr, [1, 0])), a.scale, a.zp, a.dtype, a.qmin, a.qmax, a.nodes)
        q, s_w, z_w = self._weight(ins[1], f"Gemm weight {node.input[1]!r}", 0 if trans_b else 1, 2)
        if trans_b:
            q = np.ascontiguousarray(q.T)
        n_out = q.shape[1]
        acc, acc_scale, corr = self._matmul_core(a, q, s_w, z_w)
        acc_scale = acc_scale * alpha
        bias, bias_term = None, None
        if len(ins) > 2 and ins[2] is not None:
            c = ins[2]
            if isinstance(c, _Const) and np.asarray(c.array).size not in (1, n_out):
                raise _Fallback("Gemm C is not a per-column bias")
            if isinstance(c, _Const) and np.asarray(c.array).ndim == 2 and np.asarray(c.array).shape[0] != 1:
                raise _Fallback("Gemm C is not a per-column bias")
            bias, bias_term = self._bias_acc(_scaled_const(c, beta), acc_scale, n_out, f"Gemm C {node.input[2]!r}")
        total = corr + (bias if bias is not None else 0)
        if np.any(total != 0):
            acc = self.emit(R.add(acc, self._acc_const(total, (1, n_out))))
        nodes = _nodes_of(ins[0]) | {node.name}
        terms = [_Term(acc, acc_scale.reshape(1, n_out), np.zeros((1, 1), np.int64))]
        terms += self._bias_terms(bias_term, (1, n_out))
        self.values[node.output[0]] = _AccV(terms, _shape(acc), nodes)
        self.record(node, "integer", f"matmul {a.dtype}x{q.dtype}->{self.opts.accumulator}"
                    f"{', bias' if bias is not None or bias_term else ''}", nodes)

    def op_MatMul(self, node, ins):
        R = self.R
        a = self.as_qv(ins[0], f"MatMul input {node.input[0]!r}")
        b_v = ins[1]
        nodes = _nodes_of(ins[0], ins[1]) | {node.name}
        if isinstance(b_v, _Const):
            q, s_w, z_w = self._weight(b_v, f"MatMul weight {node.input[1]!r}", 1, 2)
            acc, acc_scale, corr = self._matmul_core(a, q, s_w, z_w)
            n_out = q.shape[1]
            if np.any(corr != 0):
                acc = self.emit(R.add(acc, self._acc_const(corr, (n_out,))))
            rank = len(_shape(acc))
            term = _Term(acc, acc_scale.reshape((1,) * (rank - 1) + (n_out,)), np.zeros((1,) * rank, np.int64))
            detail = f"matmul {a.dtype}x{q.dtype}->{self.opts.accumulator}"
        else:
            b = self.as_qv(b_v, f"MatMul input {node.input[1]!r}")
            sd = _sub_dtype(a.dtype, b.dtype)
            ai = self.emit(R.subtract(self.cast(a.expr, sd), self.const(a.zp, sd)))
            bi = self.emit(R.subtract(self.cast(b.expr, sd), self.const(b.zp, sd)))
            acc = self.emit(R.matmul(ai, bi, out_dtype=self.opts.accumulator))
            rank = len(_shape(acc))
            term = _Term(acc, np.full((1,) * rank, a.scale * b.scale), np.zeros((1,) * rank, np.int64))
            detail = f"matmul of two quantized tensors -> {self.opts.accumulator}"
        self.values[node.output[0]] = _AccV([term], _shape(acc), nodes)
        self.record(node, "integer", detail, nodes)

    # ---- elementwise
    def _clip_bounds(self, node, ins):
        if node.op_type == "Relu":
            return 0.0, np.inf
        a = _attrs(node)
        if self.opset < 11:
            return float(a.get("min", -np.inf)), float(a.get("max", np.inf))
        lo, hi = -np.inf, np.inf
        for i, which in ((1, "min"), (2, "max")):
            if len(ins) > i and ins[i] is not None:
                if not isinstance(ins[i], _Const):
                    raise _Fallback(f"Clip {which} {node.input[i]!r} is not a constant")
                val = float(np.asarray(ins[i].array).ravel()[0])
                lo, hi = (val, hi) if i == 1 else (lo, val)
        return lo, hi

    def op_Relu(self, node, ins):
        self._clamp(node, ins)

    def op_Clip(self, node, ins):
        self._clamp(node, ins)

    def _clamp(self, node, ins):
        lo, hi = self._clip_bounds(node, ins)
        x = ins[0]
        if not isinstance(x, _INTEGER_LIKE):
            raise _Fallback("input is not quantized")
        if isinstance(x, _ClampV):
            v = _ClampV(x.inner, max(x.lo, lo), min(x.hi, hi), _nodes_of(x) | {node.name})
        else:
            v = _ClampV(x, lo, hi, _nodes_of(x) | {node.name})
        self.values[node.output[0]] = v
        how = "folded into the requantize bounds" if self.opts.fold_relu else "integer clip after requantize"
        self.record(node, "integer", f"[{lo:g}, {hi:g}] {how}", v.nodes)

    def op_Add(self, node, ins):
        self._add_sub(node, ins, +1.0)

    def op_Sub(self, node, ins):
        self._add_sub(node, ins, -1.0)

    def _add_sub(self, node, ins, sign):
        if not all(isinstance(v, _INTEGER_LIKE) or (isinstance(v, _Const) and v.q is not None) for v in ins):
            raise _Fallback("an input is not quantized")
        ta = self.terms_of(ins[0], f"{node.op_type} input {node.input[0]!r}")
        tb = self.terms_of(ins[1], f"{node.op_type} input {node.input[1]!r}")
        if sign < 0:
            tb = [_Term(t.expr, -t.scale, t.zp) for t in tb]
        shape = _bshape(self.shape_of(ins[0]), self.shape_of(ins[1]))
        nodes = _nodes_of(*ins) | {node.name}
        self.values[node.output[0]] = _AccV(ta + tb, shape, nodes)
        self.record(node, "integer", "terms rescaled to the output scale and summed (int64)", nodes)

    def op_Mul(self, node, ins):
        R = self.R
        if not all(isinstance(v, _INTEGER_LIKE) or (isinstance(v, _Const) and v.q is not None) for v in ins):
            raise _Fallback("an input is not quantized")
        a = self.as_qv(ins[0], f"Mul input {node.input[0]!r}")
        b = self.as_qv(ins[1], f"Mul input {node.input[1]!r}")
        pbits = _dtype_bits(a.dtype) + _dtype_bits(b.dtype)
        if pbits > 62:
            raise _Fallback("the product of two 32-bit quantized tensors does not fit int64")
        pd = "int32" if pbits <= 31 else "int64"
        ai = self._term_x(self.terms_of(a, "")[0], pd)
        bi = self._term_x(self.terms_of(b, "")[0], pd)
        prod = self.emit(R.multiply(ai, bi))
        rank = len(_shape(prod))
        nodes = _nodes_of(*ins) | {node.name}
        self.values[node.output[0]] = _AccV(
            [_Term(prod, np.full((1,) * rank, a.scale * b.scale), np.zeros((1,) * rank, np.int64),
                   pbits)], _shape(prod), nodes
        )
        self.record(node, "integer", "int32 product, requantized", nodes)

    def op_Concat(self, node, ins):
        R = self.R
        axis = int(_attrs(node).get("axis"))
        if not all(isinstance(v, _INTEGER_LIKE) or (isinstance(v, _Const) and v.q is not None) for v in ins):
            raise _Fallback("an input is not quantized")
        shapes = [self.shape_of(v) for v in ins]
        rank = len(shapes[0])
        axis = axis % rank
        out_shape = list(shapes[0])
        out_shape[axis] = sum(s[axis] for s in shapes)
        nodes = _nodes_of(*ins) | {node.name}
        qs = []
        for i, v in enumerate(ins):
            try:
                qs.append(self.as_qv(v, f"Concat input {node.input[i]!r}"))
            except _Fallback:
                qs = None
                break
        if qs and all((np.float32(q.scale), q.zp, q.dtype) == (np.float32(qs[0].scale), qs[0].zp, qs[0].dtype) for q in qs):
            expr = self.emit(R.concat([q.expr for q in qs], axis=axis))
            q0 = qs[0]
            self.values[node.output[0]] = _QV(expr, q0.scale, q0.zp, q0.dtype, min(q.qmin for q in qs),
                                              max(q.qmax for q in qs), nodes)
            self.record(node, "integer", "concat of tensors on the same grid", nodes)
            return
        parts = [qs[i] if qs else (self.as_qv(v, f"Concat input {node.input[i]!r}") if isinstance(v, _Const) else v)
                 for i, v in enumerate(ins)]
        self.values[node.output[0]] = _ConcatV(parts, axis, tuple(out_shape), nodes)
        self.record(node, "integer", "concat; inputs requantized to the output scale", nodes)

    # ---- pooling
    def op_MaxPool(self, node, ins):
        R = self.R
        if len([o for o in node.output if o]) > 1:
            raise _Fallback("MaxPool with an indices output")
        try:
            x = self.as_qv(ins[0], f"MaxPool input {node.input[0]!r}")
            how = ""
        except _Fallback:
            if not isinstance(ins[0], (_AccV, _ClampV, _ConcatV)):
                raise
            # a pending requantize (e.g. the float sum of multipoint branches, then Relu): when the pooled tensor only
            # goes (through data movement) to one QuantizeLinear, requantize first and pool the integers; max commutes
            # with the monotone requantize, so the result is that of pooling the float tensor and quantizing
            x, q_node = self._requantize_for_consumer_q(node, ins[0])
            how = f" (input requantized to the grid of {q_node.name!r} first: max commutes with it)"
        a = _attrs(node)
        if len(_shape(x.expr)) != 4:
            raise _Fallback("only 2-D MaxPool is realized in integer")
        pads = self._pool_pads(node, a, _shape(x.expr))
        expr = self.emit(
            R.nn.max_pool2d(x.expr, pool_size=list(a["kernel_shape"]), strides=list(a.get("strides", [1, 1])),
                            padding=pads, dilation=list(a.get("dilations", [1, 1])),
                            ceil_mode=bool(a.get("ceil_mode", 0)))
        )
        nodes = _nodes_of(ins[0]) | {node.name}
        self.values[node.output[0]] = _QV(expr, x.scale, x.zp, x.dtype, x.qmin, x.qmax, nodes, x.int_tensor)
        self.record(node, "integer", f"max_pool2d on {x.dtype}{how}", nodes)

    # ops through which a monotone requantize can be moved backwards (they commute with it)
    _MONOTONE_PATH = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Relu", "Clip")

    def _requantize_for_consumer_q(self, node, v):
        """``v`` requantized to the grid of the one QuantizeLinear that `node`'s output reaches through
        :attr:`_MONOTONE_PATH` ops, as ``(_QV, Q node)``; raise _Fallback when there is no such Q."""
        t = node.output[0]
        for _ in range(64):
            users = self._consumers.get(t, [])
            if t in self._graph_outputs or len(users) != 1 or users[0].input[0] != t:
                raise _Fallback(f"{node.op_type} input {node.input[0]!r} is a pending requantize and its output "
                                "does not go to a single QuantizeLinear")
            u = users[0]
            if u.op_type == "QuantizeLinear" and u.domain in ("", "ai.onnx"):
                break
            if u.op_type not in self._MONOTONE_PATH or u.domain not in ("", "ai.onnx") or \
                    len([o for o in u.output if o]) != 1:
                raise _Fallback(f"{node.op_type} input {node.input[0]!r} is a pending requantize and its output "
                                f"goes to {u.op_type}")
            t = u.output[0]
        else:  # pragma: no cover - absurdly long chains
            raise _Fallback("chain to the QuantizeLinear is too long")
        qins = [None] + [self.values.get(i) if i else None for i in u.input[1:]]
        try:
            s, z, elem = self._qparams(u, qins, "QuantizeLinear")
            dtype, qmin, qmax = qtype_info(elem)
        except (ModelError, KeyError):
            raise _Fallback(f"QuantizeLinear {u.name!r} has no constant per-tensor parameters") from None
        if s.size != 1 or z.size != 1:
            raise _Fallback(f"QuantizeLinear {u.name!r} is per axis")
        scale, zp = float(np.ravel(s)[0]), int(np.ravel(z)[0])
        expr = self.requantize(v, scale, zp, dtype, qmin, qmax, where=f"{node.op_type} {node.name!r}")
        return _QV(expr, scale, zp, dtype, qmin, qmax, _nodes_of(v)), u

    def _pool_pads(self, node, a, xshape):
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        k = list(a["kernel_shape"])
        st = list(a.get("strides", [1] * len(k)))
        dil = list(a.get("dilations", [1] * len(k)))
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0, 0, 0, 0]
            for i, n in enumerate(xshape[2:]):
                out_n = -(-n // st[i])
                total = max(0, (out_n - 1) * st[i] + (k[i] - 1) * dil[i] + 1 - n)
                small, big = total // 2, total - total // 2
                pads[i], pads[i + 2] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
            return pads
        if auto_pad == "VALID":
            return [0, 0, 0, 0]
        return list(a.get("pads", [0, 0, 0, 0]))

    def op_AveragePool(self, node, ins):
        R = self.R
        x = self.as_qv(ins[0], f"AveragePool input {node.input[0]!r}")
        a = _attrs(node)
        shape = _shape(x.expr)
        if len(shape) != 4:
            raise _Fallback("only 2-D AveragePool is realized in integer")
        n, c, h, w = shape
        kh, kw = a["kernel_shape"]
        sh, sw = a.get("strides", [1, 1])
        dh, dw = a.get("dilations", [1, 1])
        pads = self._pool_pads(node, a, shape)
        ceil = bool(a.get("ceil_mode", 0))
        include = bool(a.get("count_include_pad", 0))

        def out_len(size, k, s, d, p0, p1):
            span = size + p0 + p1 - ((k - 1) * d + 1)
            o = (-(-span // s) if ceil else span // s) + 1
            if ceil and (o - 1) * s >= size + p0:  # last window must start inside the input or left pad
                o -= 1
            return o

        oh = out_len(h, kh, sh, dh, pads[0], pads[2])
        ow = out_len(w, kw, sw, dw, pads[1], pads[3])
        # extra bottom/right zeros so that the sum-conv produces oh x ow
        need_h = (oh - 1) * sh + (kh - 1) * dh + 1 - (h + pads[0])
        need_w = (ow - 1) * sw + (kw - 1) * dw + 1 - (w + pads[1])

        def counts(size, k, s, d, p0, p1, o):
            cnt = np.zeros(o, np.int64)
            for i in range(o):
                start = i * s - p0
                idx = start + np.arange(k) * d
                if include:
                    cnt[i] = np.sum((idx >= -p0) & (idx < size + p1))
                else:
                    cnt[i] = np.sum((idx >= 0) & (idx < size))
            return cnt

        ch = counts(h, kh, sh, dh, pads[0], pads[2], oh)
        cw = counts(w, kw, sw, dw, pads[1], pads[3], ow)
        cnt = np.outer(ch, cw).reshape(1, 1, oh, ow).astype(np.float64)
        if np.any(cnt <= 0):
            raise _Fallback("AveragePool window with no input element")
        wide = _dtype_bits(x.dtype) > 17
        sd = "int64" if wide else _sub_dtype(x.dtype)
        xi = self.emit(R.subtract(self.cast(x.expr, sd), self.const(x.zp, sd)))
        ones = self.const(np.ones((c, 1, kh, kw)), sd)
        acc = self.emit(
            R.nn.conv2d(xi, ones, strides=[sh, sw], padding=[pads[0], pads[1], max(need_h, 0), max(need_w, 0)],
                        dilation=[dh, dw], groups=c, out_dtype="int64" if wide else "int32")
        )
        sum_bits = _dtype_bits(x.dtype) + int(np.ceil(np.log2(kh * kw)))
        if _shape(acc) != (n, c, oh, ow):
            acc = self.emit(R.strided_slice(acc, axes=[2, 3], begin=[0, 0], end=[oh, ow]))
        nodes = _nodes_of(ins[0]) | {node.name}
        term = _Term(acc, x.scale / cnt, np.zeros((1, 1, 1, 1), np.int64), sum_bits)
        self.values[node.output[0]] = _AccV([term], (n, c, oh, ow), nodes)
        self.record(node, "integer", "int32 window sums (depthwise conv with ones), requantized with 1/count", nodes)

    def op_GlobalAveragePool(self, node, ins):
        R = self.R
        if isinstance(ins[0], (_AccV, _ClampV)) and not (isinstance(ins[0], _ClampV) and isinstance(ins[0].inner, _QV)):
            return self._gap_of_accumulator(node, ins[0])
        x = self.as_qv(ins[0], f"GlobalAveragePool input {node.input[0]!r}")
        shape = _shape(x.expr)
        if len(shape) < 3:
            raise _Fallback("GlobalAveragePool of a tensor of rank < 3")
        axes = list(range(2, len(shape)))
        count = int(np.prod(shape[2:]))
        wide = _dtype_bits(x.dtype) > 17
        acc = self.emit(R.sum(self.cast(x.expr, "int64" if wide else "int32"), axis=axes, keepdims=True))
        rank = len(shape)
        nodes = _nodes_of(ins[0]) | {node.name}
        term = _Term(acc, np.full((1,) * rank, x.scale / count), np.full((1,) * rank, x.zp * count, np.int64),
                     _dtype_bits(x.dtype) + int(np.ceil(np.log2(max(count, 2)))))
        self.values[node.output[0]] = _AccV([term], _shape(acc), nodes)
        self.record(node, "integer", "int32 sum, requantized with 1/count", nodes)

    def _fine_grid(self, v, what: str):
        """An accumulator (or a Relu/Clip of one) on a per-channel grid ``f`` as fine as its finest term:
        ``(int64 expr, f (1, C, 1, ...), bits)``; each term is rescaled with the fixed-point multiplier (round half
        to even), so the value is exact up to half a step of ``f``."""
        R = self.R
        lo, hi, inner = -np.inf, np.inf, v
        if isinstance(v, _ClampV):
            lo, hi, inner = v.lo, v.hi, v.inner
        if not isinstance(inner, (_AccV, _QV)):
            raise _Fallback(f"{what} is not an accumulator")
        terms = self.terms_of(inner, what)
        shape = self.shape_of(inner)
        rank = len(shape)
        if rank < 2:
            raise _Fallback(f"{what} has rank {rank}")
        red = tuple(i for i in range(rank) if i != 1)
        f = None
        for t in terms:
            a = np.abs(np.broadcast_to(t.scale, (1, shape[1]) + tuple(shape[2:])))
            a = np.where(a > 0, a, np.inf).min(axis=red, keepdims=True)
            f = a if f is None else np.minimum(f, a)
        if not np.all(np.isfinite(f)):
            raise _Fallback(f"{what} has a channel without a nonzero scale")
        bits = 0
        fine = []
        for t in terms:
            ratio = np.abs(t.scale) / f
            bits = max(bits, int(t.bits) + int(np.ceil(np.log2(max(float(np.max(ratio)), 1.0)))) + 1)
            fine.append(_Term(t.expr, t.scale / f, t.zp, t.bits))
        if bits > 60:
            raise _Fallback(f"{what}: the terms are too wide for an int64 fine grid")
        big = 2**62
        y = self._requant_terms(fine, 1.0, 0, "int64", -big, big, where=what)
        if np.isfinite(lo):
            y = self.emit(R.maximum(y, self.const(np.rint(np.float64(lo) / f).astype(np.int64), "int64")))
        if np.isfinite(hi):
            y = self.emit(R.minimum(y, self.const(np.rint(np.float64(hi) / f).astype(np.int64), "int64")))
        return y, f, bits

    def _gap_of_accumulator(self, node, v):
        R = self.R
        what = f"GlobalAveragePool input {node.input[0]!r}"
        y, f, bits = self._fine_grid(v, what)
        shape = _shape(y)
        if len(shape) < 3:
            raise _Fallback("GlobalAveragePool of a tensor of rank < 3")
        count = int(np.prod(shape[2:]))
        acc = self.emit(R.sum(y, axis=list(range(2, len(shape))), keepdims=True))
        nodes = _nodes_of(v) | {node.name}
        term = _Term(acc, f / count, np.zeros((1,) * len(shape), np.int64),
                     bits + int(np.ceil(np.log2(max(count, 2)))))
        self.values[node.output[0]] = _AccV([term], _shape(acc), nodes)
        self.record(node, "integer", "accumulator rescaled to a per-channel int64 grid as fine as its finest term, "
                    "int64 sum, requantized with 1/count", nodes)

    # ---- data movement on quantized tensors
    def _move_value(self, x, fn, np_fn):
        """`x` (a quantized tensor, an accumulator, or a Relu/Clip of one) moved by `fn` (relax) / `np_fn` (numpy,
        for per-channel scales), or None."""
        if isinstance(x, _QV):
            return _QV(fn(x.expr), x.scale, x.zp, x.dtype, x.qmin, x.qmax, x.nodes, x.int_tensor)
        if isinstance(x, _ClampV):
            inner = self._move_value(x.inner, fn, np_fn)
            return None if inner is None else _ClampV(inner, x.lo, x.hi, x.nodes)
        if not isinstance(x, _AccV):
            return None
        if all(t.scale.size == 1 and t.zp.size == 1 and _shape(t.expr) == x.shape for t in x.terms):
            terms = []
            for t in x.terms:
                e = fn(t.expr)
                rank = len(_shape(e))
                terms.append(_Term(e, np.full((1,) * rank, float(t.scale.ravel()[0])),
                                   np.full((1,) * rank, int(t.zp.ravel()[0]), np.int64), t.bits))
            return _AccV(terms, _shape(terms[0].expr), x.nodes)
        if np_fn is None:
            return None
        terms = []
        for t in x.terms:
            e = t.expr if _shape(t.expr) == x.shape else self.emit(self.R.broadcast_to(t.expr, x.shape))
            e = fn(e)
            terms.append(_Term(e, _moved_param(t.scale, x.shape, np_fn), _moved_param(t.zp, x.shape, np_fn), t.bits))
        return _AccV(terms, _shape(terms[0].expr), x.nodes)

    def _movement(self, node, ins, fn, what, np_fn=None):
        x = ins[0]
        nodes = _nodes_of(x) | {node.name}
        if isinstance(x, (_AccV, _ClampV)):
            moved = self._move_value(x, fn, np_fn)
            if moved is not None:
                moved.nodes = nodes
                self.values[node.output[0]] = moved
                self.record(node, "integer", what + (" (accumulator)" if isinstance(x, _AccV) else ""), nodes)
                return
        q = self.as_qv(x, f"{node.op_type} input {node.input[0]!r}")
        self.values[node.output[0]] = _QV(fn(q.expr), q.scale, q.zp, q.dtype, q.qmin, q.qmax, nodes, q.int_tensor)
        self.record(node, "integer", what, nodes)

    def _const_input(self, node, ins, i, what):
        if len(ins) <= i or ins[i] is None:
            return None
        if not isinstance(ins[i], _Const):
            raise _Fallback(f"{what} {node.input[i]!r} is not a constant")
        return np.asarray(ins[i].array)

    def op_Reshape(self, node, ins):
        shape_in = self.shape_of(ins[0])
        target = self._const_input(node, ins, 1, "Reshape shape")
        allowzero = int(_attrs(node).get("allowzero", 0))
        t = [int(v) for v in target]
        if not allowzero:
            t = [shape_in[i] if v == 0 else v for i, v in enumerate(t)]
        if -1 in t:
            known = int(np.prod([v for v in t if v != -1]))
            t[t.index(-1)] = int(np.prod(shape_in)) // max(known, 1)
        self._movement(node, ins, lambda e: self.emit(self.R.reshape(e, t)), "reshape on integers",
                       lambda a: a.reshape(t))

    def op_Flatten(self, node, ins):
        shape_in = self.shape_of(ins[0])
        axis = int(_attrs(node).get("axis", 1)) % (len(shape_in) + 1) if shape_in else 0
        t = [int(np.prod(shape_in[:axis])), int(np.prod(shape_in[axis:]))]
        self._movement(node, ins, lambda e: self.emit(self.R.reshape(e, t)), "flatten on integers",
                       lambda a: a.reshape(t))

    def op_Transpose(self, node, ins):
        rank = len(self.shape_of(ins[0]))
        perm = list(_attrs(node).get("perm", list(range(rank))[::-1]))
        self._movement(node, ins, lambda e: self.emit(self.R.permute_dims(e, perm)), "transpose on integers",
                       lambda a: np.transpose(a, perm))

    def op_Squeeze(self, node, ins):
        shape_in = self.shape_of(ins[0])
        axes = _attrs(node).get("axes") if self.opset < 13 else self._const_input(node, ins, 1, "Squeeze axes")
        if axes is None:
            axes = [i for i, d in enumerate(shape_in) if d == 1]
        t = [d for i, d in enumerate(shape_in) if i not in {int(a) % len(shape_in) for a in axes}]
        self._movement(node, ins, lambda e: self.emit(self.R.reshape(e, t)), "squeeze on integers",
                       lambda a: a.reshape(t))

    def op_Unsqueeze(self, node, ins):
        shape_in = list(self.shape_of(ins[0]))
        axes = _attrs(node).get("axes") if self.opset < 13 else self._const_input(node, ins, 1, "Unsqueeze axes")
        out_rank = len(shape_in) + len(axes)
        axes = sorted(int(a) % out_rank for a in axes)
        t = shape_in
        for a in axes:
            t = t[:a] + [1] + t[a:]
        self._movement(node, ins, lambda e: self.emit(self.R.reshape(e, t)), "unsqueeze on integers",
                       lambda a: a.reshape(t))

    def op_Identity(self, node, ins):
        self.values[node.output[0]] = ins[0]
        self.record(node, "folded", "identity")

    def op_Dropout(self, node, ins):
        self.values[node.output[0]] = ins[0]
        if len(node.output) > 1 and node.output[1]:
            self.values[node.output[1]] = _Const(np.ones(self.shape_of(ins[0]), dtype=bool))
        self.record(node, "folded", "dropout is the identity at inference")

    def op_Shape(self, node, ins):
        shape = np.array(self.shape_of(ins[0]), np.int64)
        a = _attrs(node)
        start, end = a.get("start", 0), a.get("end", None)
        self.values[node.output[0]] = _Const(shape[start:end])
        self.record(node, "constant", "static shape")

    # ---- float fallback
    def float_node(self, node, reason: str):
        """Import one node with TVM's ONNX frontend and run it in float."""
        from tvm.relax.frontend.onnx import from_onnx

        inputs, args, inits, seen = [], [], [], {}
        for name in node.input:
            if not name or name in seen:
                continue
            v = self.values[name]
            seen[name] = True
            if isinstance(v, _Const):
                inits.append(numpy_helper.from_array(np.asarray(v.array), name))
                continue
            e = self.expr_of(v)
            dt = np.dtype(_dtype(e))
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dt), list(_shape(e))))
            args.append(e)
        outs = [o for o in node.output if o]
        g = helper.make_graph([node], "fallback", inputs, [helper.make_empty_tensor_value_info(o) for o in outs],
                              initializer=inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)] + [
            helper.make_opsetid(d.domain, d.version) for d in self.model.opset_import if d.domain not in ("", "ai.onnx")])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the one-node model has untyped outputs on purpose
                sub = from_onnx(m, keep_params_in_input=False)
        except Exception as exc:  # noqa: BLE001 - the importer raises many types
            raise CompileError(
                f"realize: node {node.name!r} ({node.op_type}) stays in float ({reason}) but TVM's ONNX importer "
                f"cannot import it: {exc}"
            ) from exc
        result = self._inline(sub, args, node)
        if len(outs) == 1:
            results = [result]
        else:
            results = [self.emit(self.relax.TupleGetItem(result, i)) for i in range(len(outs))]
        for o, r in zip(outs, results):
            dt = _dtype(r)
            self.values[o] = _FloatV(r) if dt.startswith(("float", "bfloat")) else _IntV(r)
        self.record(node, "float", reason)

    def _inline(self, sub, args, node):
        relax = self.relax
        uid = next(self._fallback_id)
        gv_map = {}
        main = None
        for gv, func in sub.functions_items():
            if gv.name_hint == "main":
                main = func
                continue
            new_gv = self.bb.add_func(func, f"hago_fb{uid}_{gv.name_hint}")
            gv_map[gv] = new_gv
        if gv_map:
            main = _replace_global_vars(main, gv_map)
        main = main.without_attr("global_symbol").without_attr("num_input")
        fgv = self.bb.add_func(main, f"hago_fb{uid}_{(node.op_type or 'op').lower()}")
        self._pending_funcs.append(fgv)
        return self.emit(relax.Call(fgv, args))


def _moved_param(p: np.ndarray, shape: tuple, np_fn) -> np.ndarray:
    """A term's scale or zero point (broadcastable to `shape`) moved like its tensor, with the axes along which it is
    constant kept at size 1."""
    out = np.asarray(np_fn(np.broadcast_to(np.asarray(p), shape)))
    for ax in range(out.ndim):
        if out.shape[ax] > 1:
            first = np.take(out, [0], axis=ax)
            if np.all(out == first):
                out = first
    return np.ascontiguousarray(out)


def _scaled_const(c: _Value, beta: float) -> _Value:
    if beta == 1.0 or not isinstance(c, _Const):
        return c
    if c.q is not None:
        q, s, z, ax = c.q
        return _Const(np.asarray(c.array) * beta, (q, np.asarray(s) * beta, z, ax))
    return _Const(np.asarray(c.array) * beta)


def _replace_global_vars(func, gv_map):
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Sub(PyExprMutator):
        def visit_global_var_(self, op):  # noqa: N802 - TVM's name
            return gv_map.get(op, op)

    return _Sub().visit_expr(func)


# --------------------------------------------------------------------------------------------------------------
# public API


def _lower(model, requantize, accumulator, fold_relu, input_shapes, border_kernels="fused"):
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"realize: expected an onnx.ModelProto, got {type(model).__name__}")
    opts = RealizeOptions(requantize=requantize, accumulator=accumulator, fold_relu=bool(fold_relu),
                          border_kernels=border_kernels)
    return _Lowering(model, opts, input_shapes).run()


def realize(model: onnx.ModelProto, *, requantize: str = "fixed_point", accumulator: str = "int32",
            fold_relu: bool = True, input_shapes: dict | None = None, border_kernels: str = "fused"):
    """Lower a QDQ ONNX model to a Relax ``IRModule`` (one ``main``: float inputs -> outputs).

    ``requantize``: ``"fixed_point"`` (31-bit multiplier and rounding right shift in int64, ties to even) or ``"float"``
    (float32 multiply, round half to even). ``accumulator``: ``"int32"`` or ``"int16"`` (the out_dtype of the integer
    conv2d/matmul; int16 wraps on overflow like the hardware it models). ``fold_relu``: fold Relu/Clip into the
    requantize clip bounds (else an extra integer clip after requantize; same numbers).
    ``input_shapes`` overrides symbolic input dimensions. ``border_kernels``: ``"fused"`` lets TVM fuse the quantize
    of a float tensor and the dequantize of an integer one into the neighbouring kernels; ``"separate"`` makes each
    a kernel of its own (PrimFunc attribute ``hago.border``), so that the kernels of a model with float fallbacks
    are those of the all-float and all-integer models (tuned once; what the latency-measured search needs).
    """
    mod, _records = _lower(model, requantize, accumulator, fold_relu, input_shapes, border_kernels)
    return mod


def describe(model: onnx.ModelProto, *, requantize: str = "fixed_point", accumulator: str = "int32",
             fold_relu: bool = True, input_shapes: dict | None = None) -> list[dict]:
    """What :func:`realize` does with each node.

    One dict per node, in graph order: ``node`` (name), ``op_type``, ``realized`` — ``"integer"`` (computed on
    integers), ``"border"`` (a quantize/dequantize between float and integer), ``"float"`` (imported and run in
    float; ``detail`` says why), ``"constant"`` (folded at compile time) or ``"folded"`` (identity) —, ``detail``,
    ``outputs``, and ``region``: the index of the connected integer region for integer nodes, else None.
    """
    _mod, records = _lower(model, requantize, accumulator, fold_relu, input_shapes)
    return records
