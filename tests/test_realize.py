"""hago.backend.realize: QDQ ONNX -> integer Relax, checked against onnxruntime.

The reference is onnxruntime with graph optimizations disabled (ORT_DISABLE_ALL): it runs every Q/DQ and float op
as written, i.e. the exact float simulation of the QDQ model. The realized module must agree with it to one
quantization step on every integer (Q) output, and on the argmax of small classifiers.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from hago.backend import realize as rz  # noqa: E402
from hago.backend.realize_fixed import (  # noqa: E402
    clamp_bounds_to_q,
    fixed_point_reference,
    quantize_multiplier,
)
from hago.errors import CompileError, HagoError, ModelError  # noqa: E402

OPSET = 21


# ----------------------------------------------------------------------------------------------------------- helpers


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr).astype(dtype), name)


def _float_model(nodes, inputs, outputs, inits, opset=OPSET):
    g = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _ort_session(model, optimized=False):
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ranges(model, feeds):
    """min/max of every tensor of a float model over the calibration feeds."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [o for n in m.graph.node for o in n.output]
    del m.graph.output[:]
    for n in names + [i.name for i in model.graph.input]:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = _ort_session(m)
    outs = sess.run(None, feeds)
    keys = names + [i.name for i in model.graph.input]
    return {k: (float(np.min(v)), float(np.max(v))) for k, v in zip(keys, outs)}


def _act_params(lo, hi, dtype, bits):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if dtype == "uint8":
        levels = 2**bits - 1
        s = (hi - lo) / levels if hi > lo else 1.0
        zp = int(np.clip(round(-lo / s), 0, levels))
        return np.float32(s), zp, (0 - zp) * np.float32(s), (levels - zp) * np.float32(s)
    amax = max(abs(lo), abs(hi)) or 1.0
    levels = 2 ** (bits - 1) - 1
    s = amax / levels
    return np.float32(s), 0, -levels * np.float32(s), levels * np.float32(s)


def make_qdq(model, feeds, *, act_dtype="uint8", bits=None, skip=(), per_channel=True, weight_dtype="int8"):
    """A small stand-in for hago's exporter: QDQ form of `model`, calibrated on `feeds` (min/max).

    Every activation edge not in `skip` gets [Clip ->] Q -> DQ (the Clip when bits[edge] < 8); Conv/Gemm/MatMul
    weights become int8 initializers + DQ (per channel when `per_channel`), their biases int32 + DQ.
    """
    bits = dict(bits or {})
    rng_ = _ranges(model, feeds)
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    act_q = {}  # tensor -> (scale, zp)
    new_nodes, new_inits = [], []
    renamed = {}
    qdt = TensorProto.UINT8 if act_dtype == "uint8" else TensorProto.INT8

    def quantize_act(t):
        if t in skip or t in inits:
            return
        b = bits.get(t, 8)
        s, zp, clo, chi = _act_params(*rng_[t], act_dtype, b)
        src = t
        if b < 8:
            new_inits.extend([_init(t + "_clo", clo), _init(t + "_chi", chi)])
            new_nodes.append(helper.make_node("Clip", [t, t + "_clo", t + "_chi"], [t + "_clip"], name=t + "_Clip"))
            src = t + "_clip"
        new_inits.append(_init(t + "_s", s))
        new_inits.append(numpy_helper.from_array(np.array(zp, dtype=act_dtype), t + "_zp"))
        new_nodes.append(helper.make_node("QuantizeLinear", [src, t + "_s", t + "_zp"], [t + "_q"], name=t + "_Q"))
        new_nodes.append(helper.make_node("DequantizeLinear", [t + "_q", t + "_s", t + "_zp"], [t + "_dq"], name=t + "_DQ"))
        act_q[t] = (s, zp)
        renamed[t] = t + "_dq"

    for i in g.input:
        quantize_act(i.name)
    for node in g.node:
        ins = list(node.input)
        wq_scale = None
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(ins) > 1 and ins[1] in inits:
            w = inits[ins[1]].astype(np.float64)
            tb = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            axis = 0 if node.op_type == "Conv" or tb else 1
            red = tuple(i for i in range(w.ndim) if i != axis)
            amax = np.max(np.abs(w), axis=red) if per_channel else np.array(np.max(np.abs(w)))
            amax = np.where(amax == 0, 1.0, amax)
            qmax = 127 if weight_dtype == "int8" else 7
            sw = (amax / qmax).astype(np.float32)
            bshape = [1] * w.ndim
            if per_channel:
                bshape[axis] = -1
            wq = np.clip(np.rint(w / sw.reshape(bshape)), -qmax, qmax).astype(np.int8)
            name = ins[1] + "_wq"
            new_inits += [numpy_helper.from_array(wq, name), _init(name + "_s", sw),
                          numpy_helper.from_array(np.zeros(sw.shape, np.int8), name + "_zp")]
            attrs = {"axis": axis} if per_channel else {}
            new_nodes.append(helper.make_node("DequantizeLinear", [name, name + "_s", name + "_zp"], [name + "_dq"],
                                              name=name + "_DQ", **attrs))
            ins[1] = name + "_dq"
            wq_scale = sw
            if len(ins) > 2 and ins[2] in inits and ins[0] in act_q:
                sb = (act_q[ins[0]][0] * wq_scale).astype(np.float32)
                bq = np.rint(inits[ins[2]] / sb).astype(np.int32)
                bn = ins[2] + "_bq"
                new_inits += [numpy_helper.from_array(bq, bn), _init(bn + "_s", sb),
                              numpy_helper.from_array(np.zeros(sb.shape, np.int32), bn + "_zp")]
                new_nodes.append(helper.make_node("DequantizeLinear", [bn, bn + "_s", bn + "_zp"], [bn + "_dq"],
                                                  name=bn + "_DQ", **({"axis": 0} if per_channel else {})))
                ins[2] = bn + "_dq"
        ins = [renamed.get(n, n) for n in ins]
        nn = helper.make_node(node.op_type, ins, list(node.output), name=node.name or node.output[0])
        nn.attribute.extend(node.attribute)
        new_nodes.append(nn)
        for o in node.output:
            quantize_act(o)
    del producers
    weights_used = {i for n in new_nodes for i in n.input}
    kept = [numpy_helper.from_array(v, k) for k, v in inits.items() if k in weights_used]
    outs = [helper.make_tensor_value_info(renamed.get(o.name, o.name), TensorProto.FLOAT, None) for o in g.output]
    graph = helper.make_graph(new_nodes, "qdq", list(g.input), outs, initializer=kept + new_inits)
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    onnx.checker.check_model(m)
    del qdt
    return m


