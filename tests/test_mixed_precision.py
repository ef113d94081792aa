"""Mixed precision with calibration loss <= fp32 (hago.algorithms.mixed_precision)."""
import dataclasses
import itertools

import numpy as np
import pytest

import hago
from hago.algorithms.lapq import cross_entropy
from hago.algorithms.mixed_precision import _knapsack, select_precision
from hago.errors import HagoError
from hago.runtime import ort as rt

from builders import conv_bn_net


def _data(n=96, seed=3, labels=True):
    rs = np.random.RandomState(seed)
    x = rs.randn(n, 3, 16, 16).astype(np.float32)
    ref = rt.session(conv_bn_net()).run(None, {"x": x})[0]
    y = ref.argmax(1)
    flip = rs.rand(n) < 0.3
    y[flip] = rs.randint(0, 10, flip.sum())
    out = []
    for i in range(0, n, 32):
        b = {"x": x[i:i + 32]}
        if labels:
            b["label"] = y[i:i + 32]
        out.append(b)
    return out


def _ce(qg, data):
    x = np.concatenate([b["x"] for b in data])
    y = np.concatenate([b["label"] for b in data])
    return cross_entropy(qg.run({"x": x}), y, None)


def test_knapsack_is_exact():
    rs = np.random.RandomState(0)
    for trial in range(30):
        n = rs.randint(1, 6)
        items = [[(float(rs.randint(1, 20)), float(rs.randn())) for _ in range(rs.randint(1, 4))] for _ in range(n)]
        budget = float(rs.randn())
        best = None
        for choice in itertools.product(*[range(len(it)) for it in items]):
            c = sum(items[i][k][0] for i, k in enumerate(choice))
            d = sum(items[i][k][1] for i, k in enumerate(choice))
            if d <= budget + 1e-12 and (best is None or c < best):
                best = c
        sol = _knapsack(items, budget)
        if best is None:
            assert sol is None
        else:
            assert sol is not None and sol[1] == pytest.approx(best) and sol[2] <= budget + 1e-9 and sol[3]


def test_selection_loss_not_above_fp32_and_apply_reproduces_it():
    data = _data()
    r = select_precision(conv_bn_net(), "x86_avx512_vnni", data, candidates=(4, 6, 8), per_channel=False)
    assert r.loss == "ce"
    assert r.feasible and r.quant_loss <= r.fp32_loss
    assert r.fp32_loss == pytest.approx(cross_entropy(rt.session(conv_bn_net()).run(
        None, {"x": np.concatenate([b["x"] for b in data])}), np.concatenate([b["label"] for b in data]), None), rel=1e-5)
    # bits are among the candidates (or float), per edge and per layer input
    assert set(r.unit_bits.values()) <= {4, 6, 8, "float"}
    assert all(b in (4, 6, 8, None) for b in r.bits.values())
    assert 4 <= r.avg_bits <= 32
    # the applied QuantizedGraph has exactly the measured loss
    qg = r.apply()
    assert _ce(qg, data) == pytest.approx(r.quant_loss, rel=1e-6)
    anns = {v.name: a for v, a in qg.graph.annotated()}
    for e, b in r.bits.items():
        if b is None:
            assert e not in anns
        else:
            assert anns[e].bits == b
    # lowering precision somewhere must have been possible without float everywhere
    assert any(b != "float" for b in r.unit_bits.values())
    assert r.report().startswith("mixed precision")


def test_not_achievable_is_reported_honestly():
    """KL(fp32 || quantized) >= 0 = fp32 loss: no quantized layout meets it; without float the method says so."""
    data = _data(labels=False)
    r = select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, allow_float=False, loss="kl")
    assert r.loss == "kl" and r.fp32_loss == pytest.approx(0.0, abs=1e-9)
    assert not r.feasible and r.quant_loss > r.fp32_loss
    assert all(b == 8 for b in r.unit_bits.values())  # fell back to all max bits
    assert r.fallback == "raised"
    # with float allowed, the fallback reaches the float model (the paper's escape), flagged
    r2 = select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, allow_float=True, loss="kl")
    assert r2.feasible and r2.fallback == "float" and r2.quant_loss <= r2.fp32_loss + 1e-12
    assert set(r2.unit_bits.values()) == {"float"} and r2.float_nodes


