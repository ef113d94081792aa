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
