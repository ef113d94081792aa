"""LAPQ (hago.algorithms.lapq): the parametric QDQ model, the Lp search over p, Powell, and its guarantees."""
import numpy as np
import pytest

import hago
from hago.algorithms.lapq import ParamModel, cross_entropy, lapq, make_loss
from hago.errors import CalibrationError, HagoError
from hago.runtime import ort as rt

from builders import conv_bn_net


def _data(n=64, seed=1, labels=True):
    """Calibration batches for conv_bn_net; labels are the fp32 argmax with 20% flipped (a real CE to minimise)."""
    rs = np.random.RandomState(seed)
    x = rs.randn(n, 3, 16, 16).astype(np.float32)
    out = []
    if labels:
        ref = rt.session(conv_bn_net()).run(None, {"x": x})[0]
        y = ref.argmax(1)
        flip = rs.rand(n) < 0.2
        y[flip] = rs.randint(0, 10, flip.sum())
    for i in range(0, n, 32):
        b = {"x": x[i:i + 32]}
        if labels:
            b["label"] = y[i:i + 32]
        out.append(b)
    return out


def _w4a4(data, per_channel=False, method="mse"):
    return hago.quantize(conv_bn_net(), "x86_avx512_vnni", data, per_channel=per_channel, weight_bits=4,
                         activation_bits=4, method=method, weight_method=method if method != "kl" else "minmax")


