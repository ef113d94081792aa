"""hago.algorithms.torch_bridge: ONNX graphs run as torch modules, against onnxruntime."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hago.errors import HagoError, ModelError

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from hago.algorithms.torch_bridge import to_torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "hago", "examples", "models")


def _t(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def residual_net(seed=0):
    """Conv-Relu-Conv + residual Add, MaxPool, depthwise Conv with asymmetric pads, Clip (inputs),
    strided dilated Conv, AveragePool, GAP, Flatten, Gemm (transB, alpha, beta), Softmax."""
    rs = np.random.RandomState(seed)
    inits = [
        _t("w1", rs.randn(8, 3, 3, 3) * 0.3), _t("b1", rs.randn(8) * 0.1),
        _t("w2", rs.randn(8, 8, 3, 3) * 0.2), _t("b2", rs.randn(8) * 0.1),
        _t("wd", rs.randn(8, 1, 3, 3) * 0.4), _t("bd", rs.randn(8) * 0.1),
        _t("lo", 0.0), _t("hi", 6.0),
        _t("w3", rs.randn(12, 8, 3, 3) * 0.2),
        _t("wf", rs.randn(5, 12) * 0.3), _t("bf", rs.randn(5) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["a2"], name="add2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], name="pool2"),
        helper.make_node("Conv", ["p2", "wd", "bd"], ["cd"], group=8, pads=[0, 0, 1, 1], name="dw"),
        helper.make_node("Clip", ["cd", "lo", "hi"], ["rd"], name="relu6"),
        helper.make_node("Conv", ["rd", "w3"], ["c3"], strides=[2, 2], dilations=[2, 2], pads=[2, 2, 2, 2],
                         name="conv3"),
        helper.make_node("AveragePool", ["c3"], ["ap"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                         name="avgpool"),
        helper.make_node("GlobalAveragePool", ["ap"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["fc"], transB=1, alpha=0.7, beta=1.5, name="fc"),
        helper.make_node("Softmax", ["fc"], ["prob"], axis=1, name="softmax"),
    ]
    return _model(nodes, [_vi("x", ["N", 3, 12, 12])], [_vi("prob", ["N", 5])], inits)


def misc_net(seed=0):
    """BatchNormalization, AveragePool (count_include_pad, asymmetric pads), Sigmoid, Sub, Mul, Div,
    Reshape (0 and -1), Transpose, Concat, MatMul, Identity, Gemm(transA), MaxPool (ceil, pads)."""
    rs = np.random.RandomState(seed)
    inits = [
        _t("w", rs.randn(6, 4, 3, 3) * 0.3),
        _t("g", 1 + 0.1 * rs.randn(6)), _t("be", 0.1 * rs.randn(6)), _t("m", 0.1 * rs.randn(6)),
        _t("v", 0.5 + rs.rand(6)),
        _t("k", 0.5 + rs.rand(1, 6, 1, 1)), _t("d", 1.5 + rs.rand(6, 1, 1)),
        numpy_helper.from_array(np.array([0, 6, -1], np.int64), "shape"),
        _t("wm", rs.randn(36, 7) * 0.2),
        _t("wa", rs.randn(7, 3) * 0.2), _t("ca", rs.randn(3) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["bn"], epsilon=1e-3, name="bn"),
        helper.make_node("Sigmoid", ["bn"], ["s"], name="sig"),
        helper.make_node("Sub", ["s", "k"], ["sub"], name="sub"),
        helper.make_node("Mul", ["sub", "bn"], ["mul"], name="mul"),
        helper.make_node("Div", ["mul", "d"], ["div"], name="div"),
        helper.make_node("AveragePool", ["div"], ["ap1"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 2, 2], count_include_pad=0, name="ap_excl"),
        helper.make_node("AveragePool", ["div"], ["ap2"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], count_include_pad=1, name="ap_incl"),
        helper.make_node("MaxPool", ["div"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0],
                         ceil_mode=1, name="mp_ceil"),
        helper.make_node("Concat", ["ap1", "ap2"], ["cat"], axis=1, name="concat"),
        helper.make_node("Identity", ["cat"], ["cat_id"], name="identity"),
        helper.make_node("Reshape", ["cat_id", "shape"], ["rs"], name="reshape"),  # [N, 6, 2*36/6...]
        helper.make_node("Transpose", ["rs"], ["tr"], perm=[0, 2, 1], name="transpose"),
        helper.make_node("Flatten", ["mp"], ["mpf"], axis=2, name="flatten2"),
        helper.make_node("MatMul", ["mpf", "wm"], ["mm"], name="matmul"),
        helper.make_node("Transpose", ["mm"], ["mmt"], perm=[1, 0], name="t2"),
        helper.make_node("Gemm", ["mmt", "wa", "ca"], ["ga"], transA=1, name="gemm_ta"),
    ]
    # shapes: x [2,4,11,11] -> div [2,6,11,11]; ap1, ap2 [2,6,6,6]; cat [2,12,6,6]; rs [2,6,72];
    # mp (ceil) [2,6,6,6] -> flatten(axis 2) [12,36] -> mm [12,7] -> mmt [7,12] -> gemm(transA) [12,3]
    return nodes, inits


def test_residual_net_matches_onnxruntime():
    m = residual_net()
    x = np.random.RandomState(1).randn(4, 3, 12, 12).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    mod = to_torch(m)
    with torch.no_grad():
        y = mod(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)
    # every intermediate value too
    names = ["c1", "r1", "a2", "p2", "cd", "rd", "c3", "ap", "fc"]
    sess = ort.InferenceSession(_with_outputs(m, names).SerializeToString(), providers=["CPUExecutionProvider"])
    refs = dict(zip(names, sess.run(names, {"x": x})))
    with torch.no_grad():
        got = mod.run({"x": x}, names)
    for n in names:
        np.testing.assert_allclose(got[n].numpy(), refs[n], atol=1e-4, rtol=0, err_msg=n)


def _with_outputs(m, names):
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    for n in names:
        m2.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return m2


def test_misc_ops_match_onnxruntime():
    nodes, inits = misc_net()
    outs = {"tr": [2, 72, 6], "ga": [12, 3], "bn": [2, 6, 11, 11], "mp": [2, 6, 6, 6]}
    m = _model(nodes, [_vi("x", [2, 4, 11, 11])], [_vi(o, s) for o, s in outs.items()], inits)
    outs = list(outs)
    x = np.random.RandomState(2).randn(2, 4, 11, 11).astype(np.float32)
    refs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, {"x": x})
    mod = to_torch(m)
    with torch.no_grad():
        got = mod.run({"x": x}, outs)
    for o, r in zip(outs, refs):
        assert got[o].shape == r.shape, o
        np.testing.assert_allclose(got[o].numpy(), r, atol=1e-4, rtol=0, err_msg=o)


def test_old_opset_clip_attrs_and_softmax_coercion():
    rs = np.random.RandomState(3)
    inits = [_t("w", rs.randn(4, 3, 3, 3) * 0.5)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Clip", ["c"], ["cl"], min=-0.5, max=0.8),
        helper.make_node("Softmax", ["cl"], ["sm"], axis=1),  # opset < 13: softmax over the flattened [C*H*W]
    ]
    m = _model(nodes, [_vi("x", [2, 3, 7, 7])], [_vi("sm", [2, 4, 4, 4])],
               inits, opset=10)
    x = rs.randn(2, 3, 7, 7).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        y = to_torch(m)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)


def test_conv_bn_net_from_builders_matches():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from builders import conv_bn_net
    m = conv_bn_net(seed=4)
    x = np.random.RandomState(4).randn(3, 3, 16, 16).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        y = to_torch(m)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)


def test_params_quantizers_hooks_and_subgraph():
    m = residual_net()
    mod = to_torch(m)
    assert set(mod.params) == {"w1", "b1", "w2", "b2", "wd", "bd", "w3", "wf", "bf"}
    assert not mod.params["w1"].requires_grad
    x = torch.from_numpy(np.random.RandomState(5).randn(2, 3, 12, 12).astype(np.float32))
    with torch.no_grad():
        full = mod.run({"x": x}, ["r1", "r2", "prob"])
        # a block run alone from its input value gives the same output
        sub = mod.run_subgraph({"r1": full["r1"]}, ["r2"])
        np.testing.assert_allclose(sub["r2"].numpy(), full["r2"].numpy(), atol=1e-6)
        # the block needs only its input: the graph input is not required
        with pytest.raises(HagoError, match="graph input 'x'"):
            mod.run_subgraph({"r2": full["r2"]}, ["c1"])
        # a quantizer on a weight (by ONNX initializer name) changes the output; removing it restores it
        mod.set_quantizer("w2", lambda w: torch.zeros_like(w))
        zero_w2 = mod.run_subgraph({"r1": full["r1"]}, ["c2"])["c2"]
        np.testing.assert_allclose(zero_w2.numpy(), np.broadcast_to(
            mod.params["b2"].numpy().reshape(1, -1, 1, 1), zero_w2.shape), atol=1e-6)
        with mod.quantization(False):  # quantizers can be switched off for the fp32 model
            np.testing.assert_allclose(mod.run({"x": x}, ["prob"])["prob"].numpy(), full["prob"].numpy(), atol=1e-6)
        mod.set_quantizer("w2", None)
        # a quantizer on an activation value is seen by every consumer (Add and conv2 read r1)
        seen = []
        remove = mod.add_hook("r1", lambda t: seen.append(t.clone()))
        mod.set_quantizer("r1", lambda t: torch.round(t * 4) / 4)
        q = mod.run({"x": x}, ["r1", "a2"], pre_quant=False)
        assert torch.equal(q["r1"], torch.round(full["r1"] * 4) / 4)
        assert torch.equal(seen[-1], q["r1"])
        raw = mod.run({"x": x}, ["r1"], pre_quant=True)["r1"]
        np.testing.assert_allclose(raw.numpy(), full["r1"].numpy(), atol=1e-6)
        remove()
        mod.clear_quantizers()
        np.testing.assert_allclose(mod.run({"x": x}, ["prob"])["prob"].numpy(), full["prob"].numpy(), atol=1e-6)
    with pytest.raises(ModelError, match="no value named 'nope'"):
        mod.set_quantizer("nope", lambda t: t)


def test_gradients_reach_quantizer_parameters():
    m = residual_net()
    mod = to_torch(m)
    scale = torch.nn.Parameter(torch.tensor(1.0))

    class Q(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = scale

        def forward(self, w):
            return w * self.s

    mod.set_quantizer("w3", Q())
    assert any(p is scale for p in mod.parameters())
    x = torch.randn(2, 3, 12, 12)
    out = mod.run({"x": x}, ["fc"])["fc"]
    out.pow(2).sum().backward()
    assert scale.grad is not None and float(scale.grad.abs()) > 0
    assert mod.params["w3"].grad is None  # the weights themselves are frozen by default


def test_unsupported_op_names_the_node():
    nodes = [helper.make_node("Erf", ["x"], ["y"], name="my_erf")]
    m = _model(nodes, [_vi("x", [1, 3])], [_vi("y", [1, 3])], [])
    with pytest.raises(ModelError, match="my_erf.*Erf"):
        to_torch(m)


@pytest.mark.parametrize("name", ["mnist_cnn", "mnist_resnet", "mnist_plain", "mnist_mobilenetv2"])
@pytest.mark.parametrize("canonical", [False, True])
def test_example_models_match_onnxruntime(name, canonical):
    path = os.path.join(MODELS, name + ".onnx")
    if not os.path.exists(path):
        pytest.skip(f"{path} not committed yet")
    if canonical:
        from hago.ir.graph import load
        m = load(path).to_onnx()
    else:
        m = onnx.load(path)
    inp = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}][0]
    x = np.random.RandomState(6).rand(6, 1, 28, 28).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {inp: x})[0]
    with torch.no_grad():
        y = to_torch(m)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)


def test_bridge_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import hago.algorithms.torch_bridge as tb\n"
            "from onnx import helper\n"
            "try:\n"
            "    tb.to_torch(helper.make_model(helper.make_graph([], 'g', [], [])))\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert "HagoError" in r.stdout and "pip install hago[train]" in r.stdout


@pytest.mark.parametrize("opset", [17, 18])
def test_transformer_and_shape_ops_match_onnxruntime(opset):
    """The ops PP-OCRv4 recognition adds to the CNN set: Shape / Slice / Gather / Cast arithmetic,
    LayerNorm as ReduceMean / Sub / Pow / Sqrt / Div, HardSigmoid, HardSwish."""
    i64 = np.int64
    red = ([helper.make_node("ReduceMean", ["x", "ax"], ["mu"], keepdims=1)] if opset >= 18 else
           [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1)])
    nodes = red + [
        helper.make_node("Sub", ["x", "mu"], ["xc"]),
        helper.make_node("Pow", ["xc", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "ax"], ["var"], keepdims=1) if opset >= 18 else
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["xc", "sd"], ["ln"]),
        helper.make_node("HardSigmoid", ["ln"], ["hs"], alpha=0.2, beta=0.5),
        helper.make_node("HardSwish", ["ln"], ["hw"]),
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "one"], ["d1"], axis=0),
        helper.make_node("Cast", ["d1"], ["d1f"], to=TensorProto.FLOAT),
        helper.make_node("Slice", ["ln", "st", "en", "axs", "stp"], ["sl"]),
        helper.make_node("Slice", ["ln", "rst", "ren", "raxs", "rstp"], ["rsl"]),
        helper.make_node("Shape", ["x"], ["shp2"], start=1),
        helper.make_node("Cast", ["shp2"], ["shp2f"], to=TensorProto.FLOAT),
    ]
    inits = [_t("two", 2.0), _t("eps", 1e-5), _t("one", 1, i64), _t("st", [1, 0], i64), _t("en", [-1, 100], i64),
             _t("axs", [1, 2], i64), _t("stp", [1, 2], i64), _t("rst", [-1], i64), _t("ren", [-100], i64),
             _t("raxs", [2], i64), _t("rstp", [-2], i64)]
    if opset >= 18:
        inits.append(_t("ax", [-1], i64))
    outs = ["ln", "hs", "hw", "d1f", "sl", "rsl", "shp2f"]
    g = helper.make_graph(nodes, "g", [_vi("x", [2, 5, 7])], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                             for o in outs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    x = np.random.RandomState(4).randn(2, 5, 7).astype(np.float32) * 3
    refs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, {"x": x})
    with torch.no_grad():
        got = to_torch(m).run({"x": x}, outs)
    for o, r in zip(outs, refs):
        assert tuple(got[o].shape) == r.shape, o
        np.testing.assert_allclose(got[o].numpy(), r, atol=1e-5, rtol=0, err_msg=o)


def test_float_and_shape_values_are_told_apart():
    """Shape arithmetic (Shape -> Slice -> Concat -> Reshape, Cast of a shape) is not float data: activation
    quantizers and block boundaries must skip it (PP-OCR's SVTR neck reshapes this way)."""
    i64 = np.int64
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["shp"]),
        helper.make_node("Slice", ["shp", "st", "en"], ["lead"]),
        helper.make_node("Concat", ["lead", "minus1"], ["tgt"], axis=0),
        helper.make_node("Reshape", ["r", "tgt"], ["flat"]),
        helper.make_node("Cast", ["lead"], ["leadf"], to=TensorProto.FLOAT),
        helper.make_node("Dropout", ["flat"], ["d", "mask"]),
    ]
    inits = [_t("st", [0], i64), _t("en", [2], i64), _t("minus1", [-1], i64)]
    g = helper.make_graph(nodes, "g", [_vi("x", [2, 3, 4])],
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("leadf", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    mod = to_torch(m)
    assert {v: mod.is_float(v) for v in ["x", "r", "shp", "lead", "tgt", "flat", "leadf", "d", "mask", "st"]} == {
        "x": True, "r": True, "shp": False, "lead": False, "tgt": False, "flat": True, "leadf": True, "d": True,
        "mask": False, "st": False}
    with torch.no_grad():
        got = mod.run({"x": np.ones((2, 3, 4), np.float32)}, ["d", "tgt"])
    assert tuple(got["d"].shape) == (2, 3, 4) and not got["tgt"].is_floating_point()
