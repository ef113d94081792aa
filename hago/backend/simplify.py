"""Relax rewrite of realize's output: requantize round trips through an integer type, taken out.

Inside an integer region a value is often requantized and then read back in float: a residual block's conv output
is quantized to uint8 (the QDQ graph's QuantizeLinear) and the Add that follows dequantizes it to sum it with the
other branch. With the float requantize rule the quantized value is ``y = min(max(round(a) + zp, qmin), qmax)``, a
float32 holding an integer in [qmin, qmax], so ``float32(int32(uint8(y)))`` is ``y`` itself. TVM does not know that
``y`` is integral and keeps the casts: in a 1x1 conv with 64 input channels (ResNet-50's first stage) the round trip
(pack to bytes, unpack, convert) is a good part of the epilogue, which there costs as much as the conv's arithmetic.

:func:`fold_requantize_round_trips` replaces the float32 casts of such a value (directly or through int32) by ``y``
where every reader of the quantized tensor is such a cast; the tensor is then dead and removed. A quantized tensor
that a conv or the result also reads is left alone (its float image would then travel between kernels as float32
instead of bytes). Exact: ``y`` is an
integer within the type's range (round, plus an integral zero point, clamped to integral bounds inside the range).
"""
from __future__ import annotations

import numpy as np


def rewrite_calls(mod, op_names, rewrite):
    """Apply ``rewrite(call, mutator)`` to every call of an operator in ``op_names`` (post-order: arguments first)
    in every Relax function of ``mod``; it returns the replacement expression, or the call itself to keep it.
    ``mutator.builder_`` emits helper bindings, ``mutator.lookup_binding(var)`` reads a binding. The one mutator
    loop behind hago's Relax rewrites."""
    from tvm import relax

    names = {op_names} if isinstance(op_names, str) else set(op_names)

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor naming
            call = self.visit_expr_post_order(call)
            return rewrite(call, self) if _call_name(call) in names else call

    rw = _Rewriter(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return rw.builder_.get()


def _call_name(expr) -> str:
    op = getattr(expr, "op", None)
    return getattr(op, "name", "") if op is not None else ""


def const_value(expr):
    """The numpy value of a relax constant, or None."""
    import tvm

    if isinstance(expr, tvm.ir.expr.Constant):
        val = getattr(expr, "value", None)
        if hasattr(val, "numpy"):
            return val.numpy()
    return None


def _scalar_const(expr):
    """The value of a scalar relax constant, or None."""
    arr = const_value(expr)
    return float(arr) if arr is not None and arr.size == 1 else None


def _read_only_as_float(func) -> set:
    """Names of the integer vars of ``func`` that every reader converts to float32 (``astype(q, "float32")``, or
    ``astype(q, "int32")`` read only that way). Folding only those keeps the integer tensors that a conv or the
    function's result needs: folding a block output that the next conv also reads would pass float32 between
    kernels instead of bytes."""
    from tvm import relax

    readers: dict = {}  # var name -> list of (reader var name or None, reader call or None)
    bound: dict = {}

    def note(expr, by, call):
        if isinstance(expr, relax.Var):
            readers.setdefault(expr.name, []).append((by, call))
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                note(f, None, None)

    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            bound[b.var.name] = v
            if isinstance(v, relax.Call):
                for a in v.args:
                    note(a, b.var.name, v)
            else:
                note(v, None, None)
    note(func.body.body, None, None)

    def float_cast(call, dtype) -> bool:
        return call is not None and _call_name(call) == "relax.astype" and str(call.attrs.dtype) == dtype

    out = set()
    for name, value in bound.items():
        if _call_name(value) != "relax.astype" or not str(value.attrs.dtype).startswith(("int", "uint")):
            continue
        ok = bool(readers.get(name))
        for by, call in readers.get(name, []):
            if float_cast(call, "float32"):
                continue
            if float_cast(call, "int32") and readers.get(by) and all(
                    float_cast(c2, "float32") for _b2, c2 in readers[by]):
                continue
            ok = False
        if ok:
            out.add(name)
    return out


def fold_requantize_round_trips(mod):
    """``astype(astype(q, "int32"), "float32")`` and ``astype(q, "float32")`` with ``q = astype(y, int type)`` and
    ``y`` an integral float32 within that type's range (see the module doc) -> ``y``. Returns the rewritten module
    (dead bindings removed)."""
    from tvm import relax

    foldable = set()
    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            foldable |= _read_only_as_float(func)

    def bound(m, expr):
        if isinstance(expr, relax.Var):
            b = m.lookup_binding(expr)
            return b if b is not None else expr
        return expr

    def integral(m, expr, depth: int = 0) -> bool:
        """``expr`` (a float32 relax var) provably holds integers: round(x), or an integral constant added."""
        e = bound(m, expr)
        name = _call_name(e)
        if name == "relax.round":
            return True
        if name == "relax.add" and depth < 4:
            a, b = e.args
            c = _scalar_const(b)
            return c is not None and c == np.round(c) and integral(m, a, depth + 1)
        return False

    def float_image(m, q):
        """``y`` when ``q = astype(y, int type)`` with ``y`` integral and clamped inside the type's range."""
        if not isinstance(q, relax.Var) or q.name not in foldable:
            return None
        e = bound(m, q)
        if _call_name(e) != "relax.astype":
            return None
        y = e.args[0]
        dtype = str(e.attrs.dtype)
        if not dtype.startswith(("int", "uint")) or str(getattr(y.ty, "dtype", "")) != "float32":
            return None
        info = np.iinfo(np.dtype(dtype))
        hi_call = bound(m, y)
        if _call_name(hi_call) != "relax.minimum":
            return None
        lo_call, hi = hi_call.args
        lo_call = bound(m, lo_call)
        if _call_name(lo_call) != "relax.maximum":
            return None
        inner, lo = lo_call.args
        lo_v, hi_v = _scalar_const(lo), _scalar_const(hi)
        if lo_v is None or hi_v is None or lo_v != np.round(lo_v) or hi_v != np.round(hi_v):
            return None
        if not (info.min <= lo_v <= hi_v <= info.max) or not integral(m, inner):
            return None
        return y

    def fold(call, m):
        if str(call.attrs.dtype) != "float32":
            return call
        src = call.args[0]
        b = bound(m, src)
        if _call_name(b) == "relax.astype" and str(b.attrs.dtype) == "int32":
            src = b.args[0]  # through the int32 widening
        y = float_image(m, src)
        return call if y is None else y

    out = rewrite_calls(mod, "relax.astype", fold)
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(out))