@pytest.mark.parametrize("per_channel,bits", [(False, 4), (True, 4), (True, 8)])
def test_param_model_equals_qdq(per_channel, bits):
    data = _data()
    qg = hago.quantize(conv_bn_net(), "x86_avx512_vnni", data, per_channel=per_channel, weight_bits=bits,
                       activation_bits=bits, method="mse")
    pm = ParamModel(qg.graph)
    x = np.random.RandomState(5).randn(8, 3, 16, 16).astype(np.float32)
    out = pm.run({"x": x}, pm.params_from_annotations())[0]
    ref = qg.run({"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    # and it is really quantized: different from fp32
    fp = rt.session(conv_bn_net()).run(None, {"x": x})[0]
    assert np.abs(out - fp).max() > 1e-3


def test_param_model_mix_zero_is_float():
    data = _data()
    qg = _w4a4(data)
    pm = ParamModel(qg.graph, mix=True)
    feeds = pm.params_from_annotations()
    x = data[0]["x"]
    for k in feeds:
        if k.endswith("__t"):
            feeds[k] = np.array(0.0, np.float32)
    fp = rt.session(conv_bn_net()).run(None, {"x": x})[0]
    np.testing.assert_allclose(pm.run({"x": x}, feeds)[0], fp, rtol=1e-6, atol=1e-6)
    for k in feeds:
        if k.endswith("__t"):
            feeds[k] = np.array(1.0, np.float32)
    np.testing.assert_allclose(pm.run({"x": x}, feeds)[0], qg.run({"x": x})[0], atol=1e-6)


def test_lapq_never_worse_than_lp_init_and_writes_annotations():
    data = _data()
    qg = _w4a4(data)
    r = lapq(qg, data, p_grid=(2.0, 3.0, 4.0), maxiter=1, maxfev=60)
    assert r.loss == "ce"
    assert r.final_loss_qdq <= r.init_loss_qdq + 1e-12
    assert r.final_loss <= r.init_loss + 1e-12
    assert min(r.history) <= r.init_loss
    # the annotations now hold the result: the exported QDQ model gives the reported loss
    x = np.concatenate([b["x"] for b in data])
    y = np.concatenate([b["label"] for b in data])
    assert cross_entropy(qg.run({"x": x}), y, None) == pytest.approx(r.final_loss_qdq, rel=1e-6)
    anns = {v.name: a for v, a in qg.graph.annotated()}
    for name, (lo, hi) in r.clip.items():
        assert anns[name].method in ("lapq", f"lp:{r.p:.3g}")
        assert np.allclose(anns[name].rmax, hi)
    assert r.evals == len(r.history)
    assert set(r.edges) == set(r.clip) == set(r.multipliers)
    # weights and activations were both optimised, tied edges follow their source
    kinds = {anns[n].kind for n in r.edges}
    assert kinds == {"weight", "activation"}
    for v, a in qg.graph.annotated():
        if a.tied_to:
            assert a.scale == anns[a.tied_to].scale


def test_lapq_improves_on_the_init_on_this_model():
    """Powell finds a lower calibration loss than the Lp init (the paper's point), with a small budget."""
    data = _data()
    qg = _w4a4(data)
    r = lapq(qg, data, maxiter=1, maxfev=80)
    assert r.final_loss_qdq < r.init_loss_qdq


def test_p_search_picks_from_the_grid():
    data = _data()
    grid = (2.0, 3.0, 4.0)
    r = lapq(_w4a4(data), data, p_grid=grid, refine_p=False, maxiter=1, maxfev=5)
    assert r.p in grid and r.p_grid_best == r.p
    assert set(r.p_grid) == set(grid)
    assert r.p_grid[r.p] == min(r.p_grid.values())
    assert r.init_loss == pytest.approx(r.p_grid[r.p])
    r2 = lapq(_w4a4(data), data, p_grid=(2.0, 2.5, 3.0, 3.5, 4.0), refine_p=True, maxiter=1, maxfev=5)
    assert r2.p_grid_best in r2.p_grid
    assert r2.init_loss <= min(r2.p_grid.values()) + 1e-12  # a refined p is only kept when it is better
    if r2.p not in r2.p_grid:
        assert r2.p_refined == r2.p and 2.0 < r2.p < 4.0


@pytest.mark.parametrize("bc", [False, "round", "bias"])
def test_lapq_deterministic_and_engines_agree(bc):
    """The parametric model and re-exporting agree (bias_correction=True is exact only in the parametric
    model: its exported form is the bias fold, which "bias" searches with)."""
    data = _data()
    grid = (2.0, 3.0, 4.0)
    a = lapq(_w4a4(data), data, p_grid=grid, maxiter=1, maxfev=12, bias_correction=bc)
    b = lapq(_w4a4(data), data, p_grid=grid, maxiter=1, maxfev=12, bias_correction=bc)
    assert a.history == b.history and a.clip == b.clip and a.p == b.p
    c = lapq(_w4a4(data), data, p_grid=grid, maxiter=1, maxfev=12, engine="rebuild", bias_correction=bc)
    np.testing.assert_allclose(c.history, a.history, rtol=1e-5)
    assert c.p == a.p


def test_lapq_kl_without_labels_and_include():
    data = _data(labels=False)
    qg = _w4a4(data, per_channel=True)
    w_before = {v.name: (a.rmin.copy(), a.rmax.copy()) for v, a in qg.graph.annotated() if a.kind == "weight"}
    r = lapq(qg, data, include=("activation",), p_grid=(2.0, 3.0, 4.0), maxiter=1, maxfev=30)
    assert r.loss == "kl" and r.fp32_loss == pytest.approx(0.0, abs=1e-9)
    assert all(a.kind == "activation" for v, a in qg.graph.annotated() if v.name in r.edges)
    for v, a in qg.graph.annotated():  # weights untouched
        if a.kind == "weight":
            np.testing.assert_array_equal(a.rmax, w_before[v.name][1])
    assert r.final_loss_qdq <= r.init_loss_qdq
    # per-channel weights: one multiplier per tensor on the per-channel ranges
    qg2 = _w4a4(data, per_channel=True)
    r2 = lapq(qg2, data, include=("weight",), p_grid=(2.0, 3.0, 4.0), maxiter=1, maxfev=20)
    anns2 = {v.name: a for v, a in qg2.graph.annotated()}
    for n in r2.edges:
        lo, hi = r2.clip[n]
        assert anns2[n].per_axis and isinstance(hi, list) and len(hi) == len(anns2[n].scale) > 1


def test_lapq_errors():
    data = _data(labels=False)
    qg = _w4a4(data)
    with pytest.raises(HagoError, match="include"):
        lapq(qg, data, include=("bias",))
    with pytest.raises(CalibrationError, match="label"):
        lapq(qg, data, loss="ce")
    with pytest.raises(HagoError, match="engine"):
        lapq(qg, data, engine="torch")
    with pytest.raises(HagoError, match="loss="):
        make_loss("hinge", True)
    with pytest.raises(CalibrationError, match="empty"):
        lapq(qg, [])


def test_bias_correction_exact_matches_the_reference_formula():
    """bias_correction="exact": each fake-quantized weight minus the per-output-channel shift of its mean
    (the reference code's ParameterModuleWrapperPost.bias_corr), so its channel means equal the float ones."""
    from onnx import helper

    from hago.algorithms.lapq import weight_mean_shift
    from hago.ir.annotation import fake_quantize

    data = _data()
    qg = _w4a4(data)
    pm = ParamModel(qg.graph, bias_correction="exact")
    assert pm.weight_shift
    m = pm.model
    for n in pm.weight_shift:
        m.graph.output.append(helper.make_empty_tensor_value_info(n + "__pq"))
    sess = rt.session(m)
    names = [o.name for o in sess.get_outputs()]
    feeds = {"x": data[0]["x"]} | pm.params_from_annotations()
    out = dict(zip(names, sess.run(None, feeds)))
    for v, a in qg.graph.annotated():
        if v.name not in pm.weight_shift:
            continue
        w = qg.graph.const(v)
        oc = pm.weight_shift[v.name][1]
        wq = fake_quantize(w, a)
        shift = weight_mean_shift(w, wq, oc)
        shape = [1] * w.ndim
        shape[oc] = -1
        np.testing.assert_allclose(out[v.name + "__pq"], wq - shift.reshape(shape), atol=1e-6)
        axes = tuple(i for i in range(w.ndim) if i != oc)
        np.testing.assert_allclose(out[v.name + "__pq"].mean(axis=axes), w.mean(axis=axes), atol=1e-6)


def _check_fold_restores_and_matches(qg, r, x, y, originals: dict, rel: float, *, bias_correction: str,
                                     input_sums_of=None):
    """The folded correction of a LAPQ result: restore() puts back the ``originals`` (name -> constant); the
    search's simulation (ParamModel with ``bias_correction``) of the restored graph and the QDQ model with the fold
    re-applied both give the result's final QDQ loss."""
    from hago.algorithms.lapq import LossEvaluator

    g = qg.graph
    qg.lapq_fold.restore(g)
    for n, c in originals.items():
        np.testing.assert_array_equal(g.const(g.value(n)), c)
    kw = {"input_sums": input_sums_of(g, x)} if input_sums_of is not None else {}
    pm = ParamModel(g, bias_correction=bias_correction, **kw)
    sim = LossEvaluator(pm, x, y, cross_entropy, None)(pm.params_from_annotations())
    qg.lapq_fold.apply(g)
    qg.invalidate()
    assert cross_entropy(qg.run(x), y, None) == pytest.approx(r.final_loss_qdq, rel=1e-6)
    assert sim == pytest.approx(r.final_loss_qdq, rel=rel)


def test_bias_correction_bias_fold_written_and_restored():
    """bias_correction="bias": the correction folded into the biases, b0 - shift * E[window sum], in the search
    and the export (they agree); restore() puts the original biases back."""
    from hago.algorithms.lapq import input_window_sums, stack_batches

    data = _data()
    qg = _w4a4(data)
    g = qg.graph
    b0 = {n.inputs[2].name: g.const(n.inputs[2]).copy() for n in g.nodes() if n.op_type in ("Conv", "Gemm")}
    r = lapq(qg, data, p_grid=(2.0, 3.0), refine_p=False, maxiter=1, maxfev=10, bias_correction="bias")
    assert r.bias_correction == "bias" and r.folded
    assert [b for b in b0 if not np.array_equal(g.const(g.value(b)), b0[b])]
    x, y = stack_batches(data, ["x"])
    _check_fold_restores_and_matches(qg, r, x, y, b0, 1e-4, bias_correction="bias",
                                     input_sums_of=input_window_sums)


def test_mean_preserving_codes():
    from hago.algorithms.lapq import mean_preserving_codes
    from hago.ir.annotation import EdgeAnnotation, quantize_array

    rs = np.random.RandomState(3)
    w = (rs.randn(6, 4, 3, 3) * 0.2 + rs.randn(6, 1, 1, 1) * 0.05).astype(np.float32)
    ann = EdgeAnnotation(kind="weight", dtype="int8", bits=4, symmetric=True)
    ann.set_range(-0.25, 0.25)  # clips: large mean shifts to undo
    q0 = quantize_array(w, ann)
    q = mean_preserving_codes(w, ann, 0)
    assert q.dtype == np.int64 and q.min() >= ann.qmin and q.max() <= ann.qmax
    assert np.all(np.abs(q - q0) <= 1)
    s = float(ann.scale)
    target = (w / s).reshape(6, -1).sum(1)
    got, before = q.reshape(6, -1).sum(1), q0.reshape(6, -1).sum(1)
    room_up = (q.reshape(6, -1) < ann.qmax).any(1)
    room_dn = (q.reshape(6, -1) > ann.qmin).any(1)
    for c in range(6):  # as close as one code step allows, unless every code is at a bound
        if (target[c] > got[c] and room_up[c]) or (target[c] < got[c] and room_dn[c]):
            assert abs(target[c] - got[c]) <= 0.5 + 1e-6
        assert abs(target[c] - got[c]) <= abs(target[c] - before[c]) + 1e-6
        # the fewest moves: exactly |rint(target - before)| codes changed (when there was room)
        assert np.sum(q[c] != q0[c]) <= abs(np.rint(target[c] - before[c]))


@pytest.mark.parametrize("bc", [True, "exact"])
def test_bias_correction_written_on_grid(bc):
    """Default (True = "round") and "exact" (the search simulates the reference's off-grid correction:
    result.final_loss, result.simulate): the written weights are on their grid with the channel means kept
    (mean_preserving_codes), equal to what bias_correction="round" simulates; restore() puts the float weights
    back."""
    from hago.algorithms.lapq import stack_batches
    from hago.ir.annotation import quantize_array

    data = _data()
    qg = _w4a4(data)
    g = qg.graph
    w0 = {v.name: g.const(v).copy() for v, a in g.annotated() if a.kind == "weight"}
    r = lapq(qg, data, p_grid=(2.0, 3.0), refine_p=False, maxiter=1, maxfev=10, bias_correction=bc)
    assert r.bias_correction == ("round" if bc is True else "exact") and set(r.folded) == set(w0)
    x, y = stack_batches(data, ["x"])
    if not r.reverted:
        assert cross_entropy(r.simulate(x), y, None) == pytest.approx(r.final_loss, rel=1e-6)
    for v, a in g.annotated():
        if a.kind == "weight":
            w = g.const(v)
            assert not np.array_equal(w, w0[v.name])
            np.testing.assert_allclose(w, (quantize_array(w, a) - a.zero_point) * a.scale, atol=1e-7)
    _check_fold_restores_and_matches(qg, r, x, y, w0, 1e-5, bias_correction="round")


def test_input_window_sums_brute_force():
    from hago.algorithms.lapq import input_window_sums

    data = _data(n=16)
    g = conv_bn_net()
    g = hago.load(g) if not isinstance(g, hago.Graph) else g
    x = np.concatenate([b["x"] for b in data])
    sums = input_window_sums(g, {"x": x})
    conv = next(n for n in g.nodes() if n.op_type == "Conv")
    assert conv.inputs[0].name == "x"
    w = g.const(conv.inputs[1])
    # brute force: conv of x with an all-ones kernel of the same attributes, averaged
    import torch

    attrs = {k: a.value for k, a in conv.attributes.items()}
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.from_numpy(x), (pads[1], pads[3], pads[0], pads[2])),
                                   torch.ones(w.shape), stride=tuple(attrs.get("strides", (1, 1))),
                                   groups=int(attrs.get("group", 1))).numpy()
    np.testing.assert_allclose(sums[conv.inputs[1].name], y.mean(axis=(0, 2, 3)), rtol=1e-5)


