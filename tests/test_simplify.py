"""hago.backend.simplify: requantize round trips through an integer type, taken out of realize's Relax output."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from hago.backend.simplify import fold_requantize_round_trips  # noqa: E402


def _module(lo=0.0, hi=255.0, dtype="uint8", rounded=True, zp=3.0, also_int=False, via_int32=True):
    """x -> round(x * 0.7) + zp -> clamp [lo, hi] -> astype(dtype) -> [astype(int32)] -> astype(float32) * 2,
    optionally with the quantized tensor also returned as it is (a second, integer reader)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(R.multiply(x, R.const(0.7, "float32")))
            if rounded:
                t = bb.emit(R.round(t))
            t = bb.emit(R.add(t, R.const(zp, "float32")))
            t = bb.emit(R.maximum(t, R.const(lo, "float32")))
            y = bb.emit(R.minimum(t, R.const(hi, "float32")))
            q = bb.emit(R.astype(y, dtype))
            f = bb.emit(R.astype(bb.emit(R.astype(q, "int32")) if via_int32 else q, "float32"))
            out = bb.emit(R.multiply(f, R.const(2.0, "float32")))
            if also_int:
                o = bb.emit_output(relax.Tuple([out, q]))
            else:
                o = bb.emit_output(out)
        bb.emit_func_output(o)
    return bb.get()


def _casts(mod) -> int:
    return mod.script().count("R.astype(")


def _run(mod, x):
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("dtype,lo,hi,zp,via_int32", [("uint8", 0.0, 255.0, 3.0, True), ("int8", -128.0, 127.0, 0.0, True),
                                                     ("uint8", 10.0, 200.0, -2.0, False)])
def test_round_trip_through_integer_type_is_folded_exactly(dtype, lo, hi, zp, via_int32):
    mod = _module(lo, hi, dtype, zp=zp, via_int32=via_int32)
    folded = fold_requantize_round_trips(mod)
    assert _casts(mod) == (3 if via_int32 else 2) and _casts(folded) == 0
    x = np.concatenate([np.linspace(-600, 600, 60), [0.5 / 0.7, 1.5 / 0.7, 2.5 / 0.7, 1e9]]).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, x), _run(mod, x))


def test_quantized_tensor_with_an_integer_reader_is_kept():
    """A quantized tensor that something else reads as integers (here: the function's result; in a network, the
    next conv) is not folded: its float image would cross kernels as float32."""
    mod = _module(also_int=True)
    assert _casts(fold_requantize_round_trips(mod)) == _casts(mod)


@pytest.mark.parametrize("kw", [{"rounded": False}, {"hi": 300.0}, {"lo": -1.0}, {"zp": 0.5}])
def test_not_provably_integral_or_out_of_range_is_kept(kw):
    """No round (fractions would be truncated by the cast), bounds outside uint8 (the cast wraps or saturates), or
    a fractional zero point: the round trip changes values and must stay."""
    mod = _module(**kw)
    assert _casts(fold_requantize_round_trips(mod)) == _casts(mod)
