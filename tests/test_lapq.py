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
    r = lapq(qg, data, maxiter=1, maxfev=60)
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


def test_lapq_deterministic_and_engines_agree():
    data = _data()
    a = lapq(_w4a4(data), data, maxiter=1, maxfev=25)
    b = lapq(_w4a4(data), data, maxiter=1, maxfev=25)
    assert a.history == b.history and a.clip == b.clip and a.p == b.p
    c = lapq(_w4a4(data), data, maxiter=1, maxfev=25, engine="rebuild")
    np.testing.assert_allclose(c.history, a.history, rtol=1e-6)
    assert c.p == a.p


def test_lapq_kl_without_labels_and_include():
    data = _data(labels=False)
    qg = _w4a4(data, per_channel=True)
    w_before = {v.name: (a.rmin.copy(), a.rmax.copy()) for v, a in qg.graph.annotated() if a.kind == "weight"}
    r = lapq(qg, data, include=("activation",), maxiter=1, maxfev=30)
    assert r.loss == "kl" and r.fp32_loss == pytest.approx(0.0, abs=1e-9)
    assert all(a.kind == "activation" for v, a in qg.graph.annotated() if v.name in r.edges)
    for v, a in qg.graph.annotated():  # weights untouched
        if a.kind == "weight":
            np.testing.assert_array_equal(a.rmax, w_before[v.name][1])
    assert r.final_loss_qdq <= r.init_loss_qdq
    # per-channel weights: one multiplier per tensor on the per-channel ranges
    qg2 = _w4a4(data, per_channel=True)
    r2 = lapq(qg2, data, include=("weight",), maxiter=1, maxfev=20)
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
