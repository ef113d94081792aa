"""hago.quantize: annotations, QDQ export numerics, calibration methods and bad calibration data."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hago
from hago.calibrate.observers import EdgeObserver
from hago.errors import CalibrationError
from hago.ir.annotation import EdgeAnnotation
from hago.runtime import ort as rt

from builders import calib, conv_bn_net


def single_conv(seed=0):
    rs = np.random.RandomState(seed)
    w = (rs.randn(6, 3, 3, 3) * 0.4).astype(np.float32)
    b = (rs.randn(6) * 0.2).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "c",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w, b


def _conv_int(xq, wq, pad=1):
    """int64 reference convolution (NCHW, OIHW, stride 1)."""
    n, c, h, wd = xq.shape
    o, _, kh, kw = wq.shape
    xp = np.pad(xq, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, o, h, wd), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], wq[:, :, i, j])
    return out


def test_qdq_conv_matches_integer_reference():
    m, w, b = single_conv()
    data = calib([1, 3, 8, 8], n=4)
    qg = hago.quantize(m, "x86_avx2", data, method="minmax")
    anns = {v.name: a for v, a in qg.graph.annotated()}
    ax, aw, ab = anns["x"], anns["w"], anns["b"]
    assert (ax.dtype, ax.bits, ax.symmetric) == ("uint8", 8, False)
    assert (aw.dtype, aw.bits, aw.axis) == ("int8", 7, 0)
    x = data[0]["x"]
    xq = np.clip(np.rint(x / ax.scale) + ax.zero_point, 0, 255).astype(np.int64)
    wq = np.clip(np.rint(w / aw.scale[:, None, None, None]), -64, 63).astype(np.int64)
    assert np.abs(wq).max() <= 64  # 7-bit weights: u8 x s7 pair sums cannot saturate int16
    assert 2 * 255 * np.abs(wq).max() <= 32767 + 128
    bq = np.rint(b / (ax.scale * aw.scale)).astype(np.int64)
    acc = _conv_int(xq - ax.zero_point, wq) + bq[None, :, None, None]
    ref = acc * (ax.scale * aw.scale)[None, :, None, None]
    out = qg.run({"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_reduced_bits_clip_to_range():
    m = conv_bn_net()
    qg = hago.quantize(m, "x86_avx2", calib([2, 3, 16, 16]), activation_bits=5, weight_bits=4, method="minmax")
    for _, a in qg.graph.annotated():
        if a.kind == "activation":
            assert a.bits == 5
        elif a.kind == "weight":
            assert a.bits == 4
    model = qg.to_qdq()
    qnames = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    outs = rt.session(rt.with_outputs(model, qnames), optimize=False).run(qnames, calib([2, 3, 16, 16], n=1, seed=9)[0])
    for o in outs:
        assert o.dtype == np.uint8 and o.max() <= 31
    winit = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("__q") and t.data_type == TensorProto.INT8}
    assert winit and all(np.abs(v).max() <= 8 for v in winit.values())


def test_bits_clamped_to_spec_and_reported():
    qg = hago.quantize(conv_bn_net(), "x86_avx2", calib([1, 3, 16, 16]), weight_bits=8)
    assert all(a.bits == 7 for _, a in qg.graph.annotated() if a.kind == "weight")
    assert "allows 2-7" in qg.summary()


def test_hago_accelerator_specs_run():
    data = calib([1, 3, 16, 16])
    for spec in ("hago_accelerator", "hago_accelerator_int16"):
        qg = hago.quantize(conv_bn_net(), spec, data)
        gemm = [n for n in qg.graph.nodes() if n.op_type == "Gemm"][0]
        assert qg.graph.region(gemm) == "float"  # dense is float in HAGO's accelerator
        acc_edges = [a for _, a in qg.graph.annotated() if a.dtype in ("int32", "int16") and a.kind == "activation"]
        assert acc_edges  # add/relu/maxpool inputs in the accumulator type
        x = calib([1, 3, 16, 16], n=1, seed=4)[0]
        ref = rt.session(conv_bn_net()).run(None, x)[0]
        out = qg.run(x)[0]
        assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("method", ["minmax", "avg_range", "percentile:99.9", "kl", "mse", "lp:3", "auto"])
def test_methods_run_and_stay_close(method):
    m = conv_bn_net()
    data = calib([4, 3, 16, 16], n=4)
    qg = hago.quantize(m, "x86_avx2", data, method=method)
    x = calib([4, 3, 16, 16], n=1, seed=11)[0]
    ref = rt.session(m).run(None, x)[0]
    out = qg.run(x)[0]
    tol = 0.5 if method == "kl" else 0.15  # KL clips post-ReLU ranges hard at 8 bits (TensorRT's known behaviour)
    assert np.abs(out - ref).max() < tol * np.abs(ref).max()


def test_observer_ranges():
    rs = np.random.RandomState(0)
    o = EdgeObserver("e", bins=2048)
    batches = [rs.randn(1000).astype(np.float32) for _ in range(4)]
    batches[2][0] = 40.0  # one outlier
    for b in batches:
        o.update(b)
    assert o.range("minmax", EdgeAnnotation()) == (pytest.approx(min(b.min() for b in batches)), pytest.approx(40.0))
    avg = o.range("avg_range", EdgeAnnotation())
    assert avg[1] == pytest.approx(np.mean([b.max() for b in batches]))
    o.start_histogram()
    for b in batches:
        o.update_histogram(b)
    for method, bits in (("percentile:99.9", 8), ("mse", 4), ("kl", 8)):
        ann = EdgeAnnotation(dtype="int8", symmetric=True, bits=bits)
        lo, hi = o.range(method, ann)
        assert 1.0 < hi < 20.0, (method, hi)  # clips the outlier
        assert lo < 0
    # at 8 bits one outlier among 4,000 values is cheaper to keep than to clip: MSE keeps it
    assert o.range("mse", EdgeAnnotation(dtype="int8", symmetric=True))[1] > 30


def test_nan_and_bad_calibration_data():
    m = conv_bn_net()
    data = calib([1, 3, 16, 16])
    data[2]["x"][0, 1, 2, 3] = np.nan
    with pytest.raises(CalibrationError, match=r"batch 2: input 'x' has 1 NaN/Inf value\(s\), first at index \(0, 1, 2, 3\)"):
        hago.quantize(m, "x86_avx2", data)
    with pytest.raises(CalibrationError, match=r"missing input\(s\) \['x'\]"):
        hago.quantize(m, "x86_avx2", [{"input": np.zeros((1, 3, 16, 16), np.float32)}])
    with pytest.raises(CalibrationError, match="batch 0: onnxruntime failed"):
        hago.quantize(m, "x86_avx2", [{"x": np.zeros((1, 5, 16, 16), np.float32)}])
    with pytest.raises(CalibrationError, match="empty"):
        hago.quantize(m, "x86_avx2", [])


def test_cli_quantize(tmp_path, capsys):
    from hago.cli import main

    m = conv_bn_net()
    mp = tmp_path / "m.onnx"
    onnx.save(m, str(mp))
    rs = np.random.RandomState(0)
    np.savez(tmp_path / "calib.npz", x=rs.randn(20, 3, 16, 16).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rs.randn(20, 3, 16, 16).astype(np.float32), label=rs.randint(0, 10, 20))
    out = tmp_path / "q.onnx"
    rc = main(["quantize", str(mp), "--spec", "x86_avx2", "--calib", str(tmp_path / "calib.npz"),
               "--eval", str(tmp_path / "eval.npz"), "--out", str(out)])
    assert rc == 0 and out.exists()
    text = capsys.readouterr().out
    assert "ops in integer" in text and "accuracy: fp32" in text
    rc = main(["quantize", str(mp), "--spec", "x86_avx2", "--calib", str(tmp_path / "nope.npz")])
    assert rc == 2
    assert "nope.npz: no such file" in capsys.readouterr().err


def _hardswish_net(seed=0):
    """Conv -> HardSwish written as x * clip(x + 3, 0, 6) / 6 (PP-OCR's and MobileNetV3's form) -> Conv."""
    rs = np.random.RandomState(seed)
    inits = [numpy_helper.from_array((rs.randn(8, 3, 3, 3) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array((rs.randn(4, 8, 1, 1) * 0.4).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(3.0, np.float32), "three"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "three"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["cl"]),
             helper.make_node("Mul", ["c", "cl"], ["m"]),
             helper.make_node("Div", ["m", "six"], ["hs"]),
             helper.make_node("Conv", ["hs", "w2"], ["y"])]
    g = helper.make_graph(nodes, "hswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_div_by_constant_becomes_mul_by_reciprocal():
    """Canonicalization turns HardSwish's Div by 6 into a Mul by 1/6, which the spec runs in integer, so the integer
    region is not cut there; a Div by a computed value or by a constant with a zero stays a Div."""
    m = _hardswish_net()
    g = hago.load(m)
    ops = [n.op_type for n in g.nodes()]
    assert "Div" not in ops and ops.count("Mul") == 2
    x = np.random.RandomState(1).randn(1, 3, 8, 8).astype(np.float32) * 3
    ref = rt.session(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(rt.session(g.to_onnx()).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-6)
    qg = hago.quantize(g, "x86_avx512_vnni", [{"x": x}], method="minmax")
    assert all(qg.graph.region(n) == "int" for n in qg.graph.nodes() if n.op_type == "Mul")

    m2 = _hardswish_net()
    m2.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([6.0, 0.0], np.float32)[1:], "six"))
    assert "Div" in [n.op_type for n in hago.load(m2).nodes()]  # 0 in the divisor: not rewritten
    m3 = _hardswish_net()
    m3.graph.node[4].input[1] = "cl"  # divide by a computed tensor
    assert "Div" in [n.op_type for n in hago.load(m3).nodes()]


def test_clip_from_zero_folds_into_its_input_quantizer(monkeypatch):
    """The Add feeding clip(., 0, 6) is quantized on [0, min(max, 6)] with zero point 0, so the quantizer computes
    the Clip exactly and the QDQ export drops it (as it drops a Relu): same outputs as the model that keeps the Clip
    between the two identical quantizers, and fewer codes wasted on values the Clip removes."""
    import hago.ir.qdq as qdq

    g = hago.load(_hardswish_net())
    cal = [{"x": np.random.RandomState(s).randn(1, 3, 8, 8).astype(np.float32) * 3} for s in range(4)]
    qg = hago.quantize(g, "x86_avx512_vnni", cal, method="minmax")
    clip = next(n for n in qg.graph.nodes() if n.op_type == "Clip")
    a = qg.graph.annotation(clip.inputs[0])
    assert float(a.rmin) == 0.0 and 0.0 < float(a.rmax) <= 6.0 and int(a.zero_point) == 0
    folded = qg.to_qdq()
    assert "Clip" not in [n.op_type for n in folded.graph.node]
    monkeypatch.setattr(qdq.Graph, "rectifier_bounds", staticmethod(lambda node: None))  # export keeping the Clip
    kept = qdq.to_qdq(qg.graph)
    assert "Clip" in [n.op_type for n in kept.graph.node]
    x = np.random.RandomState(9).randn(1, 3, 8, 8).astype(np.float32) * 4  # beyond the calibration range too
    for opt in ("basic", True):
        y_f = rt.session(folded, optimize=opt).run(None, {"x": x})[0]
        y_k = rt.session(kept, optimize=opt).run(None, {"x": x})[0]
        np.testing.assert_array_equal(y_f, y_k)
    monkeypatch.undo()
    # a range above the Clip's max (set by hand, as LAPQ may): the Clip stays
    a.set_range(0.0, 9.0)
    qg.invalidate()
    assert "Clip" in [n.op_type for n in qg.to_qdq().graph.node]
