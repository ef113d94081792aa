"""Calibration internals: one-pass streaming histograms, the vectorized KL search, auto's shared scoring session."""
import numpy as np
import pytest

import hago
from hago.calibrate import calibrate, collect_stats, activation_edges
from hago.calibrate import auto as auto_mod
from hago.calibrate.observers import EdgeObserver, kl_range, kl_search
from hago.ir.annotation import EdgeAnnotation
from hago.ir.qdq import to_qdq
from hago.passes.annotate import AnnotateOptions, annotate
from hago.passes.partition import partition
from hago.runtime import ort as rt

from builders import calib, conv_bn_net


def _kl_search_loop(h, nq, step):
    """The per-candidate loop kl_search replaces (TensorRT's entropy calibration, zero bin already removed)."""
    bins = len(h)
    best_kl, best_i = np.inf, bins
    for i in range(nq, bins + 1, step):
        src = h[:i]
        p = src.astype(np.float64).copy()
        p[-1] += h[i:].sum()
        starts = np.linspace(0, i, nq + 1).astype(np.int64)[:-1]
        nz = (src > 0).astype(np.float64)
        sums = np.add.reduceat(src, starts)
        counts = np.add.reduceat(nz, starts)
        lengths = np.diff(np.append(starts, i))
        q = np.repeat(np.where(counts > 0, sums / np.maximum(counts, 1), 0.0), lengths) * nz
        ps, qs = p.sum(), q.sum()
        if qs <= 0:
            continue
        pn, qn = p / ps, q / qs
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def test_kl_search_matches_the_loop():
    rs = np.random.RandomState(0)
    for trial in range(60):
        bins = int(rs.choice([256, 1000, 2048]))
        nq = min(int(rs.choice([64, 128, 256])), bins)
        x = [np.abs(rs.randn(20000)) * 3, rs.exponential(1, 5000), np.abs(rs.standard_t(3, 3000)),
             rs.rand(300) ** 4][trial % 4]
        h = np.histogram(x, bins=bins, range=(0, x.max()))[0].astype(np.float64)
        if trial % 5 == 0:
            h[rs.rand(bins) < 0.5] = 0  # sparse histograms: empty merged bins
        h[0] = 0
        step = max(8, (bins - nq) // 128)
        assert kl_search(h, nq, step) == _kl_search_loop(h, nq, step), trial


def test_kl_range_signed_and_unsigned():
    rs = np.random.RandomState(1)
    x = rs.randn(50000)
    x[:5] = 30.0
    h, e = np.histogram(x, bins=2048, range=(x.min(), x.max()))
    lo, hi = kl_range(h.astype(np.float64), e, EdgeAnnotation(dtype="int8", symmetric=True))
    assert lo < 0 < hi < 10  # the outliers are clipped, both ends by the same ratio
    assert lo / x.min() == pytest.approx(hi / x.max())
    r = np.maximum(x, 0)
    h, e = np.histogram(r, bins=2048, range=(0, r.max()))
    lo, hi = kl_range(h.astype(np.float64), e, EdgeAnnotation())
    assert lo == 0 and 2 < hi < 10


def _two_pass(batches, bins=2048):
    o = EdgeObserver("e", bins)
    for b in batches:
        o.update(b)
    o.start_histogram()
    for b in batches:
        o.update_histogram(b)
    return o


def test_streaming_histogram_grows_exactly():
    rs = np.random.RandomState(2)
    # later batches widen the range on both sides: the histogram grows by merging whole bins
    batches = [rs.randn(4000).astype(np.float32) * s + m for s, m in ((0.5, 0.0), (1.0, 1.0), (3.0, -2.0), (1.0, 0.0))]
    o = EdgeObserver("e", 2048, histogram=True)
    for b in batches:
        o.update(b)
    ref = _two_pass(batches)
    assert o.hist.sum() == pytest.approx(sum(b.size for b in batches))
    assert o.edges[0] == pytest.approx(ref.edges[0]) and o.edges[-1] == pytest.approx(ref.edges[-1])
    span = ref.edges[-1] - ref.edges[0]
    # a value lands at most one bin away from its two-pass bin (the streaming bins are FINE times finer and the
    # histogram at most twice the final range): counts below each edge differ by at most the two bins around it
    cdf, rcdf = np.cumsum(o.hist), np.cumsum(ref.hist)
    near = ref.hist + np.append(ref.hist[1:], 0)
    assert np.all(np.abs(cdf - rcdf) <= near + 1e-9)
    assert np.abs(cdf - rcdf).max() > 0  # (the histograms do differ: this is not the two-pass one)
    for m in ("percentile:99.99", "percentile:99", "mse", "lp:3"):
        ann = EdgeAnnotation(dtype="int8", symmetric=True)
        a, b = o.range(m, ann), ref.range(m, ann)
        assert abs(a[0] - b[0]) < 0.02 * span and abs(a[1] - b[1]) < 0.02 * span, m
    # thresholds never leave the observed range
    lo, hi = o.range("percentile:100", EdgeAnnotation())
    assert lo >= min(b.min() for b in batches) and hi <= max(b.max() for b in batches)


def test_streaming_histogram_zero_batches_and_relu_spike():
    o = EdgeObserver("e", 256, histogram=True)
    o.update(np.zeros(100, np.float32))  # no scale yet: counted as zeros
    rs = np.random.RandomState(3)
    x = np.maximum(rs.randn(1000), 0).astype(np.float32)
    o.update(x)
    o.update(x * 4)  # grows
    assert o.hist.sum() == 2100
    w = o.edges[1] - o.edges[0]
    allx = np.concatenate([x, x * 4])
    assert 100 + int((allx == 0).sum()) <= o.hist[0] <= 100 + int((allx < 2 * w).sum())  # the zeros are in bin 0
    z = EdgeObserver("z", 256, histogram=True)
    z.update(np.zeros(10, np.float32))
    assert z.hist.sum() == 10 and z.range("percentile", EdgeAnnotation()) == (0.0, 0.0)


def _count_runs(monkeypatch):
    calls = []
    real = rt.run

    def counting(sess, feeds, outputs=None, index=0):
        calls.append(len(sess.get_outputs()))
        return real(sess, feeds, outputs, index)

    monkeypatch.setattr(rt, "run", counting)
    return calls


def _prepared(model, spec="x86_avx2"):
    g = hago.load(model)
    spec = hago.load_spec(spec)
    partition(g, spec)
    annotate(g, spec, AnnotateOptions())
    return g


@pytest.mark.parametrize("method,passes", [("minmax", 1), ("percentile:99.9", 1), ("mse", 1), ("lp:3", 1), ("kl", 1)])
def test_one_run_per_batch(monkeypatch, method, passes):
    g = _prepared(conv_bn_net())
    data = calib([2, 3, 16, 16], n=5)
    calls = _count_runs(monkeypatch)
    calibrate(g, data, method=method)
    assert len(calls) == passes * len(data)


def test_kl_second_pass_reads_kept_activations_or_reruns_beyond_the_budget(monkeypatch):
    """kl's exact histogram needs a second pass on the final range: from the first pass's activations while they fit
    in the memory budget, else by running the model again; the ranges are the same either way."""
    import hago.calibrate as cal

    data = calib([2, 3, 16, 16], n=5)
    g1, g2 = _prepared(conv_bn_net()), _prepared(conv_bn_net())
    calls = _count_runs(monkeypatch)
    calibrate(g1, data, method="kl")
    assert len(calls) == len(data)
    monkeypatch.setattr(cal, "SECOND_PASS_CACHE_BYTES", 0)
    calls.clear()
    calibrate(g2, data, method="kl")
    assert len(calls) == 2 * len(data)
    r1 = {v.name: (a.rmin, a.rmax) for v, a in g1.annotated() if a.kind == "activation"}
    r2 = {v.name: (a.rmin, a.rmax) for v, a in g2.annotated() if a.kind == "activation"}
    assert r1 == r2 and r1


def test_auto_one_float_pass_and_raced_scoring(monkeypatch):
    data = calib([4, 3, 16, 16], n=6)
    calls = _count_runs(monkeypatch)
    qg = hago.quantize(conv_bn_net(), "x86_avx2", data, method="auto")
    rep = qg.calibration
    # statistics and fp32 references come from the same float runs; then one run per scored (candidate, batch)
    assert len(calls) == len(data) + sum(rep["scored_batches"][m] for m in dict.fromkeys(
        m for m in rep["candidates"]))  # (no two candidates share parameters on this net)
    best, ref = rep["method"], rep["reference"]
    full = max(rep["scored_batches"].values())
    assert rep["scored_batches"][best] == rep["scored_batches"][ref] == full
    # the reference, unless a candidate scored to the end is significantly better; then the best of those
    better = {m: s for m, s in rep["candidates"].items()
              if rep["scored_batches"][m] == full and rep["z"].get(m, 0) > auto_mod.Z_SWITCH}
    assert best == ref if not better else rep["candidates"][best] == min(better.values())

    # the sample budget: at most SCORE_SAMPLES samples are scored (whole batches, at least one)
    calls.clear()
    g = _prepared(conv_bn_net())
    rep = auto_mod.calibrate_auto(g, data, race_ratio=np.inf, score_samples=8)
    assert set(rep["scored_batches"].values()) == {2}
    assert len(calls) == len(data) + 2 * len(auto_mod.AUTO_METHODS)
    # the race: with ratio 1 only the leader and the reference survive the warm-up (min(16, n/4) = 6 samples:
    # 2 batches)
    calls.clear()
    g = _prepared(conv_bn_net())
    rep = auto_mod.calibrate_auto(g, data, race_ratio=1.0)
    scored = rep["scored_batches"]
    on = {m for m, k in scored.items() if k > 2}
    assert rep["reference"] in on and len(on) <= 2 and min(scored.values()) == 2
    assert scored[rep["reference"]] == max(scored.values()) and rep["method"] in on
    assert len(calls) == len(data) + sum(scored.values())


@pytest.mark.parametrize("spec,bits", [("x86_avx2", None), ("x86_avx2", 6), ("hago_accelerator_int16", None)])
def test_auto_scoring_session_equals_each_candidate_model(spec, bits):
    """quant_params mirrors to_qdq's activation/bias initializers, so one session with them as inputs runs each
    candidate exactly as its own QDQ model would."""
    from hago.calibrate import apply_ranges

    g = hago.load(conv_bn_net())
    sp = hago.load_spec(spec)
    partition(g, sp)
    annotate(g, sp, AnnotateOptions(activation_bits=bits))
    data = calib([3, 3, 16, 16], n=3)
    names = [v.name for v, _ in activation_edges(g)]
    obs = collect_stats(g, data, names, histogram=True)
    methods = ["minmax", "percentile:99", "mse"]
    base, params = auto_mod._candidate_models(g, obs, methods)
    exact, feeds = auto_mod.scoring_session(base, params, optimize="basic")
    fast, _ = auto_mod.scoring_session(base, params)
    assert feeds[0], "the candidates' parameters differ"
    x = calib([3, 3, 16, 16], n=1, seed=7)[0]
    for m, f in zip(methods, feeds):
        apply_ranges(g, obs, method=m)
        ref = rt.session(to_qdq(g), optimize="basic").run(None, x)[0]
        np.testing.assert_array_equal(exact.run(None, {**x, **f})[0], ref)
        # onnxruntime's float fusions round differently by ulps, which can move a value to the next code
        out = fast.run(None, {**x, **f})[0]
        assert np.abs(out - ref).max() < 0.02 * np.abs(ref).max()


def test_auto_result_equals_the_chosen_method():
    data = calib([4, 3, 16, 16], n=4)
    qg = hago.quantize(conv_bn_net(), "x86_avx2", data, method="auto")
    if qg.calibration["method"] == "kl":  # standalone kl reads a two-pass histogram
        pytest.skip("auto chose kl")
    ref = hago.quantize(conv_bn_net(), "x86_avx2", data, method=qg.calibration["method"])
    a = {v.name: x for v, x in qg.graph.annotated()}
    b = {v.name: x for v, x in ref.graph.annotated()}
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k].scale), np.asarray(b[k].scale), rtol=1e-6)
    assert any(h.startswith("calibrate auto:") for h in qg.graph.history)
    # the summary says why: the reference kept, or how much closer the pick was
    ref = qg.calibration["reference"]
    assert (f"no candidate significantly closer to fp32 than {ref}" in qg.summary() if qg.calibration["method"] == ref
            else f"standard errors closer to fp32 than {ref}" in qg.summary())