def test_powell_edges_restricts_step_two():
    data = _data()
    r = lapq(_w4a4(data), data, p_grid=(2.0, 3.0), refine_p=False, maxiter=1, maxfev=12, powell_edges=2)
    assert len(r.powell_edges) == 2 and set(r.multipliers) == set(r.edges)
    assert all(m == 1.0 for n, m in r.multipliers.items() if n not in r.powell_edges)
    assert r.final_loss_qdq <= r.init_loss_qdq + 1e-12
    one = [n for n in r.edges if n not in r.powell_edges][:1]
    r2 = lapq(_w4a4(data), data, p_grid=(2.0, 3.0), refine_p=False, maxiter=1, maxfev=6, powell_edges=one)
    assert r2.powell_edges == one
    with pytest.raises(HagoError, match="powell_edges"):
        lapq(_w4a4(data), data, p_grid=(2.0,), maxfev=2, powell_edges=["nope"])


def test_relu_folded_edges_stay_non_negative():
    """An Add whose only consumer is a Relu (tied) is quantized on [0, max] by hago.quantize; LAPQ's
    candidates keep that (zero point 0), with the Lp search on the non-negative part."""
    from hago.algorithms.lapq import relu_folded

    data = _data()
    qg = _w4a4(data)
    folded = relu_folded(qg.graph)
    assert folded
    r = lapq(qg, data, p_grid=(2.0, 3.0), refine_p=False, maxiter=1, maxfev=8)
    for n in folded & set(r.edges):
        a = qg.graph.annotation(qg.graph.value(n))
        assert a.rmin == 0.0 and int(a.zero_point) == 0 and a.rmax > 0
        assert r.init_clip[n][0] == 0.0
