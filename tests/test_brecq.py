"""AdaRound and BRECQ (hago.algorithms.adaround / brecq) on tiny residual models."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hago.errors import CalibrationError, HagoError, ModelError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _t(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def tiny_resnet(seed=0):
    """stem Conv-Relu, identity residual block, projection (stride 2) residual block, GAP, Gemm."""
    rs = np.random.RandomState(seed)

    def he(*shape):
        fan_in = int(np.prod(shape[1:]))
        return rs.randn(*shape) * np.sqrt(2.0 / fan_in)

    inits = [
        _t("stem.w", he(8, 3, 3, 3)), _t("stem.b", 0.1 * rs.randn(8)),
        _t("b1.c1.w", he(8, 8, 3, 3)), _t("b1.c1.b", 0.1 * rs.randn(8)),
        _t("b1.c2.w", 0.5 * he(8, 8, 3, 3)), _t("b1.c2.b", 0.1 * rs.randn(8)),
        _t("b2.c1.w", he(16, 8, 3, 3)), _t("b2.c1.b", 0.1 * rs.randn(16)),
        _t("b2.c2.w", 0.5 * he(16, 16, 3, 3)), _t("b2.c2.b", 0.1 * rs.randn(16)),
        _t("b2.sc.w", he(16, 8, 1, 1)), _t("b2.sc.b", 0.1 * rs.randn(16)),
        _t("fc.w", he(10, 16)), _t("fc.b", 0.1 * rs.randn(10)),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "stem.w", "stem.b"], ["s"], pads=[1, 1, 1, 1], name="stem"),
        n("Relu", ["s"], ["s_r"], name="stem_relu"),
        n("Conv", ["s_r", "b1.c1.w", "b1.c1.b"], ["b1c1"], pads=[1, 1, 1, 1], name="b1.c1"),
        n("Relu", ["b1c1"], ["b1r1"], name="b1.r1"),
        n("Conv", ["b1r1", "b1.c2.w", "b1.c2.b"], ["b1c2"], pads=[1, 1, 1, 1], name="b1.c2"),
        n("Add", ["b1c2", "s_r"], ["b1a"], name="b1.add"),
        n("Relu", ["b1a"], ["b1_out"], name="b1.relu"),
        n("Conv", ["b1_out", "b2.c1.w", "b2.c1.b"], ["b2c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="b2.c1"),
        n("Relu", ["b2c1"], ["b2r1"], name="b2.r1"),
        n("Conv", ["b2r1", "b2.c2.w", "b2.c2.b"], ["b2c2"], pads=[1, 1, 1, 1], name="b2.c2"),
        n("Conv", ["b1_out", "b2.sc.w", "b2.sc.b"], ["b2sc"], strides=[2, 2], name="b2.sc"),
        n("Add", ["b2c2", "b2sc"], ["b2a"], name="b2.add"),
        n("Relu", ["b2a"], ["b2_out"], name="b2.relu"),
        n("GlobalAveragePool", ["b2_out"], ["gap"], name="gap"),
        n("Flatten", ["gap"], ["flat"], name="flatten"),
        n("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1, name="fc"),
    ]
    g = helper.make_graph(nodes, "tiny_resnet",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def calib_data(n=256, seed=1, bs=32):
    x = np.random.RandomState(seed).randn(n, 3, 8, 8).astype(np.float32)
    return [{"x": x[i:i + bs]} for i in range(0, n, bs)]


BLOCK_WEIGHTS = ["b1.c1.w", "b1.c2.w", "b2.c1.w", "b2.c2.w", "b2.sc.w"]  # the two residual blocks


# ------------------------------------------------------------------------------------------ no torch

def test_modules_import_without_torch():
    code = ("import sys\n"
            "import hago.algorithms.brecq, hago.algorithms.adaround, hago.algorithms.torch_bridge\n"
            "assert 'torch' not in sys.modules, 'torch imported at module import'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_missing_torch_raises_hago_error():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "sys.path.insert(0, 'tests')\n"
            "from builders import conv_bn_net\n"
            "from hago.algorithms import brecq\n"
            "from hago.errors import HagoError\n"
            "cal = [{'x': np.zeros((2, 3, 16, 16), np.float32)}]\n"
            "for f in (lambda: brecq.brecq(conv_bn_net(), cal), lambda: brecq.rtn(conv_bn_net())):\n"
            "    try:\n"
            "        f()\n"
            "    except HagoError as e:\n"
            "        print('HagoError:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("pip install hago[train]") == 2 and "torch==2.13.0" in r.stdout


torch = pytest.importorskip("torch")

from hago.algorithms import adaround as A  # noqa: E402
from hago.algorithms import brecq as B  # noqa: E402


# ------------------------------------------------------------------------------------------ grid and scales

def test_on_grid_weights_reproduce_codes_exactly():
    rs = np.random.RandomState(0)
    for bits in (2, 3, 4, 8):
        qmin, qmax = A.weight_qrange(bits)
        for _ in range(20):
            scale = np.exp(rs.uniform(-12, 2, size=16)).astype(np.float32)
            zp = rs.randint(qmin, qmax + 1, size=16).astype(np.int64) * (rs.rand() < 0.5)
            q = rs.randint(qmin, qmax + 1, size=(16, 3, 3, 3)).astype(np.int64)
            w_q = A.dequantize(q, scale, zp, 0)
            assert w_q.dtype == np.float32
            back = np.rint(w_q / scale.reshape(-1, 1, 1, 1)).astype(np.int64) + zp.reshape(-1, 1, 1, 1)
            np.testing.assert_array_equal(back, q)
            A.check_on_grid("w", w_q, q, scale, zp, 0)
    with pytest.raises(HagoError, match="'w'"):
        A.check_on_grid("w", w_q + scale.reshape(-1, 1, 1, 1), q, scale, zp, 0)


def test_mse_scale_search_beats_max_scale():
    rs = np.random.RandomState(1)
    w = rs.standard_t(3, size=(8, 64)).astype(np.float32)  # heavy tails: clipping pays off
    s, z = A.init_weight_scale(w, 4, 0, p=2.0)
    assert s.shape == (8,) and (z == 0).all()
    smax = np.abs(w).max(1) / 7
    assert (s <= smax + 1e-7).all() and (s < smax * 0.999).any()
    _, wq = A.quantize_nearest(w, s, z, 4, 0)
    _, wmax = A.quantize_nearest(w, smax, z, 4, 0)
    assert ((w - wq) ** 2).sum() < ((w - wmax) ** 2).sum()
    st, _ = A.init_weight_scale(w, 4, None)
    assert st.shape == ()
    sa, za = A.init_weight_scale(np.abs(w) + 0.1, 2, 0, symmetric=False)  # all-positive: zero point moves
    assert (za == -2).all()


def test_adaround_quantizer_init_and_hard_rounding():
    rs = np.random.RandomState(2)
    w = rs.randn(4, 3, 3, 3).astype(np.float32)
    s, z = A.init_weight_scale(w, 3, 0)
    q = A.adaround_quantizer(w, s, z, 3, 0)
    wt = torch.from_numpy(w)
    rest = (wt / q.delta - torch.floor(wt / q.delta))
    torch.testing.assert_close(q.h(), rest, atol=1e-5, rtol=0)  # h(V) starts at the fractional part
    with torch.no_grad():
        soft = q(wt)
    inside = (torch.floor(wt / q.delta) + 1 <= q.qmax) & (torch.floor(wt / q.delta) >= q.qmin)
    torch.testing.assert_close(soft[inside], wt[inside], atol=1e-5, rtol=0)  # soft-quantized = W unclipped
    q.soft_targets = False
    with torch.no_grad():
        hard = q(wt)
        codes = q.codes(wt)
    up = (q.h() >= 0.5).float()
    expected = (torch.clamp(torch.floor(wt / q.delta) + up, q.qmin, q.qmax)) * q.delta
    torch.testing.assert_close(hard, expected, atol=0, rtol=0)
    torch.testing.assert_close(hard, codes * q.delta, atol=0, rtol=0)


def test_beta_schedule_and_regulariser():
    d = A.LinearTempDecay(100, rel_start=0.2, start_b=20, end_b=2)
    assert d(1) == 20 and d(19) == 20 and d(20) == 20
    assert d(60) == pytest.approx(2 + 18 * 0.5) and d(100) == pytest.approx(2)
    q = A.adaround_quantizer(np.array([[0.5, 1.0]], np.float32), np.float32(1.0), np.int64(0), 4, None)
    with torch.no_grad():
        q.alpha.copy_(torch.tensor([[20.0, -20.0]]))  # h = 1 and 0: binary, no penalty
        assert float(q.round_loss(2.0)) == pytest.approx(0.0, abs=1e-6)
        q.alpha.zero_()  # h = 0.5: maximal penalty 1 per weight
        assert float(q.round_loss(2.0)) == pytest.approx(2.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ blocks

def test_block_detection_on_residual_model():
    blocks = B.find_blocks(tiny_resnet())
    desc = [(b.kind, b.inputs, b.outputs, b.weights) for b in blocks]
    assert desc == [
        ("layer", ["x"], ["s_r"], ["stem.w"]),
        ("block", ["s_r"], ["b1_out"], ["b1.c1.w", "b1.c2.w"]),
        ("block", ["b1_out"], ["b2_out"], ["b2.c1.w", "b2.c2.w", "b2.sc.w"]),
        ("layer", ["b2_out"], ["logits"], ["fc.w"]),
    ]
    layers = B.find_blocks(tiny_resnet(), "layer")
    assert [(b.inputs, b.outputs) for b in layers] == [
        (["x"], ["s_r"]), (["s_r"], ["b1r1"]), (["b1r1"], ["b1c2"]), (["b1_out"], ["b2r1"]),
        (["b2r1"], ["b2c2"]), (["b1_out"], ["b2sc"]), (["flat"], ["logits"])]
    explicit = B.find_blocks(tiny_resnet(), blocks=[("s_r", "b2_out")])
    assert explicit[0].weights == ["b1.c1.w", "b1.c2.w", "b2.c1.w", "b2.c2.w", "b2.sc.w"]
    with pytest.raises(HagoError, match="blocks\\[0\\]"):
        B.find_blocks(tiny_resnet(), blocks=[("b1_out", "s_r")])
    with pytest.raises(HagoError, match="granularity"):
        B.find_blocks(tiny_resnet(), "stage")


def test_chain_with_one_residual_add():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_torch_bridge import residual_net
    blocks = B.find_blocks(residual_net())
    assert [(b.kind, b.inputs, b.outputs, b.weights) for b in blocks] == [
        ("layer", ["x"], ["r1"], ["w1"]),  # Conv + its ReLU
        ("block", ["r1"], ["r2"], ["w2"]),  # Conv + residual Add (reads r1) + ReLU
        ("layer", ["r2"], ["rd"], ["wd"]),  # MaxPool joins the following depthwise Conv + Clip
        ("layer", ["rd"], ["c3"], ["w3"]),
        ("layer", ["c3"], ["prob"], ["wf"]),  # pools, Flatten, Gemm, Softmax
    ]


# ------------------------------------------------------------------------------------------ reconstruction

ITERS = 150
LR = 1e-2  # 150 iterations: a 10x larger step than the reference code's 1e-3 over its 20,000


@pytest.fixture(scope="module")
def results():
    m = tiny_resnet()
    cal = calib_data()
    kw = dict(w_bits=3, iters=ITERS, lr=LR, first_last_8bit=False, seed=0, weight_names=BLOCK_WEIGHTS)
    return {
        "model": m, "calib": cal,
        "rtn": B.rtn(m, 3, first_last_8bit=False, weight_names=BLOCK_WEIGHTS),
        "block": B.brecq(m, cal, **kw),
        "layer": B.brecq(m, cal, granularity="layer", **kw),
    }


def _block_out_err(m, res, cal, value):
    fp = B.simulate(m, B.BrecqResult("fp", {}, {}, {}, {}, {}, {}))
    qm = B.simulate(m, res)
    x = torch.from_numpy(np.concatenate([b["x"] for b in cal]))
    with torch.no_grad():
        d = qm.run({"x": x}, [value])[value] - fp.run({"x": x}, [value])[value]
        return float((d ** 2).mean())


def test_adaround_rounding_is_binary_and_on_grid(results):
    m = results["model"]
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for key in ("block", "layer"):
        res = results[key]
        assert set(res.weights) == set(BLOCK_WEIGHTS)
        assert len([e for e in res.log if "mse" in e]) == (2 if key == "block" else 5)
        for w in BLOCK_WEIGHTS:
            q, s, z, ax = res.codes[w], res.scales[w], res.zero_points[w], res.axes[w]
            qmin, qmax = A.weight_qrange(res.bits[w])
            assert q.min() >= qmin and q.max() <= qmax and res.bits[w] == 3
            assert ax == 0 and s.shape == (inits[w].shape[0],)
            sb = s.reshape(-1, *[1] * (inits[w].ndim - 1))
            # the float weights lie exactly on the grid and give the codes back
            np.testing.assert_array_equal(res.weights[w], ((q - z.reshape(sb.shape)) * sb).astype(np.float32))
            np.testing.assert_array_equal(np.rint(res.weights[w] / sb).astype(np.int64), q)
            # every weight was rounded down or up (h(V) in {0, 1}), except where clipped
            fl = np.floor(inits[w] / sb)
            d = q - fl
            clipped = (fl + 1 > qmax) | (fl < qmin)
            assert set(np.unique(d[~clipped])) <= {0, 1}
            assert 0 < (d[~clipped] == 1).mean() < 1


def test_adaround_beats_nearest_on_each_block(results):
    for key in ("block", "layer"):
        for entry in results[key].log:
            if "mse" in entry:
                assert entry["mse"] < entry["rtn_mse"], (key, entry["block"], entry["mse"], entry["rtn_mse"])


def test_block_and_layer_reconstruction_beat_nearest_end_to_end(results):
    """Both granularities cut the error of every block output (in the whole quantized model) well below
    round-to-nearest. Block vs layer: on this random-weight toy at 150-200 iterations the two are within
    noise of each other (measured: b1_out 0.0045 vs 0.0042, b2_out 0.035 vs 0.030; at 2,000 iterations
    and lr 1e-3, 0.0040 vs 0.0040 and 0.032 vs 0.034), so the test only bounds the gap; the claim
    "block beats layer" is measured by bench/bench_brecq.py on the trained MNIST ResNet."""
    m, cal = results["model"], results["calib"]
    for value in ("b1_out", "b2_out"):
        e_rtn = _block_out_err(m, results["rtn"], cal, value)
        e_layer = _block_out_err(m, results["layer"], cal, value)
        e_block = _block_out_err(m, results["block"], cal, value)
        assert e_block < 0.8 * e_rtn and e_layer < 0.8 * e_rtn, (value, e_block, e_layer, e_rtn)
        assert e_block < 1.3 * e_layer, (value, e_block, e_layer)


def test_block_reconstruction_optimises_its_own_output():
    """With identical block input (fp32, nothing before the block quantized), the block's own objective --
    the error of its output after the residual Add and ReLU -- is what block reconstruction minimises:
    it must end below the nearest rounding of the same weights."""
    m, cal = tiny_resnet(), calib_data(128)
    res = B.brecq(m, cal, w_bits=2, iters=100, lr=LR, first_last_8bit=False, weight_names=["b1.c1.w", "b1.c2.w"])
    rtn = B.rtn(m, 2, first_last_8bit=False, weight_names=["b1.c1.w", "b1.c2.w"])
    (entry,) = [e for e in res.log if "mse" in e]
    assert entry["outputs"] == ["b1_out"]
    assert entry["mse"] == pytest.approx(_block_out_err(m, res, cal, "b1_out"), rel=1e-5)
    assert entry["rtn_mse"] == pytest.approx(_block_out_err(m, rtn, cal, "b1_out"), rel=1e-5)
    assert entry["mse"] < 0.8 * entry["rtn_mse"]


def test_results_are_deterministic():
    m, cal = tiny_resnet(), calib_data(64)
    kw = dict(w_bits=2, iters=60, seed=3, weight_names=["b1.c1.w", "b1.c2.w"], first_last_8bit=False)
    a, b = B.brecq(m, cal, **kw), B.brecq(m, cal, **kw)
    for w, q in a.codes.items():
        np.testing.assert_array_equal(b.codes[w], q)
    assert a.log[0]["last_rec"] == b.log[0]["last_rec"]


def test_apply_and_simulate_agree_with_onnxruntime(results):
    ort = pytest.importorskip("onnxruntime")
    m, res = results["model"], results["block"]
    qm = res.apply(m)
    x = np.concatenate([b["x"] for b in results["calib"][:2]])
    ref = ort.InferenceSession(qm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        y = B.simulate(m, res)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ options

def test_activation_quantization_first_last_and_fisher():
    m = tiny_resnet()
    cal = calib_data(64)
    res = B.brecq(m, cal, w_bits=4, a_bits=4, iters=15, iters_a=15, fisher=True, seed=0)
    assert res.bits["stem.w"] == 8 and res.bits["fc.w"] == 8 and res.bits["b1.c1.w"] == 4
    assert any(e.get("skipped") for e in res.log)  # the 8-bit first layer is rounded to nearest
    assert set(res.act_scales) == {"x", "s_r", "b1r1", "b1c2", "b1_out", "b2r1", "b2c2", "b2sc", "flat"}
    assert res.act_bits["x"] == 8 and res.act_bits["flat"] == 8 and res.act_bits["b1r1"] == 4
    for v, (lo, hi) in res.act_ranges.items():
        assert lo <= 0 <= hi and res.act_scales[v] > 0
        assert 0 <= res.act_zero_points[v] <= 15 or res.act_bits[v] == 8
    assert res.act_zero_points["s_r"] == 0  # a ReLU output: the range starts at 0
    r = B.rtn(m, 4, calib=cal, a_bits=4)
    assert set(r.act_scales) == set(res.act_scales)


def test_errors_name_the_problem():
    m = tiny_resnet()
    with pytest.raises(ModelError, match="nope"):
        B.brecq(m, calib_data(32), weight_names=["nope"], iters=1)
    bad = calib_data(32)
    bad[0]["x"][0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="NaN"):
        B.brecq(m, bad, iters=1)
    with pytest.raises(CalibrationError, match="'x'"):
        B.brecq(m, [{"y": np.zeros((2, 3, 8, 8), np.float32)}], iters=1)
    with pytest.raises(HagoError, match="weight bits"):
        B.rtn(m, 1)


def test_weight_subset_and_per_tensor():
    m = tiny_resnet()
    res = B.brecq(m, calib_data(64), weight_names=["b1.c1.w", "b1.c2.w"], per_channel=False, iters=20,
                  first_last_8bit=False)
    assert set(res.weights) == {"b1.c1.w", "b1.c2.w"}
    assert res.axes["b1.c1.w"] is None and res.scales["b1.c1.w"].shape == ()


# ------------------------------------------------------------------------------------------ transformer neck

def tiny_neck(seed=0, softmax=False):
    """A CNN stem, then (as PP-OCR's SVTR neck) a skip around two residual MLP layers on a reshaped
    sequence, reshaped back by shape arithmetic and concatenated with the skip; a sequence head."""
    rs = np.random.RandomState(seed)
    i64 = np.int64

    def w(*shape, s=1.0):
        return rs.randn(*shape) * s / np.sqrt(shape[-1] if len(shape) == 2 else np.prod(shape[1:]))

    inits = [
        _t("c0.w", w(4, 3, 1, 1)), _t("c1.w", w(4, 4, 1, 1)), _t("c2.w", w(4, 4, 1, 1)), _t("c3.w", w(4, 8, 1, 1)),
        _t("m1.w", w(4, 4)), _t("m2.w", w(4, 4, s=0.5)), _t("m3.w", w(4, 4)), _t("m4.w", w(4, 4, s=0.5)),
        _t("head.w", w(4, 5)),
        numpy_helper.from_array(np.array([0], i64), "st"), numpy_helper.from_array(np.array([2], i64), "en"),
        numpy_helper.from_array(np.array([-1], i64), "m1"), numpy_helper.from_array(np.array([2], i64), "ax2"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "c0.w"], ["c0"], name="c0"), n("Relu", ["c0"], ["h"], name="r0"),
        n("Conv", ["h", "c1.w"], ["a"], name="c1"),
        n("Shape", ["a"], ["shp"]), n("Slice", ["shp", "st", "en"], ["lead"]),
        n("Concat", ["lead", "m1"], ["tgt"], axis=0), n("Reshape", ["a", "tgt"], ["seq"]),
        n("Transpose", ["seq"], ["t"], perm=[0, 2, 1]),
        n("MatMul", ["t", "m1.w"], ["u1"], name="m1"), n("Relu", ["u1"], ["u1r"]),
        n("MatMul", ["u1r", "m2.w"], ["u2"], name="m2"), n("Add", ["t", "u2"], ["r1"], name="add1"),
        n("MatMul", ["r1", "m3.w"], ["u3"], name="m3"), n("Relu", ["u3"], ["u3r"]),
        n("MatMul", ["u3r", "m4.w"], ["u4"], name="m4"), n("Add", ["r1", "u4"], ["r2"], name="add2"),
        n("Transpose", ["r2"], ["r2t"], perm=[0, 2, 1]), n("Reshape", ["r2t", "shp"], ["back"]),
        n("Conv", ["back", "c2.w"], ["o"], name="c2"),
        n("Concat", ["h", "o"], ["cat"], axis=1), n("Conv", ["cat", "c3.w"], ["c3"], name="c3"),
        n("Relu", ["c3"], ["c3r"]), n("Squeeze", ["c3r", "ax2"], ["sq"]),
        n("Transpose", ["sq"], ["seq2"], perm=[0, 2, 1]), n("MatMul", ["seq2", "head.w"], ["logits"], name="head"),
    ]
    out = "logits"
    if softmax:
        nodes.append(n("Softmax", ["logits"], ["prob"], axis=-1))
        out = "prob"
    g = helper.make_graph(nodes, "tiny_neck", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 1, 6])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def neck_calib(n=64, seed=3, bs=16):
    x = np.random.RandomState(seed).randn(n, 3, 1, 6).astype(np.float32)
    return [{"x": x[i:i + bs]} for i in range(0, n, bs)]


def test_long_skip_is_split_into_its_residual_layers():
    """The skip h -> Concat spans the whole neck: without looking through it the neck is one block of five
    weights. The two residual MLP layers become blocks of their own; the shape (an integer value computed
    before them) is recomputed where it is needed, its float source being the block input."""
    blocks = B.find_blocks(tiny_neck())
    desc = [(b.kind, b.inputs, b.outputs, b.weights) for b in blocks]
    assert desc == [
        ("layer", ["x"], ["h"], ["c0.w"]),
        ("layer", ["h"], ["a"], ["c1.w"]),
        ("block", ["a"], ["r1"], ["m1.w", "m2.w"]),  # reshape + transpose join the first residual layer
        ("block", ["r1"], ["r2"], ["m3.w", "m4.w"]),
        ("layer", ["a", "r2"], ["o"], ["c2.w"]),  # Shape(a) recomputed here from a, not read as an integer
        ("layer", ["h", "o"], ["c3r"], ["c3.w"]),
        ("layer", ["c3r"], ["logits"], ["head.w"]),
    ]
    # a residual block's body is not split, HardSwish-like x * f(x) is no merge
    assert [b.kind for b in B.find_blocks(tiny_resnet())] == ["layer", "block", "block", "layer"]


def test_shape_values_get_no_activation_quantizer_and_brecq_runs():
    m = tiny_neck()
    acts = B.act_values(m)
    assert "tgt" not in acts and "lead" not in acts and "shp" not in acts
    assert {"x", "h", "t", "r1", "u2", "o", "cat", "seq2"} <= set(acts)
    cal = neck_calib()
    res = B.brecq(m, cal, w_bits=4, a_bits=8, iters=30, iters_a=5, lr=1e-2, batch_size=8, seed=0)
    assert set(res.weights) == {"c0.w", "c1.w", "c2.w", "c3.w", "m1.w", "m2.w", "m3.w", "m4.w", "head.w"}
    x = np.concatenate([b["x"] for b in cal])
    with torch.no_grad():
        sim = B.simulate(m, res, activations=False)(torch.from_numpy(x)).numpy()
    import onnxruntime as ort
    ref = ort.InferenceSession(res.apply(m).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(sim, ref, atol=1e-4, rtol=1e-4)


def test_incremental_block_data_matches_full_recomputation():
    """The block inputs / targets kept along the topological order equal a run from the graph inputs."""
    m = tiny_neck()
    mod = B.to_torch(m)
    x = torch.from_numpy(np.concatenate([b["x"] for b in neck_calib()]))
    fr = B._Frontier(mod, {"x": x}, quant=True, chunk=16)
    blocks = B.find_blocks(mod)
    for b in blocks:
        got = fr.get(b.inputs)
        with torch.no_grad():
            ref = mod.run({"x": x}, b.inputs)
        for k in b.inputs:  # chunked and whole-batch kernels may differ in the last bit, never more
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=f"{b.name}: {k}")
        w = b.weights[0]
        mod.set_quantizer(w, lambda t: t.sign() * 0.1)  # a changed weight: what follows must be recomputed
        fr.invalidate(mod._consumers[w])
        fr.advance(max(b.nodes))
        assert set(fr.cache) <= {"x", "h", "t", "a", "r1", "r2", "o", "c3r", "logits"}


def test_fisher_kl_on_sequence_softmax_output_needs_no_labels():
    """PP-OCR's output is a softmax per time step [N, T, C] and has no labels: the Fisher weights come from
    KL(fp32 || quantized) per time step over the classes, on the probabilities (no second softmax)."""
    m = tiny_neck(softmax=True)
    mod = B.to_torch(m)
    assert B._output_is_softmax(mod) and not B._output_is_softmax(B.to_torch(tiny_resnet()))
    res = B.brecq(m, neck_calib(), w_bits=4, iters=10, lr=1e-2, batch_size=8, fisher=True, seed=0)
    assert all(np.isfinite(e["mse"]) for e in res.log if "mse" in e)
    # the KL of the fp32 model against itself has zero gradient: damping only
    blk = [b for b in B.find_blocks(mod) if b.weights == ["m1.w", "m2.w"]][0]
    x = {"x": torch.from_numpy(np.concatenate([b["x"] for b in neck_calib()]))}
    g = B._fisher_grads(mod, x, None, blk, 16, "kl")
    assert all(torch.allclose(v, torch.ones_like(v), atol=1e-5) for v in g.values())


def test_small_activation_steps_move_relative_to_their_size():
    """Adam moves a parameter by about lr per iteration: a step of 0.003 (attention probabilities at 8 bits)
    with the reference lr 4e-4 reached 0 within 20 iterations and zeroed PP-OCR's attention. Each step's
    rate is capped at 1 % of its initial value per iteration."""
    rs = np.random.RandomState(0)
    x = torch.from_numpy(rs.dirichlet(np.ones(50), size=64).astype(np.float32))
    q = A.act_quantizer(8, 0.003, 0)
    A.reconstruct(lambda b: {"y": q(b["x"])}, {"x": x}, {"y": x * 1.3}, act_params=[q.delta], iters=20,
                  batch_size=16, p=2.4)
    assert 0.003 * 0.8 <= float(q.delta.detach()) <= 0.003 * 1.2


def test_activation_pass_learns_only_the_steps_in_front_of_weight_layers():
    """BRECQ's activation pass learns (LSQ) the steps of the quantizers that feed a block's weight layers (the
    reference code's module / block output quantizers); quantizers on values computed inside a block (here the
    residual Add operands; on PP-OCR HardSwish / SE gates, LayerNorm and attention internals) keep their Lp
    initialisation. Training those too with 20 iterations took PP-OCRv4 W4A8 to 38.1 % (97.3 % with this rule,
    98.6 % with every step at its init: bench/bench_brecq.py, docs/BENCHMARKS.md)."""
    m = tiny_resnet()
    cal = calib_data(64)
    res = B.brecq(m, cal, w_bits=4, a_bits=8, iters=10, iters_a=10, act_lr=1e-1, seed=0)
    learned = {v for e in res.log for v in e.get("act_values", [])}
    assert learned == {"x", "s_r", "b1r1", "b1_out", "b2r1", "flat"}
    mod = B.to_torch(m)
    for w, arr in res.weights.items():
        mod.set_quantizer(w, A.fixed_quantizer(arr))
    X = {"x": torch.from_numpy(np.concatenate([b["x"] for b in cal]))}
    init = {v: q.qparams() for v, q in B._install_acts(mod, X, 8, True, 2.4, 256).items()}
    for v in ("b1c2", "b2c2", "b2sc"):
        assert res.act_scales[v] == init[v][0] and res.act_zero_points[v] == init[v][1], v
    assert any(res.act_scales[v] != init[v][0] for v in learned)
