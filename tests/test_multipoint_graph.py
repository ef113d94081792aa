"""Multipoint in the graph: a layer becomes a sum of low-bit layers whose codes the QDQ model reproduces exactly."""
import collections

import numpy as np
import onnx
from onnx import numpy_helper

import hago
from hago.passes.multipoint import multipoint_split
from hago.runtime import ort as rt

from builders import calib, conv_bn_net


def test_split_graph_equals_dequantized_multipoint():
    m = conv_bn_net()
    g = hago.load(m)
    res = multipoint_split(g, calib([4, 3, 16, 16], n=2), bits=3, max_points=3, budget_avg=2.0)
    ops = collections.Counter(n.op_type for n in g.nodes())
    n_extra = sum(mp.n - 1 for mp in res.values())
    assert ops["Conv"] + ops["Gemm"] == 4 + n_extra
    # the float split graph computes with the multipoint weights exactly
    x = calib([2, 3, 16, 16], n=1, seed=3)[0]
    out = rt.session(g.to_onnx()).run(None, x)[0]
    ref_g = hago.load(m)
    for node in ref_g.nodes():
        if node.name in res:
            w = res[node.name].dequantize()
            v = node.inputs[1]
            v.const_value = onnx_ir_tensor(w, v.name)
    ref = rt.session(ref_g.to_onnx()).run(None, x)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def onnx_ir_tensor(arr, name):
    import onnx_ir as ir

    return ir.tensor(arr, name=name)


def test_qdq_keeps_multipoint_codes_and_sums_in_float():
    m = conv_bn_net()
    g = hago.load(m)
    data = calib([4, 3, 16, 16], n=2)
    res = multipoint_split(g, data, bits=3, points=2)
    qg = hago.quantize(g, "x86_avx512_vnni", data, weight_bits=3, method="minmax")
    sums = [n for n in qg.graph.nodes() if n.meta.get("hago.multipoint_sum")]
    assert sums and all(qg.graph.region(n) == "float" for n in sums)
    model = qg.to_qdq()
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    name = [n for n in res][0]
    mp = res[name]
    node = [n for n in qg.graph.nodes() if n.name == name][0]
    w0 = node.inputs[1].name
    np.testing.assert_array_equal(inits[w0 + "__q"].astype(np.int64), mp.codes[0].astype(np.int64))


def test_multipoint_beats_single_point_at_3_bits():
    m = conv_bn_net()
    data = calib([8, 3, 16, 16], n=2)
    x = calib([8, 3, 16, 16], n=1, seed=12)[0]
    ref = rt.session(m).run(None, x)[0]
    single = hago.quantize(m, "x86_avx512_vnni", data, weight_bits=3, activation_bits=8, method="minmax")
    g = hago.load(m)
    multipoint_split(g, data, bits=3, points=2)
    multi = hago.quantize(g, "x86_avx512_vnni", data, weight_bits=3, activation_bits=8, method="minmax")
    e1 = np.mean((single.run(x)[0] - ref) ** 2)
    e2 = np.mean((multi.run(x)[0] - ref) ** 2)
    assert e2 < 0.5 * e1, (e1, e2)


def _two_conv_net(s1=1.0, seed=0):
    """x -> Conv(w1*s1, b1*s1) -> Relu -> Conv(w2/s1) -> Relu -> GAP -> Flatten -> Gemm: the same function for any s1 > 0."""
    from onnx import TensorProto, helper

    rs = np.random.RandomState(seed)
    w1 = rs.randn(8, 3, 3, 3) * 0.3
    w1[::3, 0, 1, 1] *= 8.0  # outlier channels: one point is poor there
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w1", w1 * s1), ("b1", rs.randn(8) * 0.1 * s1), ("w2", rs.randn(12, 8, 3, 3) * 0.2 / s1),
        ("wf", rs.randn(10, 12) * 0.3), ("bf", rs.randn(10) * 0.1)]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1, name="fc")]
    gr = helper.make_graph(nodes, "two_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                           [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(gr, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_global_allocation_budget_on_macs():
    data = calib([4, 3, 16, 16], n=2)
    st = {}
    res = multipoint_split(hago.load(_two_conv_net()), data, bits=3, budget_avg=2.0, max_points=3,
                           allocation="global", stats=st)
    macs = st["macs"]
    # per-channel MACs per sample: conv1 27 * 16*16, conv2 72 * 8*8 (stride 2), fc 12
    assert {k: float(v[0]) for k, v in macs.items()} == {"conv1": 27 * 256.0, "conv2": 72 * 64.0, "fc": 12.0}
    spent = sum(float(np.sum(macs[k] * res[k].n_points)) for k in res)
    total = sum(float(macs[k].sum()) for k in res)
    assert spent <= 2.0 * total + 1e-6 and st["avg_points_mac"] == spent / total
    assert st["avg_points_mac"] > 2.0 - 27 * 256.0 / total  # nothing affordable left unspent
    # a network-wide budget: the layers do not each get an average of 2
    assert len({round(mp.avg_points, 3) for mp in res.values()}) > 1
    assert all(mp.n_points.max() <= 3 for mp in res.values())
    # the per-layer allocation (the default) keeps every layer at an average of at most 2
    res_l = multipoint_split(hago.load(_two_conv_net()), data, bits=3, budget_avg=2.0, max_points=3)
    assert all(mp.avg_points <= 2.0 for mp in res_l.values())


def test_global_allocation_invariant_to_layer_rescaling():
    """Scaling conv1 by 100 and conv2 by 1/100 leaves the network unchanged; the energy-normalized
    allocation must not change either (raw output MSEs would give conv1 all the extra points)."""
    data = calib([4, 3, 16, 16], n=2)
    a = multipoint_split(hago.load(_two_conv_net(1.0)), data, bits=3, budget_avg=1.5, max_points=3,
                         allocation="global")
    b = multipoint_split(hago.load(_two_conv_net(100.0)), data, bits=3, budget_avg=1.5, max_points=3,
                         allocation="global")
    for k in a:
        np.testing.assert_array_equal(a[k].n_points, b[k].n_points)
    assert a["conv1"].n_points.max() > 1 and a["conv2"].n_points.max() > 1  # both layers get extra points


def test_global_sensitivity_predicts_network_error():
    m = _two_conv_net()
    data = calib([8, 3, 16, 16], n=2)
    st = {}
    g = hago.load(m)
    res = multipoint_split(g, data, bits=3, budget_avg=1.5, max_points=3, allocation="global",
                           weighting="sensitivity", stats=st)
    assert set(st["sensitivity"]) == {"conv1", "conv2", "fc"} and all(s > 0 for s in st["sensitivity"].values())
    # the fc layer's output is the network output: its sensitivity is 1 up to the bias's share of the output
    # energy (the layer's energy excludes the bias); conv1 with its outlier channels is not exactly 1
    assert 0.8 < st["sensitivity"]["fc"] < 1.25
    # held-out inputs: the network output error with global-S <= with the per-layer allocation at equal MACs
    x = calib([16, 3, 16, 16], n=1, seed=21)[0]
    ref = rt.session(m).run(None, x)[0]

    def err(graph):
        y = rt.session(graph.to_onnx()).run(None, x)[0]
        return float(np.mean((y - ref) ** 2))

    g_l = hago.load(m)
    multipoint_split(g_l, data, bits=3, budget_avg=1.5, max_points=3)
    assert err(g) < err(g_l)