@pytest.mark.parametrize("method", ["first_order", "input_error", "hessian"])
def test_other_methods_meet_the_constraint(method):
    data = _data()
    r = select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, method=method)
    assert r.method == method
    assert r.feasible and r.quant_loss <= r.fp32_loss
    assert r.apply() is not None
    if method == "hessian":
        assert any(s.get("hessian", 0.0) != 0.0 for d in r.sensitivities.values() for s in d.values())


def test_sensitivity_terms_are_consistent():
    """delta = g.e + e'He/2 equals the measured single-layer change L(+1) - L(0)."""
    data = _data()
    r = select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False)
    for u, d in r.sensitivities.items():
        for k, s in d.items():
            assert s["delta"] == pytest.approx(s["first"] + s["second"] / 2)
            if k != "float":
                assert s["input_error"] > 0
        if 4 in d and 8 in d:
            assert d[4]["input_error"] > d[8]["input_error"]  # 4-bit noise is larger


def test_deterministic_under_seed_and_quantized_graph_input():
    data = _data()
    a = select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, max_samples=64, seed=1)
    b = select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, max_samples=64, seed=1)
    assert a.unit_bits == b.unit_bits and a.quant_loss == b.quant_loss and a.history == b.history
    qg = hago.quantize(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, method="mse", weight_method="mse")
    c = select_precision(qg, None, data, per_channel=False)
    assert c.feasible
    assert all(a.bits == 8 for _, a in qg.graph.annotated() if a.kind != "bias")  # the input is not modified


def test_unlabeled_default_is_pseudo_label_ce():
    data = _data(labels=False)
    r = select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, method="input_error")
    assert r.loss == "pseudo_ce" and r.fp32_loss > 0
    assert r.feasible and r.quant_loss <= r.fp32_loss


def test_refinement_never_costs_more_bits_and_reuse_skips_measuring():
    data = _data()
    paper = select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, refine=False)
    refined = select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, reuse=paper)
    assert paper.feasible and refined.feasible
    assert refined.avg_bits <= paper.avg_bits + 1e-9
    assert refined.sensitivities == paper.sensitivities
    assert refined.evals < paper.evals  # the sensitivities were reused, not measured again
    with pytest.raises(HagoError, match="hessian"):
        select_precision(conv_bn_net(), "x86_avx512_vnni", data, per_channel=False, method="hessian", reuse=paper)


def test_spec_limits_clamp_the_candidates():
    """x86_avx2 limits weights to 7 bits: an 8-bit layer gets 7-bit weights."""
    data = _data()
    r = select_precision(conv_bn_net(), "x86_avx2", data, per_channel=False, method="input_error")
    qg = r.apply()
    for v, a in qg.graph.annotated():
        if a.kind == "weight":
            assert a.bits <= 7 and r.bits[v.name] == a.bits
    assert r.feasible


def test_errors():
    data = _data()
    with pytest.raises(HagoError, match="method"):
        select_precision(conv_bn_net(), "x86_avx512_vnni", data, method="hawq")
    with pytest.raises(HagoError, match="candidates"):
        select_precision(conv_bn_net(), "x86_avx512_vnni", data, candidates=(1, 8))
    with pytest.raises(HagoError, match="spec"):
        select_precision(conv_bn_net(), None, data)


def test_search_strategy_proposes_the_selection():
    from hago.algorithms.mixed_precision import search_strategy
    from hago.search.space import build_space

    data = _data(labels=False)
    g = hago.load(conv_bn_net())
    spec = hago.load_spec("x86_avx512_vnni")

    class Ev:
        calib = [{"x": b["x"]} for b in data]
        per_channel = False
        observers = None

    class FakeDriver:
        def __init__(self):
            self.graph, self.spec, self.ev, self.default_method = g, spec, Ev(), "mse"
            self.space = build_space(g, spec)
            self.trials = []

        def remaining(self):
            return 3 - len(self.trials)

        def trial(self, cfg, strategy):
            self.trials.append((cfg, strategy))

    d = FakeDriver()
    search_strategy(d, methods=("input_error",))
    assert len(d.trials) == 1
    cfg, name = d.trials[0]
    assert name == "mixed_precision:input_error"
    assert set(dict(cfg.bits)) <= set(d.space.edge_index)
    assert all(b in (4, 6) for b in dict(cfg.bits).values())  # only deviations from the maximum (8) are kept
    assert set(cfg.float_nodes) <= set(d.space.nodes)


