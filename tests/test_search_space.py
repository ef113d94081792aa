"""hago.search's space beyond bits and float fallback: per-edge methods, per-tensor weights, signatures, SPARQ and
multipoint choices, the modeled SPARQ latency term and the report's statement that it is modeled."""
import copy
import hashlib
import json

import numpy as np
import pytest
from onnx import numpy_helper

import hago
from hago.ir.graph import SIGNATURE_KEY
from hago.search import Config, load_result
from hago.search.driver import Driver, Trial
from hago.search.evaluate import Evaluator
from hago.search.latency import SparqLatencyTerm
from hago.search.log import TrialLog
from hago.search.report import write_report
from hago.search.space import build_space

from builders import calib, conv_bn_net

# conv_bn_net after loading: node (Conv+Relu) -> r1 -> node_5 (Conv+Relu) -> r2 -> node_8 MaxPool -> p2 ->
# node_9 Conv -> c3; node_10 Add(c3, p2) -> node_11 Relu -> GAP -> Flatten -> flat -> node_14 Gemm


def const_metric(outputs, batch):
    return 1.0


class FakeLatency:
    """Integer multipliers cost 1 (0.3 with <= 4-bit weights), float ones 2, each quantized activation 0.05."""

    name = "fake"
    target_key = "fake-space"

    def __init__(self, sparq_kernel=False):
        self.calls = 0
        if sparq_kernel:
            self.sparq_kernel = True

    def __call__(self, qg):
        self.calls += 1
        g = qg.graph
        t = 0.0
        for n in g.nodes():
            if n.op_type in ("Conv", "Gemm"):
                if g.region(n) != "int":
                    t += 2.0
                else:
                    wa = g.annotation(n.inputs[1])
                    t += 0.3 if wa is not None and wa.bits <= 4 else 1.0
        return t + 0.05 * sum(1 for _, a in g.annotated() if a.kind == "activation")


def two_signature_spec():
    """x86_avx2 plus a second Conv signature: <= 6-bit activations x <= 4-bit weights (a narrow-MAC kernel)."""
    raw = copy.deepcopy(hago.load_spec("x86_avx2").raw)
    raw["name"] = "x86_avx2_two_conv_signatures"
    raw["ops"]["Conv"]["signatures"].append({"inputs": [{"role": "activation", "bits": [4, 6]},
                                                        {"role": "weight", "bits": [2, 4]}, "bias"],
                                             "accumulator": "int32"})
    return hago.load_spec(raw)


@pytest.fixture(scope="module")
def data():
    g = hago.load(conv_bn_net())
    return g, calib([8, 3, 16, 16], n=2), calib([8, 3, 16, 16], n=2, seed=5)


@pytest.fixture(scope="module")
def ev_x86(data):
    g, c, e = data
    return Evaluator(g, hago.load_spec("x86_avx2"), c, e)


@pytest.fixture(scope="module")
def ev_sparq(data):
    g, c, e = data
    return Evaluator(g, hago.load_spec("sparq_accelerator"), c, e)


def _space(ev, **kw):
    return build_space(ev.graph, ev.spec, nonnegative=ev.nonnegative(), **kw)


def _ann(qg, name):
    return qg.graph.annotation(qg.graph.value(name))


# -- Config ------------------------------------------------------------------------------------------


def test_config_serialization_and_old_keys(ev_sparq):
    space = _space(ev_sparq)
    cfg = Config.make({"x": 6}, ["node_9"], "kl", space, methods={"r2": "minmax", "w3": "mse"}, per_tensor=["wf"],
                      sparq={"r1": "vsparq:5", "flat": "bsparq:3"}, multipoint={"node_5": "adaptive", "node_14": 2})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert Config.from_dict(d) == cfg and Config.from_dict(d).key() == cfg.key()
    # a config with only the old fields keeps its old key (old logs and latency databases still match)
    old = Config.make({"r1": 6}, ["node"], "mse")
    old_dict = {"bits": {"r1": 6}, "float_nodes": ["node"], "method": "mse"}
    assert old.to_dict() == old_dict
    assert old.key() == hashlib.sha1(json.dumps(old_dict, sort_keys=True).encode()).hexdigest()[:16]
    assert Config.from_dict(old_dict) == old
    t = Trial.from_dict({"index": 0, "strategy": "random", "config": old_dict, "accuracy": 0.5, "latency_ms": 1.0})
    assert t.modeled == "" and t.measured_ms is None
    # normalization against the space: defaults and invalid choices are dropped; SPARQ keeps 8 bits;
    # float nodes have no multipoint
    c2 = Config.make({"r1": 5}, ["node_5"], "mse", space, methods={"r2": "mse", "w3": "minmax", "nope": "kl"},
                     sparq={"r1": "bsparq:5", "x": "bsparq:5"}, multipoint={"node_5": 2})
    assert c2.methods == () and c2.bits == () and c2.sparq == (("r1", "bsparq:5"),) and c2.multipoint == ()
    # a split (multipoint) weight has no bits, method or granularity of its own
    c3 = Config.make({"w3": 5}, (), "mse", space, methods={"w3": "mse"}, per_tensor=["w3"], multipoint={"node_9": 2})
    assert c3.bits == () and c3.methods == () and not c3.per_tensor and c3.multipoint == (("node_9", 2),)


