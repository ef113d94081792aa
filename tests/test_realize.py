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
    if dtype == "int16":
        bits = 16 if bits == 8 else bits
    levels = 2 ** (bits - 1) - 1
    s = amax / levels
    return np.float32(s), 0, -levels * np.float32(s), levels * np.float32(s)


def make_qdq(model, feeds, *, act_dtype="uint8", bits=None, skip=(), per_channel=True, weight_dtype="int8",
             dtypes=None, sim32=(), float_bias=False):
    """A small stand-in for hago's exporter: QDQ form of `model`, calibrated on `feeds` (min/max).

    Every activation edge not in `skip` gets [Clip ->] Q -> DQ (the Clip when bits[edge] < 8), in `act_dtype` or
    `dtypes[edge]` (int16 too); edges in `sim32` get hago's simulated int32 quantizer (Div/Round/Add/Clip/Sub/Mul).
    Conv/Gemm/MatMul weights become int8 initializers + DQ (per channel when `per_channel`), their biases int32 + DQ
    (kept float with `float_bias`).
    """
    dtypes = dict(dtypes or {})
    bits = dict(bits or {})
    rng_ = _ranges(model, feeds)
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    act_q = {}  # tensor -> (scale, zp)
    new_nodes, new_inits = [], []
    renamed = {}

    def quantize_act(t):
        if t in skip or t in inits:
            return
        if t in sim32:
            amax = max(abs(rng_[t][0]), abs(rng_[t][1])) or 1.0
            s = np.float32(amax / (2**31 - 1))
            new_inits.extend([_init(t + "_s", s), _init(t + "_zp", np.float32(0)),
                              _init(t + "_qmin", np.float32(-(2**31))), _init(t + "_qmax", np.float32(2**31 - 1))])
            chain = [("Div", [t, t + "_s"]), ("Round", None), ("Add", [None, t + "_zp"]),
                     ("Clip", [None, t + "_qmin", t + "_qmax"]), ("Sub", [None, t + "_zp"]), ("Mul", [None, t + "_s"])]
            prev = t
            for i, (op, ins_) in enumerate(chain):
                ins_ = [prev if x is None else x for x in (ins_ or [None])]
                out = f"{t}_sim{i}"
                new_nodes.append(helper.make_node(op, ins_, [out], name=f"{t}_{op}"))
                prev = out
            act_q[t] = (s, 0)
            renamed[t] = prev
            return
        b = bits.get(t, 8)
        dt = dtypes.get(t, act_dtype)
        s, zp, clo, chi = _act_params(*rng_[t], dt, b)
        src = t
        if b < 8:
            new_inits.extend([_init(t + "_clo", clo), _init(t + "_chi", chi)])
            new_nodes.append(helper.make_node("Clip", [t, t + "_clo", t + "_chi"], [t + "_clip"], name=t + "_Clip"))
            src = t + "_clip"
        new_inits.append(_init(t + "_s", s))
        new_inits.append(numpy_helper.from_array(np.array(zp, dtype=dt), t + "_zp"))
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
            if len(ins) > 2 and ins[2] in inits and ins[0] in act_q and not float_bias:
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
    weights_used = {i for n in new_nodes for i in n.input}
    kept = [numpy_helper.from_array(v, k) for k, v in inits.items() if k in weights_used]
    outs = [helper.make_tensor_value_info(renamed.get(o.name, o.name), TensorProto.FLOAT, None) for o in g.output]
    graph = helper.make_graph(new_nodes, "qdq", list(g.input), outs, initializer=kept + new_inits)
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def cut_at(model, tensors):
    """The same model with `tensors` (e.g. Q outputs) as its outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for t in tensors:
        m.graph.output.append(helper.make_empty_tensor_value_info(t))
    return m


# LLVM at -O0 compiles ~7x faster; integer results do not depend on it. The classifier test uses the plain
# {"kind": "llvm"} target of the numerics contract.
FAST_LLVM = {"kind": "llvm", "opt-level": 0}
CONTRACT_LLVM = {"kind": "llvm"}


def compile_run(mod, feeds_list, target=None):
    ex = tvm.compile(mod, target=tvm.target.Target(target or FAST_LLVM))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(f)) for f in feeds_list])
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]


def run_both(model, feeds, target=None, **kw):
    ref = _ort_session(model).run(None, feeds)
    names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    got = compile_run(rz.realize(model, **kw), [feeds[n] for n in names], target=target)
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
    macs = [ln for ln in text.splitlines() if "R.nn.conv2d(" in ln or "R.matmul(" in ln]
    assert len(macs) == 5  # conv1, dwconv, conv3, the avgpool window sum, fc
    for ln in macs:
        # the bound value is an int32 accumulator, computed from integer operands
        assert 'dtype="int32") = R.' in ln and 'out_dtype="int32"' in ln, ln
    assert "R.right_shift(" in text  # fixed-point requantize
    assert "float32" not in "".join(ln for ln in text.splitlines() if "R.multiply(" in ln and "int64" in ln)


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


def check_regions(model, feeds, ours, max_steps=1):
    """Each Q output `ours[t]` vs onnxruntime computing that region from the *same* integer inputs.

    Returns {Q output: fraction of values equal}.
    """
    from onnx.utils import Extractor

    ours = {**ours, **feeds}
    inferred = onnx.shape_inference.infer_shapes(model)
    exact = {}
    for t in q_outputs(model):
        ins = region_inputs(model, t)
        sub = Extractor(inferred).extract_model(ins, [t])
        ref = _ort_session(sub).run(None, {i: ours[i] for i in ins})[0]
        assert steps(ref, ours[t]) <= max_steps, t
        exact[t] = float(np.mean(ref == ours[t]))
    return exact


def run_all_q(model, feeds, target=None, **kw):
    """(ours, onnxruntime) dicts of every Q output and every graph output."""
    outs = q_outputs(model) + [o.name for o in model.graph.output]
    cut = cut_at(model, outs)
    ref, got = run_both(cut, feeds, target=target, **kw)
    return dict(zip(outs, got)), dict(zip(outs, ref))


@pytest.fixture(scope="module")
def classifier_run(classifier_qdq, classifier_batch):
    ours, ref = run_all_q(classifier_qdq, classifier_batch, target=CONTRACT_LLVM)
    return "fixed_point", ours, ref


def test_classifier_regions_within_one_step(classifier_qdq, classifier_batch, classifier_run):
    _mode, ours, _ref = classifier_run
    exact = check_regions(classifier_qdq, classifier_batch, ours)
    assert len(exact) >= 10
    # almost everything is bit-exact; the rest are near-ties that onnxruntime rounds in float32
    assert min(exact.values()) > 0.97, exact


def test_classifier_matches_onnxruntime_end_to_end(classifier_qdq, classifier_run):
    _mode, ours, ref = classifier_run
    model = classifier_qdq
    final_q = q_outputs(model)[-1]
    region_q = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r3"][0]
    # a region output with no rounding difference upstream of it
    assert steps(ref[region_q], ours[region_q]) <= 1
    assert np.mean(ref[region_q] == ours[region_q]) > 0.99
    # the final integer output: one-step differences upstream can add up (3 rounding stages here)
    assert steps(ref[final_q], ours[final_q]) <= 2
    assert np.mean(np.abs(ref[final_q].astype(int) - ours[final_q].astype(int)) <= 1) > 0.99
    out = model.graph.output[0].name
    agree = np.mean(np.argmax(ref[out], axis=1) == np.argmax(ours[out], axis=1))
    assert agree >= 0.995
    # the float output is the dequantized integer output
    np.testing.assert_allclose(ref[out], ours[out], atol=float(np.max(np.abs(ref[out]))) / 50 + 1e-6)


# ------------------------------------------------------------------------------------------- hand-made QDQ models


def _model_a():
    """Conv+Relu (7-bit), depthwise Conv+Clip(0,6), AveragePool (pads, ceil), Transpose, Reshape, MatMul,
    a float Sigmoid head and a Concat of a float and an integer tensor."""
    r = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=6, name="dw"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("AveragePool", ["r2"], ["ap"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         ceil_mode=1, count_include_pad=0, name="avgpool"),
        helper.make_node("Transpose", ["ap"], ["t"], perm=[0, 2, 3, 1], name="transpose"),
        helper.make_node("Reshape", ["t", "shape"], ["f"], name="reshape"),
        helper.make_node("MatMul", ["f", "wm"], ["m"], name="head1"),
        helper.make_node("Sigmoid", ["m"], ["s"], name="sigmoid"),
        helper.make_node("MatMul", ["f", "wm2"], ["m2"], name="head2"),
        helper.make_node("Concat", ["s", "m2"], ["y"], axis=1, name="concat"),
    ]
    inits = [
        _init("w1", r.normal(0, 0.4, (6, 3, 3, 3))), _init("b1", r.normal(0, 0.2, 6)),
        _init("w2", r.normal(0, 0.4, (6, 1, 3, 3))), _init("b2", r.normal(0, 0.2, 6)),
        _init("lo", np.array(0.0)), _init("hi", np.array(6.0)),
        _init("shape", np.array([4, -1]), np.int64),
        _init("wm", r.normal(0, 0.2, (150, 10))), _init("wm2", r.normal(0, 0.2, (150, 5))),
    ]
    return _float_model(nodes, [("x", [4, 3, 8, 8])], ["y"], inits)


def _model_b():
    """int8 activations, per-tensor weights: two convs summed with different scales, a Mul, GAP, Gemm(transB=0),
    Softmax in float."""
    r = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[0, 0, 0, 0], strides=[2, 2], name="conv1"),
        helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], kernel_shape=[3, 3], auto_pad="SAME_UPPER",
                         strides=[2, 2], name="conv2"),
        helper.make_node("Add", ["c1", "c2"], ["a"], name="add"),
        helper.make_node("Sub", ["a", "c1"], ["d"], name="sub"),
        helper.make_node("Mul", ["d", "c2"], ["p"], name="mul"),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["z"], name="fc"),
        helper.make_node("Softmax", ["z"], ["y"], axis=1, name="softmax"),
    ]
    inits = [
        _init("w1", r.normal(0, 0.5, (5, 2, 1, 1))),
        _init("w2", r.normal(0, 0.3, (5, 2, 3, 3))), _init("b2", r.normal(0, 0.2, 5)),
        _init("wg", r.normal(0, 0.5, (5, 7))), _init("bg", r.normal(0, 0.2, 7)),
    ]
    return _float_model(nodes, [("x", [8, 2, 9, 9])], ["y"], inits)


@pytest.fixture(scope="module")
def model_a():
    calib = {"x": RNG.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)}
    return make_qdq(_model_a(), calib, bits={"r1": 7}, skip={"c1", "c2", "s", "y"})


@pytest.fixture(scope="module")
def model_b():
    calib = {"x": RNG.normal(0, 1, (8, 2, 9, 9)).astype(np.float32)}
    return make_qdq(_model_b(), calib, act_dtype="int8", per_channel=False, skip={"y"})


def test_model_a_describe(model_a):
    recs = {r["node"]: r for r in rz.describe(model_a)}
    for n in ("conv1", "relu1", "dw", "relu6", "avgpool", "transpose", "reshape", "head1", "head2"):
        assert recs[n]["realized"] == "integer", recs[n]
    assert recs["relu1"]["detail"].endswith("folded into the requantize bounds")
    assert recs["sigmoid"]["realized"] == "float" and "Sigmoid" in recs["sigmoid"]["detail"]
    assert recs["concat"]["realized"] == "float" and "not quantized" in recs["concat"]["detail"]
    # the 7-bit narrowing Clip in front of the Q is folded too
    assert recs["r1_Clip"]["realized"] == "integer"
    assert recs["m_DQ"]["realized"] == "border"  # the Sigmoid reads head1's output in float


@pytest.fixture(scope="module")
def model_a_feeds():
    return {"x": RNG.normal(0, 1.2, (4, 3, 8, 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def model_a_run(model_a, model_a_feeds):
    return run_all_q(model_a, model_a_feeds)


@pytest.mark.parametrize("requantize", ["fixed_point", "float"])
def test_model_a_matches_onnxruntime(model_a, model_a_feeds, model_a_run, requantize):
    if requantize == "fixed_point":
        ours, ref = model_a_run
    else:
        ours, ref = run_all_q(model_a, model_a_feeds, requantize=requantize)
    exact = check_regions(model_a, model_a_feeds, ours)
    assert min(exact.values()) > 0.95, exact
    assert ours["r1_q"].max() <= 127  # 7 bits in uint8
    assert ref["r1_q"].max() <= 127
    np.testing.assert_allclose(ours["y"], ref["y"], atol=0.05)


def test_model_a_fold_relu_off_same_numbers(model_a, model_a_feeds, model_a_run):
    ours, _ref = model_a_run
    qs = q_outputs(model_a)
    mod = rz.realize(cut_at(model_a, qs), fold_relu=False)
    assert mod.script().count("R.clip(") > rz.realize(cut_at(model_a, qs)).script().count("R.clip(")
    got = compile_run(mod, [model_a_feeds["x"]])
    for t, y in zip(qs, got):
        np.testing.assert_array_equal(ours[t], y)


@pytest.mark.parametrize("requantize", ["fixed_point", "float"])
def test_separate_border_kernels_same_numbers(model_b, requantize):
    """border_kernels="separate": the float->int8 quantize of the input and the int8->float dequantize in front of
    the float Softmax are kernels of their own (not fused), with the same numbers as the fused form."""
    feeds = {"x": RNG.normal(0, 1, (8, 2, 9, 9)).astype(np.float32)}
    fused, _ = run_all_q(model_b, feeds, requantize=requantize)
    sep, _ = run_all_q(model_b, feeds, requantize=requantize, border_kernels="separate")
    for t in fused:
        np.testing.assert_array_equal(sep[t], fused[t], err_msg=t)
    text = rz.realize(model_b, border_kernels="separate").script()
    assert text.count("hago_border_quantize") >= 1 and text.count("hago_border_dequantize") >= 1
    assert "hago_border" not in rz.realize(model_b).script()
    with pytest.raises(CompileError):
        rz.realize(model_b, border_kernels="glued")


def test_model_b_int8_activations(model_b):
    recs = {r["node"]: r for r in rz.describe(model_b)}
    for n in ("conv1", "conv2", "add", "sub", "mul", "gap", "flatten", "fc"):
        assert recs[n]["realized"] == "integer", recs[n]
    assert recs["softmax"]["realized"] == "float"
    assert "per-tensor" in recs["conv1"]["detail"]
    feeds = {"x": RNG.normal(0, 1, (8, 2, 9, 9)).astype(np.float32)}
    ours, ref = run_all_q(model_b, feeds)
    assert ours["x_q"].dtype == np.int8
    exact = check_regions(model_b, feeds, ours)
    assert min(exact.values()) > 0.95, exact
    np.testing.assert_allclose(ours["y"], ref["y"], atol=0.02)
    assert np.mean(np.argmax(ours["y"], 1) == np.argmax(ref["y"], 1)) >= 7 / 8


def test_int16_accumulator():
    """4-bit weights and int8 activations: a 3x3x3 conv fits an int16 accumulator."""
    r = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    fm = _float_model(nodes, [("x", [2, 3, 6, 6])], ["y"],
                      [_init("w", r.normal(0, 0.5, (4, 3, 3, 3))), _init("b", r.normal(0, 0.1, 4))])
    q = make_qdq(fm, {"x": r.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)}, act_dtype="int8",
                 weight_dtype="int4", skip={"c"})
    text = rz.realize(q, accumulator="int16").script()
    assert 'out_dtype="int16"' in text and 'out_dtype="int32"' not in text
    feeds = {"x": r.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)}
    ours, _ref = run_all_q(q, feeds, accumulator="int16")
    exact = check_regions(q, feeds, ours)
    assert min(exact.values()) > 0.97


def _to_uint8_weights(model):
    """Rewrite every int8 weight DQ as uint8 with zero point 128 (same float values): the subtract form."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_wq"):
            q = numpy_helper.to_array(inits[n.input[0]])
            z = numpy_helper.to_array(inits[n.input[2]])
            inits[n.input[0]].CopyFrom(numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), n.input[0]))
            inits[n.input[2]].CopyFrom(numpy_helper.from_array((z.astype(np.int16) + 128).astype(np.uint8), n.input[2]))
    return m


