"""Graph IR: loading, canonicalization, real-world graph features, bad inputs."""
import collections
import glob
import os

import numpy as np
import onnx
import pytest

import hago
from hago.errors import ModelError
from hago.runtime import ort as rt

from builders import calib, control_flow_net, conv_bn_net, dynamic_reshape_net

LIGHT = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_*.onnx")))


def _run(model, feeds):
    return rt.session(model).run(None, feeds)


def test_canonicalize_folds_bn_and_removes_identity():
    m = conv_bn_net()
    g = hago.load(m)
    ops = collections.Counter(n.op_type for n in g.nodes())
    assert ops["BatchNormalization"] == 0 and ops["Dropout"] == 0 and ops["Identity"] == 0
    assert g.opset == 21
    x = calib([2, 3, 16, 16])[0]
    a, b = _run(m, x)[0], _run(g.to_onnx(), x)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_constant_folding_of_constant_nodes():
    m = conv_bn_net()
    # replace initializer w3 by a Constant node and b3 by ConstantOfShape
    w3 = [t for t in m.graph.initializer if t.name == "w3"][0]
    m.graph.initializer.remove(w3)
    m.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["w3"], value=w3))
    b3 = [t for t in m.graph.initializer if t.name == "b3"][0]
    m.graph.initializer.remove(b3)
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([8], dtype=np.int64), "b3shape"))
    m.graph.node.insert(0, onnx.helper.make_node("ConstantOfShape", ["b3shape"], ["b3"],
                                                 value=onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.25])))
    g = hago.load(m)
    ops = {n.op_type for n in g.nodes()}
    assert "Constant" not in ops and "ConstantOfShape" not in ops
    conv3 = [n for n in g.nodes() if n.op_type == "Conv"][-1]
    assert conv3.inputs[1].const_value is not None and conv3.inputs[2].const_value is not None
    x = calib([1, 3, 16, 16])[0]
    np.testing.assert_allclose(_run(m, x)[0], _run(g.to_onnx(), x)[0], rtol=1e-4, atol=1e-5)


def test_symbolic_shapes_and_shape_subgraph_quantize():
    m = dynamic_reshape_net()
    g = hago.load(m)
    assert [str(d) for d in g.inputs[0].shape][0] == "N"
    qg = hago.quantize(g, "x86_avx2", calib([2, 4, 6, 6], n=3))
    for shape in ([1, 4, 5, 7], [3, 4, 6, 6]):  # other batch and spatial sizes run too
        x = calib(shape, n=1, seed=5)[0]
        ref = _run(m, x)[0]
        out = qg.run(x)[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 1e-3
    mm = [n for n in qg.graph.nodes() if n.op_type == "MatMul"][0]
    assert qg.graph.region(mm) == "int"


def test_control_flow_survives_and_is_reported():
    m = control_flow_net()
    g = hago.load(m)
    qg = hago.quantize(g, "x86_avx2", calib([1, 2, 8, 8]))
    reasons = {fb.op_type: fb.reason for fb in qg.graph.fallbacks}
    assert "control flow" in reasons["If"] and "control flow" in reasons["Loop"]
    conv = [n for n in qg.graph.nodes() if n.op_type == "Conv"][0]
    assert qg.graph.region(conv) == "int"
    x = calib([1, 2, 8, 8], n=1, seed=3)[0]
    ref = _run(m, x)[0]
    out = qg.run(x)[0]
    assert out.shape == ref.shape and np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


@pytest.mark.parametrize("path", LIGHT, ids=[os.path.basename(p) for p in LIGHT])
def test_light_models_load_partition_export(path):
    g = hago.load(path)
    assert not any(n.op_type in ("BatchNormalization",) and n.inputs[0].producer() is not None
                   and n.inputs[0].producer().op_type == "Conv" for n in g.nodes())
    name = g.input_names[0]
    shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
    qg = hago.quantize(g, "x86_avx2", calib(shape, n=1, name=name), method="minmax")
    n_int = sum(1 for n in qg.graph.nodes() if qg.graph.region(n) == "int")
    assert n_int > 0
    model = qg.to_qdq()
    onnx.checker.check_model(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    out = qg.run(calib(shape, n=1, name=name, seed=7)[0])
    assert np.isfinite(out[0]).all()


def test_table_and_save(tmp_path):
    g = hago.load(conv_bn_net())
    qg = hago.quantize(g, "x86_avx2", calib([1, 3, 16, 16]))
    t = qg.graph.table()
    assert "Conv" in t and "u8 asym" in t and "s7 sym axis0" in t
    p = tmp_path / "f.onnx"
    qg.graph.save(str(p))
    assert len(hago.load(str(p)).nodes()) == len(g.nodes())
    qg.save(str(tmp_path / "q.onnx"))
    assert onnx.load(str(tmp_path / "q.onnx")).producer_name == "hago"


def test_corrupt_and_missing_models(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        hago.load(str(tmp_path / "nope.onnx"))
    p = tmp_path / "garbage.onnx"
    p.write_bytes(b"\x08\x07this is not a protobuf\xff\xff\xff")
    with pytest.raises(ModelError, match="garbage.onnx"):
        hago.load(str(p))
    good = conv_bn_net().SerializeToString()
    p2 = tmp_path / "truncated.onnx"
    p2.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match="truncated.onnx"):
        hago.load(str(p2))
    with pytest.raises(ModelError, match="is a directory"):
        hago.load(str(tmp_path))
    bad = conv_bn_net()
    bad.graph.node[0].input[1] = "does_not_exist"
    p3 = tmp_path / "dangling.onnx"
    onnx.save(bad, str(p3))
    with pytest.raises(ModelError, match="dangling.onnx: invalid ONNX model"):
        hago.load(str(p3))
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "e", [], []))
    with pytest.raises(ModelError, match="no graph nodes"):
        hago.load(empty)


def test_unsupported_op_falls_back_and_is_reported():
    m = conv_bn_net()
    # an op the spec does not know (Erf) and a custom-domain op stay float
    relu = [n for n in m.graph.node if n.op_type == "Relu"][-1]
    relu.op_type = "Erf"
    g = hago.load(m)
    qg = hago.quantize(g, "x86_avx2", calib([1, 3, 16, 16]))
    fb = {f.op_type: f.reason for f in qg.graph.fallbacks}
    assert "not in spec x86_avx2" in fb["Erf"]
    x = calib([1, 3, 16, 16], n=1, seed=2)[0]
    ref = _run(m, x)[0]
    assert np.abs(qg.run(x)[0] - ref).max() < 0.1 * np.abs(ref).max()