def test_space_lists_choices_the_spec_allows(ev_x86, ev_sparq):
    sx = _space(ev_x86)
    assert set(sx.granularity) == {"w1_bnfold", "w2_bnfold", "w3", "wf"}  # per_channel and per_tensor allowed
    assert sx.edge_methods["w3"] == ("minmax", "mse") and "mse" in sx.edge_methods["r1"]
    assert "p2" not in sx.edge_methods  # tied to r2 (MaxPool): its threshold is r2's
    assert not sx.sparq_edges and not sx.signatures  # no SPARQ section, one Conv signature
    assert set(sx.multipoint_nodes) == {"node", "node_5", "node_9", "node_14"}  # x86 weights go down to 2 bits
    ss = _space(ev_sparq)
    # non-negative uint8 activations entering Conv/Gemm; not x (the input may be negative)
    assert set(ss.sparq_edges) == {"r1", "p2", "flat"}
    assert ss.sparq_edges["r1"] == ("bsparq:5", "bsparq:3", "bsparq:2", "vsparq:5")
    st = build_space(ev_x86.graph, two_signature_spec())
    assert st.signatures == {"node": (0, 1), "node_5": (0, 1), "node_9": (0, 1)}
    plain = _space(ev_sparq, extras=False)
    assert not any(plain.extras().values())
    assert ss.size() > plain.size()


# -- each choice changes the quantized model -------------------------------------------------------------


def test_per_tensor_choice_gives_scalar_scale_in_qdq(ev_x86):
    space = _space(ev_x86)
    base = ev_x86.build(Config.make({}, (), "mse", space)).to_qdq()
    pt = ev_x86.build(Config.make({}, (), "mse", space, per_tensor=["w3"])).to_qdq()
    scales = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("__scale")}  # noqa: E731
    b, p = scales(base), scales(pt)
    assert b["w3__scale"].shape == (8,) and p["w3__scale"].shape == ()
    assert b["w2_bnfold__scale"].shape == p["w2_bnfold__scale"].shape == (8,)  # other weights stay per channel
    dq = [n for n in pt.graph.node if n.name == "w3__DQ"][0]
    assert not any(a.name == "axis" for a in dq.attribute)


def test_per_edge_method_yields_different_thresholds(ev_x86):
    space = _space(ev_x86)
    base = ev_x86.build(Config.make({}, (), "mse", space))
    per = ev_x86.build(Config.make({}, (), "mse", space, methods={"r1": "minmax", "w3": "mse"}))
    assert _ann(per, "r1").method == "minmax" and _ann(base, "r1").method == "mse"
    assert float(_ann(per, "r1").scale) != float(_ann(base, "r1").scale)
    assert float(_ann(per, "r1").rmax) == pytest.approx(ev_x86.observers["r1"].max)
    assert not np.allclose(_ann(per, "w3").scale, _ann(base, "w3").scale)  # MSE-clipped weight
    assert float(_ann(per, "r2").scale) == float(_ann(base, "r2").scale)  # the other edges keep the global method
    assert np.allclose(_ann(per, "wf").scale, _ann(base, "wf").scale)


def test_signature_choice_changes_descriptors(data):
    g, c, e = data
    ev = Evaluator(g, two_signature_spec(), c, e)
    space = build_space(g, ev.spec)
    base = ev.build(Config.make({}, (), "mse", space))
    alt = ev.build(Config.make({}, (), "mse", space, signatures={"node_5": 1}))
    assert alt.graph.node("node_5").meta[SIGNATURE_KEY].index == 1
    assert _ann(base, "w2_bnfold").bits == 7 and _ann(alt, "w2_bnfold").bits == 4
    assert _ann(base, "r1").bits == 8 and _ann(alt, "r1").bits == 6
    assert _ann(alt, "w3").bits == 7  # other Convs keep the first signature
    assert 0.0 <= ev.accuracy(alt) <= 1.0
    # with multipoint, every copy of the layer runs on the chosen signature
    mp = ev.build(Config.make({}, (), "mse", space, signatures={"node_5": 1}, multipoint={"node_5": 2}))
    assert mp.graph.node("node_5_mp1").meta[SIGNATURE_KEY].index == 1
    assert space.effective_bits(Config.make({}, (), "mse", space, signatures={"node_5": 1})) < space.effective_bits(Config())