def cut_at(model, tensors):
    """The same model with `tensors` (e.g. Q outputs) as its outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for t in tensors:
        m.graph.output.append(helper.make_empty_tensor_value_info(t))
    return m


def compile_run(mod, feeds_list):
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(f)) for f in feeds_list])
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]


def run_both(model, feeds, **kw):
    ref = _ort_session(model).run(None, feeds)
    names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    got = compile_run(rz.realize(model, **kw), [feeds[n] for n in names])
    return ref, got


def steps(ref, got):
    """Largest difference in quantization steps of two integer arrays."""
    assert ref.dtype == got.dtype, (ref.dtype, got.dtype)
    assert ref.shape == got.shape
    return int(np.max(np.abs(ref.astype(np.int64) - got.astype(np.int64)))) if ref.size else 0


def q_outputs(model):
    return [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]


RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------------ fixed-point unit


def test_quantize_multiplier_rounds_to_nearest_even():
    rng = np.random.default_rng(0)
    m = np.exp(rng.uniform(np.log(1e-6), np.log(50.0), size=2000))
    m0, shift = quantize_multiplier(m)
    assert np.all((np.abs(m0) >= 2**30) & (np.abs(m0) < 2**31))
    assert np.all(shift >= 1)
    np.testing.assert_allclose(m0 * np.exp2(-shift.astype(np.float64)), m, rtol=2**-30)
    x = rng.integers(-(2**24), 2**24, size=2000)
    got = fixed_point_reference(x, m0, shift)
    exact = x * (m0 / np.exp2(shift.astype(np.float64)))  # the represented product, before rounding
    np.testing.assert_array_equal(got, np.rint(exact).astype(np.int64))
    # exact ties go to the even neighbour, like onnxruntime's QuantizeLinear
    m0, shift = quantize_multiplier(np.full(6, 0.5))
    np.testing.assert_array_equal(fixed_point_reference(np.array([1, 3, 5, -1, -3, -5]), m0, shift),
                                  [0, 2, 2, 0, -2, -2])


def test_quantize_multiplier_rejects_nonsense():
    with pytest.raises(CompileError):
        quantize_multiplier(np.array([np.inf]))
    with pytest.raises(CompileError):
        quantize_multiplier(np.array([2.0**40]))
    m0, shift = quantize_multiplier(np.array([1e-30, 0.0]))
    assert np.all(shift <= 62)
    assert np.all(fixed_point_reference(np.array([1000, 1000]), m0, shift) == 0)


def test_clamp_bounds_match_quantize_of_clip():
    s, zp = np.float32(0.0371), 11
    ys = np.linspace(-3, 8, 2001, dtype=np.float32)
    for lo, hi in ((0.0, np.inf), (0.0, 6.0), (-1.3, 2.2)):
        qlo, qhi = clamp_bounds_to_q(lo, hi, s, zp, 0, 255)
        ref = np.clip(np.rint(np.clip(ys, lo, hi) / s) + zp, 0, 255)
        got = np.clip(np.rint(ys / s) + zp, qlo, qhi)
        np.testing.assert_array_equal(ref, got)


# ----------------------------------------------------------------------------------------- quantize_static models


def _ort_quantize(model, feeds_list, tmp_path, name, per_channel=True, act=None):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds_list)

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp_path / f"{name}_f.onnx", tmp_path / f"{name}_q.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=act or QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(dst)


def _classifier(batch):
    r = np.random.default_rng(7)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dwconv"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("Add", ["r1", "r2"], ["a"], name="residual"),
        helper.make_node("MaxPool", ["a"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], name="maxpool"),
        helper.make_node("Conv", ["mp", "w3", "b3"], ["c3"], strides=[2, 2], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("AveragePool", ["r3"], ["ap"], kernel_shape=[2, 2], strides=[1, 1], name="avgpool"),
        helper.make_node("Concat", ["ap", "ap2"], ["cat"], axis=1, name="concat"),
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1, name="fc"),
    ]
    nodes.insert(9, helper.make_node("MaxPool", ["r3"], ["ap2"], kernel_shape=[2, 2], strides=[1, 1], name="mp2"))
    inits = [
        _init("w1", r.normal(0, 0.3, (8, 3, 3, 3))), _init("b1", r.normal(0, 0.1, 8)),
        _init("w2", r.normal(0, 0.3, (8, 1, 3, 3))), _init("b2", r.normal(0, 0.1, 8)),
        _init("lo", np.array(0.0)), _init("hi", np.array(6.0)),
        _init("w3", r.normal(0, 0.2, (12, 8, 1, 1))), _init("b3", r.normal(0, 0.1, 12)),
        _init("wg", r.normal(0, 0.3, (10, 24))), _init("bg", r.normal(0, 0.1, 10)),
    ]
    return _float_model(nodes, [("x", [batch, 3, 16, 16])], ["y"], inits, opset=17)


@pytest.fixture(scope="module")
def classifier_qdq(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clf")
    calib = [{"x": RNG.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(16)]
    q = _ort_quantize(_classifier(1), calib, tmp, "clf")
    # same quantized model at batch 256 (the batch dimension is static in the realized module)
    q.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 256
    for vi in list(q.graph.value_info):
        q.graph.value_info.remove(vi)
    return q


@pytest.fixture(scope="module")
def classifier_batch():
    return {"x": RNG.normal(0, 1, (256, 3, 16, 16)).astype(np.float32)}


def test_describe_classifier(classifier_qdq):
    recs = rz.describe(classifier_qdq)
    by_op = {}
    for r in recs:
        by_op.setdefault(r["op_type"], set()).add(r["realized"])
        assert set(r) >= {"node", "op_type", "realized", "detail", "region", "outputs"}
    for op in ("Conv", "Add", "MaxPool", "AveragePool", "Concat", "GlobalAveragePool", "Flatten", "Gemm"):
        assert by_op[op] == {"integer"}, (op, by_op[op])
    assert "float" not in {r["realized"] for r in recs}
    # one integer region from the input quantize to the output dequantize
    regions = {r["region"] for r in recs if r["realized"] == "integer"}
    assert regions == {0}
    borders = [r for r in recs if r["realized"] == "border"]
    assert {r["op_type"] for r in borders} == {"QuantizeLinear", "DequantizeLinear"} and len(borders) == 2


def test_classifier_module_is_integer(classifier_qdq):
    text = rz.realize(classifier_qdq).script()
    assert 'R.nn.conv2d(' in text and 'out_dtype="int32"' in text
    assert 'R.matmul(' in text
    assert "R.right_shift(" in text
    # no float convolution or matmul anywhere
    for line in text.splitlines():
        if "R.nn.conv2d(" in line or "R.matmul(" in line:
            assert 'dtype="float32"' not in line.split("=")[0] + line.split(")")[0], line


def region_inputs(model, tensor):
    """Integer tensors (Q outputs) and float graph inputs that the region computing `tensor` reads."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    found, stack, seen = [], [tensor], set()
    first = True
    while stack:
        t = stack.pop()
        if t in seen or not t or t in inits:
            continue
        seen.add(t)
        n = producer.get(t)
        if n is None:
            found.append(t)  # a graph input
            continue
        if n.op_type == "QuantizeLinear" and not first:
            found.append(t)
            continue
        first = False
        stack.extend(n.input)
    return found