def test_constant_operand_annotated_as_activation_gets_its_own_range():
    """MatMul -> Add(constant bias) -> Relu: the constant operand of the integer Add is an activation edge with no
    calibration statistics (PP-OCRv4's linear_*.b_0); its range comes from its values, not a KeyError."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import hago
    from hago.search.evaluate import Evaluator
    from hago.search.space import Config

    rs = np.random.RandomState(0)
    inits = [numpy_helper.from_array(rs.randn(16, 8).astype(np.float32), "W"),
             numpy_helper.from_array(rs.randn(8).astype(np.float32), "B"),
             numpy_helper.from_array(rs.randn(8, 4).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    ev = Evaluator(hago.load(m), hago.load_spec("x86_avx2"), [{"x": rs.randn(2, 5, 16).astype(np.float32)}], None)
    qg = ev.build(Config())
    ann = {v.name: a for v, a in qg.graph.annotated()}
    assert ann["B"].kind == "activation"
    b = numpy_helper.to_array(inits[1])
    assert ann["B"].scale > 0 and float(ann["B"].scale) * 255 >= (b.max() - min(b.min(), 0)) * 0.99
    assert ev.accuracy(qg) > 0.5


def test_auto_error_counts_changed_decisions_of_a_distribution_output():
    """For softmax scores (a distribution over the last axis) auto's error is the fraction of rows whose argmax
    changed, the squared error only breaking ties; other outputs (logits, embeddings) keep the squared error."""
    rs = np.random.RandomState(0)
    logits = rs.randn(4, 40, 30).astype(np.float32) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert auto_mod.is_distribution(p) and not auto_mod.is_distribution(logits)
    assert not auto_mod.is_distribution(np.abs(logits)) and not auto_mod.is_distribution(p[..., :1])
    # a: small noise everywhere that flips one decision; b: a larger error that keeps every argmax
    top = p.argmax(-1)
    second = np.argsort(p, -1)[..., -2]
    a = p.copy()
    a[0, 0, second[0, 0]] = a[0, 0, top[0, 0]] + 1e-3
    b = p * (1 + 0.05 * rs.rand(*p.shape).astype(np.float32))
    b[np.arange(4)[:, None], np.arange(40)[None, :], top] *= 1.2  # the winner only grows
    assert (b.argmax(-1) == top).all() and (a.argmax(-1) != top).sum() == 1
    sq = lambda o: float(np.mean((p - o) ** 2) / np.var(p))  # noqa: E731
    assert sq(a) < sq(b)  # the squared error alone prefers a
    ea, eb = auto_mod.output_error([p], [a]), auto_mod.output_error([p], [b])
    assert eb < ea and ea == pytest.approx(1 / 160 + auto_mod.TIE_WEIGHT * sq(a), rel=1e-5)
    assert auto_mod.output_error([logits], [logits + 0.1]) == pytest.approx(0.01 / np.var(logits), rel=1e-4)


def test_auto_keeps_the_reference_unless_a_candidate_is_significantly_closer():
    """A candidate replaces the reference method only when its per-sample errors are lower by more than Z_SWITCH
    standard errors of the paired difference: a lower mean within the noise of a few samples keeps the reference."""
    rs = np.random.RandomState(0)
    ref = rs.rand(32)
    noisy = ref - 0.01 + 0.2 * rs.randn(32)  # lower on average, but by far less than its spread
    steady = ref - 0.01 + 0.001 * rs.randn(32)  # lower by the same amount on every sample
    worse = ref + 0.05
    assert noisy.mean() < ref.mean() and auto_mod.paired_z(ref, noisy) < auto_mod.Z_SWITCH
    assert auto_mod.paired_z(ref, steady) > 10
    assert auto_mod.choose({"r": ref, "n": noisy, "w": worse}, "r")[0] == "r"
    pick, z = auto_mod.choose({"r": ref, "n": noisy, "s": steady}, "r")
    assert pick == "s" and z["r"] == 0.0 and z["s"] > auto_mod.Z_SWITCH
    # of several significant candidates the lowest mean wins
    assert auto_mod.choose({"r": ref, "s": steady, "t": steady - 0.01}, "r")[0] == "t"
    # non-finite errors (NaN outputs) never win, and lose to any finite candidate when the reference has them
    assert auto_mod.choose({"r": ref, "x": np.full(32, np.nan)}, "r")[0] == "r"
    assert auto_mod.choose({"r": np.full(32, np.nan), "w": worse}, "r")[0] == "w"
    # one sample (no spread): any improvement counts
    assert auto_mod.choose({"r": ref[:1], "s": ref[:1] - 1e-3}, "r")[0] == "s"
    # the per-sample errors: a distribution output counts each sample's changed decisions
    p = np.full((2, 3, 4), 0.1, np.float32)
    p[..., 0] = 0.7
    q = p.copy()
    q[0, 1] = [0.1, 0.7, 0.1, 0.1]  # sample 0: one of its three rows changes its argmax
    e = auto_mod.sample_errors([p], [q])
    assert e.shape == (2,) and e[1] == 0 and e[0] == pytest.approx(1 / 3, abs=auto_mod.TIE_WEIGHT)
    assert auto_mod.output_error([p], [q]) == pytest.approx(e.mean())
    # the reference must be a candidate; without percentile:99.99 among them it is the first one
    from hago.errors import CalibrationError

    data = calib([4, 3, 16, 16], n=2)
    with pytest.raises(CalibrationError, match="reference method 'kl'"):
        auto_mod.calibrate_auto(_prepared(conv_bn_net()), data, methods=["minmax", "mse"], reference="kl")
    assert auto_mod.calibrate_auto(_prepared(conv_bn_net()), data, methods=["mse", "minmax"])["reference"] == "mse"