def test_sparq_choice_in_exported_qdq(ev_sparq):
    space = _space(ev_sparq)
    plain = ev_sparq.build(Config.make({}, (), "mse", space))
    qg = ev_sparq.build(Config.make({}, (), "mse", space, sparq={"r1": "vsparq:5", "p2": "bsparq:3"}))
    names = {n.name for n in qg.to_qdq().graph.node}
    assert {"r1__sparq_Lut", "r1__sparq_Where", "p2__sparq_Lut"} <= names
    assert "p2__sparq_Where" not in names and not any("flat__sparq" in n for n in names)
    assert not any("__sparq" in n.name for n in plain.to_qdq().graph.node)
    assert _ann(qg, "p2").sparq["placements"] == 3 and _ann(qg, "r1").sparq["mode"] == "vsparq"
    assert 0.0 < qg.options["sparq"]["r1"]["frac_8bit_pairs"] < 1.0  # ReLU zeros: some pairs take the 8-bit path
    x = ev_sparq.calib[0]
    assert not np.allclose(qg.run(x)[0], plain.run(x)[0])  # the 4-bit windows change the result


def test_multipoint_choice_splits_layers(ev_x86):
    space = _space(ev_x86)
    qg = ev_x86.build(Config.make({}, (), "mse", space, multipoint={"node_5": 2, "node_14": "adaptive"}))
    ops = [n.name for n in qg.graph.nodes()]
    assert "node_5_mp1" in ops and any(n.meta.get("hago.multipoint_sum") for n in qg.graph.nodes())
    w = {v.name: a for v, a in qg.graph.annotated() if a.kind == "weight"}
    assert w["w2_bnfold_mp0"].bits == 4 and w["w2_bnfold_mp0"].method == "multipoint" and "w2_bnfold" not in w
    plan = qg.options["multipoint"]["node_14"]
    assert plan["bits"] == 4 and isinstance(plan["n_points"], list) and 1 <= np.mean(plan["n_points"]) <= 3
    assert 0.0 <= ev_x86.accuracy(qg) <= 1.0


# -- strategies pick the new choices -----------------------------------------------------------------------


def test_greedy_walks_new_choices_and_result_applies(data, tmp_path):
    """With bits fixed at 8 (min_bits=8) and a flat metric, HAGO's greedy key (accuracy, fewer effective bits)
    takes SPARQ (4-bit windows) and adaptive multipoint (1.5 x 4-bit points); the result re-applies exactly."""
    g, c, e = data
    r = hago.search(g, "sparq_accelerator", c, e, metric=const_metric, strategy="greedy", budget=22, min_bits=8,
                    measure=FakeLatency(), cache_dir=str(tmp_path / "cache"), progress=False)
    greedy = [t for t in r.history if t.strategy == "greedy"]
    assert all(not t.config.float_nodes for t in greedy)
    final = greedy[-1].config
    assert len(final.sparq) == 3 and all(v == "bsparq:5" for _, v in final.sparq)  # the first alternative is kept
    assert final.multipoint and all(v == "adaptive" for _, v in final.multipoint)
    best = r.best
    assert best.config.sparq and best.config.multipoint and best.modeled == "sparq"
    assert best.latency_ms < best.measured_ms
    r2 = load_result(r.save(str(tmp_path / "r.json")))
    assert r2.best.config == best.config and r2.latency_model["sparq"]["modeled"]
    qg = r2.apply(g)
    ref = Evaluator(g, hago.load_spec("sparq_accelerator"), c, e).build(best.config)
    x = e[0]
    np.testing.assert_array_equal(qg.run(x)[0], ref.run(x)[0])
    assert any("__sparq" in n.name for n in qg.to_qdq().graph.node)