def test_uint8_weights_with_zero_point(model_b):
    m = _to_uint8_weights(model_b)
    recs = {r["node"]: r for r in rz.describe(m)}
    assert recs["conv1"]["realized"] == "integer" and "subtracted" in recs["conv1"]["detail"]
    feeds = {"x": RNG.normal(0, 1, (8, 2, 9, 9)).astype(np.float32)}
    ours, _ref = run_all_q(m, feeds)
    assert min(check_regions(m, feeds, ours).values()) > 0.95


def test_matmul_of_two_activations_and_reshapes():
    r = np.random.default_rng(9)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="proj"),
        helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1], name="tr"),
        helper.make_node("MatMul", ["a", "at"], ["s"], name="scores"),
        helper.make_node("Unsqueeze", ["s", "ax"], ["u"], name="unsq"),
        helper.make_node("Squeeze", ["u", "ax"], ["v"], name="sq"),
        helper.make_node("Gemm", ["x2", "wg"], ["g"], transA=1, name="gemm_ta"),
        helper.make_node("Relu", ["v"], ["y"], name="relu"),
    ]
    fm = _float_model(nodes, [("x", [2, 4, 6]), ("x2", [5, 3])], ["y", "g"],
                      [_init("w", r.normal(0, 0.5, (6, 8))), _init("ax", np.array([1]), np.int64),
                       _init("wg", r.normal(0, 0.5, (5, 4)))])
    feeds = {"x": r.normal(0, 1, (2, 4, 6)).astype(np.float32), "x2": r.normal(0, 1, (5, 3)).astype(np.float32)}
    q = make_qdq(fm, feeds, skip={"s", "u"})
    recs = {r_["node"]: r_ for r_ in rz.describe(q)}
    for n in ("proj", "tr", "scores", "unsq", "sq", "relu", "gemm_ta"):
        assert recs[n]["realized"] == "integer", recs[n]
    assert "two quantized tensors" in recs["scores"]["detail"]
    ours, ref = run_all_q(q, feeds)
    assert min(check_regions(q, feeds, ours).values()) > 0.95
    np.testing.assert_allclose(ours["y_dq"], ref["y_dq"], atol=float(ref["y_dq"].max()) / 100)


