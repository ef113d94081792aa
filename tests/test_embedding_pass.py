"""The 4-bit embedding graph pass: the dequantizing gather equals the packed table's lookup; files shrink."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import hago
from hago.passes.embedding import quantize_embeddings
from hago.runtime import ort as rt


def _model(rows=3000, dim=64, seed=0, matmul=False):
    rs = np.random.RandomState(seed)
    table = (rs.randn(rows, dim) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("ReduceMean", ["e"], ["y"], axes=[1], keepdims=0)]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", dim])]
    inits = [numpy_helper.from_array(table, "E")]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])]
    if matmul:
        inits.append(numpy_helper.from_array((rs.randn(rows, 8) * 0.1).astype(np.float32), "W"))
        nodes.append(helper.make_node("MatMul", ["h", "W"], ["z"]))
        inputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", rows]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 8]))
    g = helper.make_graph(nodes, "emb", inputs, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), table


@pytest.mark.parametrize("dim", [64, 37])
def test_dequantizing_gather_matches_packed_table(dim):
    m, table = _model(dim=dim)
    g = hago.load(m)
    tabs = quantize_embeddings(g, min_rows=1000)
    assert set(tabs) == {"E"}
    ids = np.random.RandomState(1).randint(0, 3000, (4, 9)).astype(np.int64)
    out = rt.session(g.to_onnx()).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(out, tabs["E"].gather(ids).mean(1), rtol=1e-6, atol=1e-6)
    assert np.abs(out - table[ids].mean(1)).max() < 0.02  # 4-bit row-wise error, averaged
    assert "E" not in g.initializers  # the fp32 table is gone


def test_file_size_and_matmul_table():
    m, table = _model(rows=4000, dim=128, matmul=True)
    g = hago.load(m)
    tabs = quantize_embeddings(g, min_rows=1000)
    assert set(tabs) == {"E", "W"}
    size_q = len(g.to_onnx().SerializeToString())
    size_f = len(m.SerializeToString())
    assert size_q < 0.16 * size_f, size_q / size_f
    rs = np.random.RandomState(2)
    feeds = {"ids": rs.randint(0, 4000, (2, 5)).astype(np.int64), "h": rs.randn(2, 4000).astype(np.float32)}
    z = rt.session(g.to_onnx()).run(None, feeds)[1]
    np.testing.assert_allclose(z, feeds["h"] @ tabs["W"].dequantize(), rtol=1e-4, atol=1e-4)


def test_small_tables_untouched():
    m, _ = _model(rows=500)
    g = hago.load(m)
    assert quantize_embeddings(g, min_rows=1000) == {}