def test_model_strategy_picks_sparq_and_report_says_modeled(data, tmp_path):
    g, c, e = data
    r = hago.search(g, "sparq_accelerator", c, e, metric=const_metric, strategy="model", budget=8,
                    measure=FakeLatency(), cache_dir=str(tmp_path / "cache"), progress=False)
    assert r.best.config.sparq and r.best.modeled == "sparq"
    plain = [t for t in r.history if t.config == Config.make({}, (), "mse")][0]
    assert r.best.latency_ms < plain.latency_ms
    for t in r.history:
        if t.config.sparq and t.latency_ms is not None:
            assert t.modeled == "sparq" and t.latency_ms < t.measured_ms
    rep = open(write_report(r, str(tmp_path / "rep"))).read()
    assert "SPARQ speed-up is modeled, not measured" in rep and "modeled (SPARQ)" in rep
    assert "SPARQ" in r.summary() and "modeled" in r.summary()
    # a spec without SPARQ: nothing modeled, and the report says nothing about it
    rx = hago.search(g, "x86_avx2", c, e, metric=const_metric, strategy="random", budget=4, measure=FakeLatency(),
                     cache_dir=str(tmp_path / "cache"), progress=False)
    assert rx.latency_model == {} and not any(t.modeled for t in rx.history)
    assert any(t.config.methods or t.config.per_tensor for t in rx.history)  # random explores the new choices
    assert "modeled" not in open(write_report(rx, str(tmp_path / "repx"))).read()


def test_sparq_kernel_measured_not_modeled(data, tmp_path):
    g, c, e = data
    m = FakeLatency(sparq_kernel=True)
    r = hago.search(g, "sparq_accelerator", c, e, metric=const_metric, strategy="model", budget=3, measure=m,
                    cache_dir=str(tmp_path / "cache"), progress=False)
    sq = [t for t in r.history if t.config.sparq]
    assert sq and all(not t.modeled and t.measured_ms is None for t in sq)
    assert r.latency_model["sparq"]["modeled"] is False


# -- the modeled SPARQ latency term ---------------------------------------------------------------------------


def test_sparq_latency_term_only_for_sparq_specs(ev_sparq):
    g = ev_sparq.graph
    space = _space(ev_sparq)
    cfg_b = Config.make({}, (), "mse", space, sparq={e: "bsparq:5" for e in space.sparq_edges})
    cfg_v = Config.make({}, (), "mse", space, sparq={e: "vsparq:5" for e in space.sparq_edges})
    term = SparqLatencyTerm(g, space, ev_sparq.spec)
    assert term.active and term.speedup == 2.0
    assert term.adjust(10.0, Config()) == 10.0
    b = term.adjust(10.0, cfg_b)
    assert 5.0 <= b < 10.0  # at most the paper's 2x, only on the multipliers behind SPARQ edges
    applied = lambda f8: {e: {"mode": "vsparq", "frac_8bit_pairs": f8} for e in space.sparq_edges}  # noqa: E731
    assert term.adjust(10.0, cfg_v, applied(0.0)) == pytest.approx(b)  # no zero pairs: like bSPARQ
    assert b < term.adjust(10.0, cfg_v, applied(0.5)) < 10.0
    assert term.adjust(10.0, cfg_v, applied(1.0)) == pytest.approx(10.0)  # every pair on the 8-bit path
    # a node kept in float gains nothing
    assert term.adjust(10.0, cfg_b.with_(space, float_nodes=list(space.nodes))) == 10.0
    # no SPARQ in the spec, or a real SPARQ kernel: no modeled term
    assert SparqLatencyTerm(g, space, hago.load_spec("x86_avx2")).adjust(10.0, cfg_b) == 10.0
    assert SparqLatencyTerm(g, space, ev_sparq.spec, FakeLatency(sparq_kernel=True)).adjust(10.0, cfg_b) == 10.0


def test_driver_predicts_lower_latency_for_sparq_only_on_sparq_spec(ev_sparq, ev_x86):
    def driver(ev):
        return Driver(ev.graph, ev.spec, ev, FakeLatency(), budget=10, objective={"kind": "latency", "max_drop": 1.0},
                      seed=0, log=TrialLog(None, {}, False), previous=[], db=None, progress=False, method="mse",
                      min_bits=4)

    d = driver(ev_sparq)
    sp = d.space
    for cfg in (Config.make({}, (), "mse", sp), Config.make({}, ["node_9"], "mse", sp),
                Config.make({}, (), "mse", sp, sparq={"r1": "bsparq:5"})):
        d.trial(cfg, "test")
    plain = Config.make({}, (), "mse", sp)
    sq = Config.make({}, (), "mse", sp, sparq={e: "bsparq:5" for e in sp.sparq_edges})
    p_plain, p_sq = d.predict_latency([plain, sq])
    assert p_sq < p_plain
    dx = driver(ev_x86)
    for cfg in (Config(), Config.make({}, ["node_9"], "mse", dx.space)):
        dx.trial(cfg, "test")
    forced = Config(sparq=(("r1", "bsparq:5"),))  # not a choice of this space: no modeled gain
    a, b = dx.predict_latency([Config(), forced])
    assert a == pytest.approx(b)