def test_search_strategy_measures_sensitivities_once(monkeypatch):
    """Two methods in the strategy: the second reuses the first's per-layer sensitivities (no new sensitivity
    evaluations) and proposes its own layout."""
    from hago.algorithms import mixed_precision as mp
    from hago.search.space import build_space

    data = _data(labels=False)
    g = hago.load(conv_bn_net())
    spec = hago.load_spec("x86_avx512_vnni")
    results = []

    def recording(*args, **kwargs):
        results.append(select_precision(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(mp, "select_precision", recording)

    class Ev:
        calib = [{"x": b["x"]} for b in data]
        per_channel = False
        observers = None

    class FakeDriver:
        def __init__(self):
            self.graph, self.spec, self.ev, self.default_method = g, spec, Ev(), "mse"
            self.space = build_space(g, spec)
            self.trials = []

        def remaining(self):
            return 3 - len(self.trials)

        def trial(self, cfg, strategy):
            self.trials.append((cfg, strategy))

    d = FakeDriver()
    mp.search_strategy(d, methods=("second_order", "input_error"))
    assert [name for _, name in d.trials] == ["mixed_precision:second_order", "mixed_precision:input_error"]
    assert results[0].sensitivity_evals > 0
    assert results[1].sensitivity_evals == 0
    assert results[1].sensitivities == results[0].sensitivities


def test_weighted_units_carry_every_quantized_edge_once():
    """units="weighted": only Conv/Gemm/MatMul inputs are units; the edges after a layer (the residual Add's
    inputs, the pool's input) ride with it, none is lost or counted twice, and a float layer takes them along."""
    data = _data()
    r_all = select_precision(conv_bn_net(), "x86_avx512_vnni", data, candidates=(4, 8), per_channel=False)
    r = select_precision(conv_bn_net(), "x86_avx512_vnni", data, candidates=(4, 8), per_channel=False,
                         units="weighted")
    units = r._base[4]
    assert len(units) < len(r_all.unit_bits)
    assert all(u.weights for u in units.values())
    # two evaluations (t = +1, -1) per quantized option, then the layout search
    n_opts = sum(1 for u in units.values() for o in u.options if o.key != "float")
    assert r.sensitivity_evals == 2 * n_opts < r.evals
    edges = [e for u in units.values() for e in u.edges]
    assert len(edges) == len(set(edges))
    assert set(edges) == {e for u in r_all._base[4].values() for e in u.edges}
    # every merged edge carries its unit's choice
    for u in units.values():
        b = r.unit_bits[u.name]
        assert {r.bits[e] for e in u.edges} == {None if b == "float" else b}
    assert r.feasible and _ce(r.apply(), data) == pytest.approx(r.quant_loss, rel=1e-6)
    # a float layer un-annotates the edges it carries
    from hago.algorithms.mixed_precision import FLOAT
    name = max(units, key=lambda n: len(units[n].edges))
    assert len(units[name].edges) > 1
    forced = dataclasses.replace(r, unit_bits=dict(r.unit_bits) | {name: FLOAT},
                                 bits=dict(r.bits) | {e: None for e in units[name].edges + units[name].weights},
                                 float_nodes=sorted(set(r.float_nodes) | set(units[name].nodes)))
    anns = {v.name for v, _ in forced.apply().graph.annotated()}
    assert not anns & set(units[name].edges + units[name].weights)
    with pytest.raises(HagoError, match="units="):
        select_precision(conv_bn_net(), "x86_avx512_vnni", data, units="layers")