def check_regions(model, feeds, max_steps=1, **kw):
    """Each Q output of the realized model vs onnxruntime computing that region from the *same* integer inputs.

    Returns {Q output: fraction of values equal}.
    """
    from onnx.utils import Extractor

    qs = q_outputs(model)
    names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    ours = dict(zip(qs, compile_run(rz.realize(cut_at(model, qs), **kw), [feeds[n] for n in names])))
    ours.update(feeds)
    inferred = onnx.shape_inference.infer_shapes(model)
    exact = {}
    for t in qs:
        ins = region_inputs(model, t)
        sub = Extractor(inferred).extract_model(ins, [t])
        ref = _ort_session(sub).run(None, {i: ours[i] for i in ins})[0]
        assert steps(ref, ours[t]) <= max_steps, t
        exact[t] = float(np.mean(ref == ours[t]))
    return exact


@pytest.mark.parametrize("requantize", ["fixed_point", "float"])
def test_classifier_regions_within_one_step(classifier_qdq, classifier_batch, requantize):
    exact = check_regions(classifier_qdq, classifier_batch, requantize=requantize)
    assert len(exact) >= 10
    # almost everything is bit-exact; the rest are near-ties that onnxruntime rounds in float32
    assert min(exact.values()) > 0.97, exact


@pytest.mark.parametrize("requantize", ["fixed_point", "float"])
def test_classifier_matches_onnxruntime_end_to_end(classifier_qdq, classifier_batch, requantize):
    model = classifier_qdq
    final_q = q_outputs(model)[-1]
    region_q = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r3"]
    cut = cut_at(model, [final_q] + region_q + [model.graph.output[0].name])
    ref, got = run_both(cut, classifier_batch, requantize=requantize)
    assert steps(ref[1], got[1]) <= 1  # region output after conv3+relu: no rounding difference upstream of it
    assert np.mean(ref[1] == got[1]) > 0.99
    # the final integer output: one-step differences upstream can add up (3 rounding stages here)
    assert steps(ref[0], got[0]) <= 2
    assert np.mean(np.abs(ref[0].astype(int) - got[0].astype(int)) <= 1) > 0.99
    agree = np.mean(np.argmax(ref[2], axis=1) == np.argmax(got[2], axis=1))
    assert agree >= 0.995
    # the float output is the dequantized integer output
    np.testing.assert_allclose(ref[2], got[2], atol=float(np.max(np.abs(ref[2]))) / 50 + 1e-6)


def test_fold_relu_off_gives_same_numbers(classifier_qdq, classifier_batch):
    x = [classifier_batch["x"]]
    a = compile_run(rz.realize(classifier_qdq, fold_relu=True), x)[0]
    b = compile_run(rz.realize(classifier_qdq, fold_relu=False), x)[0]
    np.testing.assert_array_equal(a, b)


def test_optimized_onnxruntime_differs_by_at_most_one_step(classifier_qdq, classifier_batch):
    """ORT with optimizations fuses QDQ into QLinearConv etc. (its own rounding); still within a step."""
    cut = cut_at(classifier_qdq, [q_outputs(classifier_qdq)[-1]])
    opt = _ort_session(cut, optimized=True).run(None, classifier_batch)[0]
    exact = _ort_session(cut).run(None, classifier_batch)[0]
    got = compile_run(rz.realize(cut), [classifier_batch["x"]])[0]
    assert steps(exact, got) <= 1
    assert steps(opt, got) <= 2
