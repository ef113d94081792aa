"""SPARQ in the graph: the QDQ model trims activation codes bit-exactly like hago.algorithms.sparq."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import hago
from hago.algorithms.sparq import bsparq, vsparq
from hago.runtime import ort as rt

from builders import calib, conv_bn_net


def _codes(qg, edge, trimmed_suffix, feeds):
    model = qg.to_qdq()
    s = rt.session(rt.with_outputs(model, [edge + "__q", edge + trimmed_suffix]), optimize=False)
    return s.run([edge + "__q", edge + trimmed_suffix], feeds)


@pytest.mark.parametrize("mode,suffix", [("bsparq", "__sparq_b"), ("vsparq", "__sparq_v")])
def test_sparq_export_bit_exact(mode, suffix):
    data = calib([2, 3, 16, 16], n=2)
    qg = hago.quantize(conv_bn_net(), "x86_avx2", data, method="minmax", sparq=mode)
    marked = [v.name for v, a in qg.graph.annotated() if a.sparq]
    assert "r1" in marked and "x" not in marked  # x has negative values (zero point != 0): not a SPARQ edge
    q, t = _codes(qg, "r1", suffix, data[1])
    ref = bsparq(q) if mode == "bsparq" else vsparq(q, pair_axis=1)[0]
    np.testing.assert_array_equal(ref.astype(np.int64), t.astype(np.int64))
    assert (q != t).any()


def test_vsparq_odd_channels():
    rs = np.random.RandomState(0)
    w1 = (rs.randn(5, 3, 3, 3) * 0.4).astype(np.float32)
    w2 = (rs.randn(4, 5, 3, 3) * 0.3).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c1"], ["r1"]),
                           helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])], "odd",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    data = calib([1, 3, 8, 8], n=2)
    qg = hago.quantize(m, "x86_avx2", data, method="minmax", sparq="vsparq")
    q, t = _codes(qg, "r1", "__sparq_v", data[0])
    np.testing.assert_array_equal(vsparq(q, pair_axis=1)[0].astype(np.int64), t.astype(np.int64))


def test_spec_flag_turns_sparq_on():
    spec = hago.load_spec("sparq_accelerator")
    assert spec.sparq["window_bits"] == 4 and spec.sparq["pairs"] is True
    qg = hago.quantize(conv_bn_net(), spec, calib([2, 3, 16, 16], n=2), method="minmax")
    assert any(a.sparq and a.sparq["mode"] == "vsparq" for _, a in qg.graph.annotated())
    qg2 = hago.quantize(conv_bn_net(), "x86_avx2", calib([2, 3, 16, 16], n=2), method="minmax")
    assert not any(a.sparq for _, a in qg2.graph.annotated())