def test_int16_outputs_float_bias_and_simulated_int32_quantizer():
    """The forms of hago's exporter for the HAGO accelerator specs: int16 activations, a bias left in float (added as
    its own fine-grained term, since the int16 output grid is finer than the accumulator's), and int32 edges written
    as Div/Round/Add/Clip/Sub/Mul (QuantizeLinear has no int32 output)."""
    r = np.random.default_rng(21)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "r"], ["a"], name="add"),
        helper.make_node("AveragePool", ["a"], ["ap"], kernel_shape=[2, 2], strides=[2, 2], name="avgpool"),
        helper.make_node("GlobalAveragePool", ["ap"], ["y"], name="gap"),
    ]
    fm = _float_model(nodes, [("x", [2, 3, 8, 8])], ["y"],
                      [_init("w", r.normal(0, 0.5, (4, 3, 3, 3))), _init("b", r.normal(0, 0.3, 4)),
                       _init("w2", r.normal(0, 0.5, (4, 4, 1, 1))), _init("b2", r.normal(0, 0.3, 4))])
    feeds = {"x": r.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}
    q = make_qdq(fm, feeds, act_dtype="int8", dtypes={"c": "int16", "ap": "int16"}, sim32={"c2", "a"},
                 skip={"r"}, float_bias=True)
    recs = {x["node"]: x for x in rz.describe(q)}
    assert "float bias as its own term" in recs["conv"]["detail"]
    assert recs["c2_Div"]["realized"] == "integer" and "int32" in recs["c2_Div"]["detail"]
    assert recs["c2_Mul"]["realized"] == "folded"
    assert all(x["realized"] != "float" for x in recs.values()), [x for x in recs.values() if x["realized"] == "float"]
    ours, ref = run_all_q(q, feeds)
    assert ours["c_q"].dtype == np.int16 and np.abs(ours["c_q"].astype(int)).max() > 20000
    exact = check_regions(q, feeds, ours)
    assert min(exact.values()) > 0.95, exact
    # int32 edges: onnxruntime rounds them in float32 (24-bit mantissa), so compare relative to the range
    sims = [n.output[0] for n in q.graph.node if n.op_type == "Mul"]
    cut = cut_at(q, sims)
    ref2, got2 = run_both(cut, feeds)
    for a, b in zip(ref2, got2):
        np.testing.assert_allclose(a, b, rtol=0, atol=float(np.abs(a).max()) * 1e-6)


# ------------------------------------------------------------------------------------------------------- errors


def test_bad_options_and_models(model_b):
    with pytest.raises(CompileError, match="requantize"):
        rz.realize(model_b, requantize="magic")
    with pytest.raises(CompileError, match="accumulator"):
        rz.realize(model_b, accumulator="int8")
    with pytest.raises(ModelError):
        rz.realize(b"not a model")
    sym = onnx.ModelProto()
    sym.CopyFrom(model_b)
    sym.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(ModelError, match="'x'.*symbolic"):
        rz.realize(sym)
    assert rz.realize(sym, input_shapes={"x": [8, 2, 9, 9]}) is not None
    broken = onnx.ModelProto()
    broken.CopyFrom(model_b)
    broken.graph.node[-1].input[0] = "nowhere"
    with pytest.raises(HagoError, match="nowhere"):
        rz.realize(broken)
    new = onnx.ModelProto()
    new.CopyFrom(model_b)
    new.opset_import[0].version = 23
    with pytest.raises(ModelError, match="opset"):
        rz.realize(new)


# --------------------------------------------------------------------------------------------- a real model


@pytest.mark.slow
def test_light_squeezenet(tmp_path):
    path = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_squeezenet.onnx")
    if not os.path.exists(path):
        pytest.skip("onnx does not ship light_squeezenet")
    fm = onnx.load(path)
    fm = _materialize_light(fm)
    name = fm.graph.input[0].name
    shape = [d.dim_value for d in fm.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    calib = [{name: rng.uniform(0, 1, shape).astype(np.float32)} for _ in range(4)]
    q = _ort_quantize(fm, calib, tmp_path, "sq")
    recs = rz.describe(q)
    ints = [r for r in recs if r["realized"] == "integer" and r["op_type"] == "Conv"]
    assert len(ints) == sum(1 for n in q.graph.node if n.op_type == "Conv")
    feeds = {name: rng.uniform(0, 1, shape).astype(np.float32)}
    ours, ref = run_all_q(q, feeds, target=CONTRACT_LLVM)
    exact = check_regions(q, feeds, ours)
    assert min(exact.values()) > 0.95
    out = q.graph.output[0].name
    assert np.argmax(ours[out]) == np.argmax(ref[out])


def _materialize_light(model, seed=0):
    """light_squeezenet builds its weights with ConstantOfShape (every weight 0.02, so all channels are equal and
    the argmax is a tie). Replace them by seeded random initializers of the same shapes (He-scaled weights, small
    biases) so that quantize_static sees real initializers and the classifier output is not degenerate."""
    rng = np.random.default_rng(seed)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    new_inits, nodes = [], []
    for n in model.graph.node:
        if n.op_type == "ConstantOfShape":
            shape = [int(d) for d in inits[n.input[0]]]
            if len(shape) == 4:
                fan_in = int(np.prod(shape[1:]))
                arr = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
            else:
                arr = rng.normal(0, 0.05, shape)
            new_inits.append(_init(n.output[0], arr))
        else:
            nodes.append(n)
    used = {i for n in nodes for i in n.input}
    keep = [numpy_helper.from_array(v, k) for k, v in inits.items() if k in used]
    const_names = {i.name for i in new_inits} | set(inits)
    inputs = [i for i in model.graph.input if i.name not in const_names]
    g = helper.make_graph(nodes, model.graph.name, inputs, list(model.graph.output), initializer=keep + new_inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    for node in m.graph.node:  # opset 9 -> 13: Dropout lost its `is_test`; Softmax on [1,1000,1,1] is the same
        for a in list(node.attribute):
            if node.op_type == "Dropout" and a.name in ("is_test", "ratio"):
                node.attribute.remove(a)
    onnx.checker.check_model(m)
    return m
