"""hago.search: strategies, objective, log/resume, failures, interruption, determinism, CLI."""
import json
import os

import numpy as np
import onnx
import pytest

import hago
from hago.errors import SearchError
from hago.search import Config, load_result

from builders import calib, conv_bn_net


class FakeLatency:
    """Deterministic 'target': integer convs are fast, float ones slow, every int/float boundary costs."""

    name = "fake"
    target_key = "fake-target"

    def __init__(self, fail_on=None, interrupt_after=None):
        self.calls = 0
        self.fail_on = fail_on
        self.interrupt_after = interrupt_after

    def __call__(self, qg):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        nodes = qg.graph.nodes()
        if self.fail_on and any(n.name == self.fail_on and qg.graph.region(n) == "int" for n in nodes):
            raise RuntimeError("kernel failed to compile")
        t = 0.0
        for n in nodes:
            if n.op_type in ("Conv", "Gemm"):
                t += 1.0 if qg.graph.region(n) == "int" else 2.0
        t += 0.05 * sum(1 for _, a in qg.graph.annotated() if a.kind == "activation")
        return t


@pytest.fixture(scope="module")
def setup():
    g = hago.load(conv_bn_net())
    return g, calib([8, 3, 16, 16], n=3), calib([8, 3, 16, 16], n=3, seed=5)


def _run(setup, tmp_path, **kw):
    g, c, e = setup
    kw.setdefault("measure", FakeLatency())
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return hago.search(g, "x86_avx2", c, e, progress=False, **kw)


@pytest.mark.parametrize("strategy", ["model", "greedy", "batched_greedy", "random", "mixed_precision"])
def test_strategies_meet_budget(setup, tmp_path, strategy):
    r = _run(setup, tmp_path, strategy=strategy, budget=8, max_drop=2.0)
    assert r.best is not None
    assert r.best.accuracy >= r.fp32_accuracy - 0.02
    assert r.best.latency_ms <= r.fp32_latency_ms
    measured = [t for t in r.history if t.latency_ms is not None]
    assert 2 <= len(measured) <= 8
    assert r.pareto and all(a.latency_ms <= b.latency_ms for a, b in zip(r.pareto, r.pareto[1:]))


def test_greedy_is_hagos_walk(setup, tmp_path):
    r = _run(setup, tmp_path, strategy="greedy", budget=12)
    trials = [t for t in r.history if t.strategy == "greedy"]
    # first trial is all edges at max bits; then the first edge walks down from max-1
    assert trials[0].config.bits == ()
    first_edge = trials[1].config.bits[0][0]
    walked = [dict(t.config.bits).get(first_edge) for t in trials[1:] if len(t.config.bits) == 1 and t.config.bits[0][0] == first_edge]
    assert walked == sorted(walked, reverse=True)
    assert all(not t.config.float_nodes for t in trials)  # HAGO searches bits only


def test_model_based_beats_all_int_when_boundaries_cost(setup, tmp_path):
    r = _run(setup, tmp_path, strategy="model", budget=10, max_drop=5.0)
    all_int = [t for t in r.history if t.config == Config.make({}, (), "mse")]
    assert all_int and r.best.latency_ms <= all_int[0].latency_ms


def test_deterministic_under_seed(setup, tmp_path):
    a = _run(setup, tmp_path / "a", strategy="random", budget=6, seed=3)
    b = _run(setup, tmp_path / "b", strategy="random", budget=6, seed=3)
    assert [t.config.key() for t in a.history] == [t.config.key() for t in b.history]
    assert [t.accuracy for t in a.history] == [t.accuracy for t in b.history]


def test_log_resume_after_kill(setup, tmp_path):
    log = str(tmp_path / "s.jsonl")
    m1 = FakeLatency()
    r1 = _run(setup, tmp_path, strategy="random", budget=6, seed=1, log=log, measure=m1, confirm=0)
    lines = open(log).read().splitlines()
    assert json.loads(lines[0])["type"] == "header" and len(lines) == 1 + len(r1.history)
    # simulate kill -9 in the middle of writing the last trial
    with open(log, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    m2 = FakeLatency()
    r2 = _run(setup, tmp_path / "c2", strategy="random", budget=6, seed=1, log=log, resume=True, measure=m2,
              confirm=0)
    assert [t.config.key() for t in r2.history] == [t.config.key() for t in r1.history]
    assert m2.calls == 1  # only the trial in flight was measured again
    assert all(json.loads(line) for line in open(log).read().splitlines())


class SpikyLatency(FakeLatency):
    """FakeLatency whose first measurement of the all-integer configuration is a 3x spike (a machine hiccup)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __call__(self, qg):
        ms = super().__call__(qg)
        key = qg.options.get("config", {}).get("float_nodes") == [] and not qg.options["config"].get("bits")
        if key and "all-int" not in self.seen:
            self.seen.add("all-int")
            return 3.0 * ms
        return ms


def test_confirm_remeasures_finalists(setup, tmp_path):
    log = str(tmp_path / "s.jsonl")
    # without the confirmation round the spike decides: the all-integer config loses to a slower one
    r0 = _run(setup, tmp_path / "a", strategy="model", budget=6, seed=1, measure=SpikyLatency(), confirm=0)
    r1 = _run(setup, tmp_path / "b", strategy="model", budget=6, seed=1, measure=SpikyLatency(), confirm=3, log=log)
    all_int = [t for t in r1.history if not t.config.float_nodes and not t.config.bits]
    assert all_int and all_int[0].confirmed == 4  # the first sample + 3 rounds; median drops the spike
    assert r1.best.latency_ms <= r0.best.latency_ms
    assert r1.best.config.key() == all_int[0].config.key() != r0.best.config.key()
    recs = [json.loads(line) for line in open(log)]
    assert any(r["type"] == "confirm" for r in recs)
    from hago.search.log import read_log

    rows = {r["key"]: r for r in read_log(log, r1.model_hash, r1.spec_hash)}
    assert rows[all_int[0].config.key()]["confirmed"] == 4


def test_tvm_search_compiles_each_config_once(setup, tmp_path):
    """With TVM latency every candidate is compiled and timed for real; the final side-by-side rounds re-time the
    finalists on the artifacts compiled for their trials (a ResNet-50 candidate takes ~12 s to compile)."""
    pytest.importorskip("tvm")
    from hago.search.latency import TvmLatency

    g, c, e = setup
    m = TvmLatency(hago.load_spec("x86_avx2"), cache_dir=str(tmp_path / "tune"), threads=1, repeat=5)
    qg = hago.quantize(g, "x86_avx2", c, method="minmax")
    t1, t2 = m(qg), m(qg)
    assert t1 > 0 and t2 > 0 and m.compiles == 1  # same QDQ model: one compile
    r = hago.search(g, "x86_avx2", c, e, strategy="random", budget=3, seed=0, measure=m, confirm=2, max_drop=5.0,
                    cache_dir=str(tmp_path / "cache"), progress=False)
    measured = {t.config.key() for t in r.history if t.latency_ms is not None}
    assert r.best is not None and r.best.latency_ms > 0
    assert any(t.confirmed for t in r.history)  # the confirmation rounds ran ...
    assert m.compiles <= 1 + len(measured)  # ... without compiling a finalist again


@pytest.mark.parametrize("spec_name", ["x86_avx2", "x86_avx512_vnni"])
def test_kernel_profile_prior_matches_every_conv(setup, tmp_path, spec_name):
    """Every Conv of the graph finds its kernel in the real profiles of the all-float artifact (TVM's float conv)
    and of the all-integer one (hago's packed int8 conv; NHWC with the VNNI spec), and the prior of those two
    configs is their profiled time; a mixed config pays the float kernel of its float convs, the integer kernel of
    the others, and the border cost per element."""
    pytest.importorskip("tvm")
    from hago.search.evaluate import Evaluator
    from hago.search.latency import KernelProfilePrior, Regions, TvmLatency
    from hago.search.space import build_space

    g, c, e = setup
    spec = hago.load_spec(spec_name)
    if spec_name == "x86_avx512_vnni":
        with open("/proc/cpuinfo") as f:
            if " avx512_vnni" not in f.read():
                pytest.skip("profiling VNNI artifacts needs a CPU with AVX-512 VNNI")
    ev = Evaluator(g, spec, c, e)
    space = build_space(g, spec)
    m = TvmLatency(spec, cache_dir=str(tmp_path / "tune"), threads=1)
    reg = Regions(g, spec)
    pr = KernelProfilePrior.measure(g, space, ev.build, m.kernel_profile, regions=reg)
    convs = [n.name for n in g.nodes() if n.op_type == "Conv"]
    assert convs and set(pr.node_key) == set(convs)
    for n in convs:
        assert (pr.node_key[n], False) in pr.time and (pr.node_key[n], True) in pr.time
    assert pr.q_per_elem > 0  # the input's border quantize kernel
    t_f, t_i = pr(reg(frozenset(space.nodes))), pr(reg(frozenset()))
    fl_parts, int_parts = pr.parts(reg(frozenset(space.nodes))), pr.parts(reg(frozenset()))
    assert fl_parts[1] == 0 and int_parts[0] == 0 and t_f > 0 and t_i > 0
    one = frozenset([convs[0]])
    mixed = pr.parts(reg(one))
    assert mixed[0] == pytest.approx(pr.time[(pr.node_key[convs[0]], False)] /
                                     sum(1 for n in convs if pr.node_key[n] == pr.node_key[convs[0]]) *
                                     sum(1 for n in convs if pr.node_key[n] == pr.node_key[convs[0]] and n in one))
    assert mixed[2] > int_parts[2]  # a float conv inside the integer model adds borders


def test_log_from_other_model_refused(setup, tmp_path):
    log = str(tmp_path / "s.jsonl")
    _run(setup, tmp_path, strategy="random", budget=3, log=log)
    other = hago.load(conv_bn_net(seed=9))
    with pytest.raises(SearchError, match="another model"):
        hago.search(other, "x86_avx2", calib([8, 3, 16, 16]), None, log=log, resume=True, measure=FakeLatency(),
                    progress=False, budget=2)
    with pytest.raises(SearchError, match="another hardware spec"):
        hago.search(setup[0], "x86_avx512_vnni", setup[1], None, log=log, resume=True, measure=FakeLatency(),
                    progress=False, budget=2)


def test_measurement_failures_do_not_stop_search(setup, tmp_path):
    g = setup[0]
    conv = [n.name for n in g.nodes() if n.op_type == "Conv"][0]
    r = _run(setup, tmp_path, strategy="random", budget=8, measure=FakeLatency(fail_on=conv), seed=2)
    failed = [t for t in r.history if t.status == "failed"]
    assert failed and "kernel failed to compile" in failed[0].error
    assert r.best is not None and r.best.ok


def test_interrupt_keeps_best(setup, tmp_path):
    r = _run(setup, tmp_path, strategy="random", budget=20, measure=FakeLatency(interrupt_after=4))
    assert r.interrupted and r.best is not None and len(r.history) == 4


def test_result_save_load_apply(setup, tmp_path):
    r = _run(setup, tmp_path, strategy="model", budget=6)
    p = r.save(str(tmp_path / "r.json"))
    r2 = load_result(p)
    assert r2.best.config == r.best.config
    qg = r2.apply(setup[0])
    x = setup[2][0]
    out = qg.run(x)[0]
    assert out.shape == (8, 10)
    with pytest.raises(SearchError, match="is for model"):
        r2.apply(hago.load(conv_bn_net(seed=4)))


def test_cli_search(tmp_path, capsys):
    from hago.cli import main

    mp = tmp_path / "m.onnx"
    onnx.save(conv_bn_net(), str(mp))
    rs = np.random.RandomState(0)
    np.savez(tmp_path / "c.npz", x=rs.randn(24, 3, 16, 16).astype(np.float32))
    rc = main(["search", str(mp), "--spec", "x86_avx2", "--calib", str(tmp_path / "c.npz"), "--trials", "4",
               "--measure", "onnxruntime", "--strategy", "random", "--out", str(tmp_path / "out")])
    assert rc == 0
    for f in ("best.qdq.onnx", "search.jsonl", "report.md", "pareto.svg", "result.json", "artifact/model.so",
              "artifact/manifest.json"):
        assert os.path.exists(tmp_path / "out" / f), f
    rep = open(tmp_path / "out" / "report.md").read()
    assert "Pareto front" in rep and "## Latency breakdown of the best model" in rep
    assert os.path.exists(tmp_path / "out" / "breakdown.svg")
    # HAGO's own space only: no per-edge method / granularity / SPARQ / multipoint choices in the log
    rc = main(["search", str(mp), "--spec", "x86_avx2", "--calib", str(tmp_path / "c.npz"), "--trials", "3",
               "--measure", "onnxruntime", "--strategy", "random", "--hago-space", "--no-artifact",
               "--out", str(tmp_path / "out2")])
    assert rc == 0 and not os.path.exists(tmp_path / "out2" / "artifact")
    import json

    for line in open(tmp_path / "out2" / "search.jsonl"):
        rec = json.loads(line)
        cfg = rec.get("config") or {}
        assert not any(cfg.get(k) for k in ("methods", "per_tensor", "signatures", "sparq", "multipoint")), cfg


def test_latency_model_ranks_held_out_configs(setup):
    """The latency model learns a latency that is additive over layers plus border costs (a stand-in for the
    target) from 30 configs and ranks 20 held-out ones."""
    from hago.search.latency import FeatureMap, LatencyModel, spearman
    from hago.search.space import build_space

    g = setup[0]
    space = build_space(g, hago.load_spec("x86_avx2"))
    fm = FeatureMap(g, space)
    rs = np.random.RandomState(0)
    cost = {n: rs.uniform(0.5, 3.0) for n in space.nodes}
    cfgs, y = [], []
    for _ in range(50):
        fl = [n for n in space.nodes if rs.rand() < rs.rand()]
        c = Config.make({}, fl, "mse", space)
        f = fm(c)
        y.append(sum(cost[n] * (2.0 if n in fl else 1.0) for n in space.nodes) + 0.3 * f[len(space.nodes) + 8]
                 + rs.normal(0, 0.05))
        cfgs.append(c)
    X = np.stack([fm(c) for c in cfgs])
    m = LatencyModel().fit(X[:30], np.array(y[:30]))
    assert spearman(m.predict(X[30:]), np.array(y[30:])) >= 0.9


def _random_float_sets(space, n, seed=0):
    rs = np.random.RandomState(seed)
    out = [frozenset(), frozenset(space.nodes)]
    while len(out) < n:
        p = rs.rand()
        out.append(frozenset(x for x in space.nodes if rs.rand() < p))
    return out


def test_regions_follow_partition(setup):
    """The feature map's fast region rule gives the regions partition gives a config (a float leader takes its
    float-capable followers with it)."""
    from hago.search.evaluate import prepare
    from hago.search.latency import Regions
    from hago.search.space import build_space

    g = setup[0]
    spec = hago.load_spec("x86_avx2")
    space = build_space(g, spec)
    reg = Regions(g, spec)
    changed = 0
    for fl in _random_float_sets(space, 12):
        h = prepare(g, spec, Config.make({}, fl, "mse", space))
        real = {n.name: h.region(n) == "int" for n in h.nodes()}
        sim = reg(fl)
        assert sim == {k: sim[k] for k in real} and all(sim[k] == real[k] for k in real), fl
        changed += sum(1 for k in real if not real[k] and k not in fl and k in reg.int_ok)
    assert changed > 0  # some node went float only through its producer: float_nodes alone would be wrong
    nb, el = reg.boundaries(reg(frozenset()))
    assert nb == 2 and el > 0  # all-integer: the graph input's Q and the output's DQ
    assert reg.boundaries(reg(frozenset(space.nodes))) == (0, 0.0)


def _fake_profile(reg, space, is_int, t_float, t_int, names):
    """Profile rows as onnxruntime names them: ``<node>_token_<k>`` for rewritten integer nodes, ``<value>_nchwc``
    for NCHWc float nodes, fused followers folded into their leader's row, a layout node of its own."""
    rows = []
    for n in space.nodes:
        rows.append({"node": names[n][1] if is_int[n] else names[n][0], "op": "X",
                     "ms": t_int[n] if is_int[n] else t_float[n]})
    rows.append({"node": "ReorderInput_token_3", "op": "ReorderInput", "ms": 0.0 if any(is_int.values()) else 0.5})
    return rows


def test_profile_prior_composes_node_times(setup):
    """The prior maps onnxruntime's row names back to graph nodes and adds up, per config, each group's time in its
    precision: it reproduces the profiled configs exactly and composes unseen mixes from them."""
    from hago.search.latency import FeatureMap, ProfilePrior
    from hago.search.space import build_space

    g = setup[0]
    space = build_space(g, hago.load_spec("x86_avx2"))
    fm = FeatureMap(g, space)
    reg = fm.regions
    rs = np.random.RandomState(3)
    t_float = {n: float(rs.uniform(1, 3)) for n in space.nodes}
    t_int = {n: float(rs.uniform(0.2, 1)) for n in space.nodes}
    out_value = {n.name: n.outputs[0].name for n in g.nodes()}
    names = {n: (f"{out_value[n]}_nchwc", f"{n}_token_{i}") for i, n in enumerate(space.nodes)}
    sets = [frozenset(space.nodes), frozenset()] + ProfilePrior.patterns(g, space)
    profs = [(fl, _fake_profile(reg, space, reg(fl), t_float, t_int, names)) for fl in sets]
    pr = ProfilePrior(g, reg, profs)
    assert set(pr.groups) == set(space.nodes)  # every row found its node (no name left unattributed)
    assert pr.u_float == pytest.approx(0.5) and pr.u_int == 0.0
    for fl in _random_float_sets(space, 10, seed=4):
        is_int = reg(fl)
        want = sum(t_int[n] if is_int[n] else t_float[n] for n in space.nodes)
        fl_ms, int_ms, bnd, un = pr.parts(is_int)
        assert fl_ms + int_ms == pytest.approx(want)
        assert bnd == 0.0  # no Q/DQ rows in the fake profiles: boundaries cost nothing
    assert pr(reg(frozenset(space.nodes))) == pytest.approx(sum(t_float.values()) + 0.5)
    # the feature map carries the prior in its column; without a prior that column is 0
    c = Config.make({}, list(space.nodes)[:2], "mse", space)
    assert fm(c)[fm.prior_index] == 0.0
    fm.set_prior(pr)
    assert fm(c)[fm.prior_index] == pytest.approx(pr(reg(c.float_nodes)))


def test_profile_prior_context_dependent_time(setup):
    """A group timed differently next to the other precision (onnxruntime's layouts) is priced by its neighbours'
    precision, not only its own."""
    from hago.search.latency import ProfilePrior, Regions
    from hago.search.space import build_space

    g = setup[0]
    space = build_space(g, hago.load_spec("x86_avx2"))
    reg = Regions(g, hago.load_spec("x86_avx2"))
    sets = [frozenset(space.nodes), frozenset()] + ProfilePrior.patterns(g, space)
    pr0 = ProfilePrior(g, reg, [(fl, []) for fl in sets])
    # a node that, kept float alone, feeds an integer consumer (the MaxPool before an integer Conv)
    slow = [n for n in space.nodes if any(reg(frozenset([n])).get(c, False) for c in pr0.cons.get(n, ()))
            and not reg(frozenset([n]))[n]][0]

    def rows(fl):
        is_int = reg(fl)
        out = []
        for n in space.nodes:
            t = 0.5 if is_int[n] else 1.0
            if n == slow and not is_int[n] and any(is_int.get(c, False) for c in pr0.cons.get(n, ())):
                t = 10.0  # float, feeding an integer consumer
            out.append({"node": n, "op": "X", "ms": t})
        return out

    pr = ProfilePrior(g, reg, [(fl, rows(fl)) for fl in sets])
    for fl in [frozenset([slow])] + _random_float_sets(space, 12, seed=7):
        is_int = reg(fl)
        want = sum(r["ms"] for r in rows(fl) if not is_int[r["node"]])
        assert pr.parts(is_int)[0] == pytest.approx(want), sorted(fl)
    assert pr.parts(reg(frozenset([slow])))[0] >= 10.0


def test_latency_model_uses_the_prior():
    """With a prior column the model fits latency ~ a * prior + b plus a ridge correction: it ranks held-out
    configs whose latency follows the prior, where the per-node features alone (few samples, many nodes) do not."""
    from hago.search.latency import LatencyModel, spearman

    rs = np.random.RandomState(0)
    n_nodes, n = 60, 40
    cost_f, cost_i = rs.uniform(0.5, 3, n_nodes), rs.uniform(0.1, 3.5, n_nodes)
    Z = (rs.rand(n, n_nodes) < rs.rand(n, 1)).astype(float)  # 1 = integer
    prior = Z @ cost_i + (1 - Z) @ cost_f
    y = 1.2 * prior + 3.0 + rs.normal(0, 0.3, n)
    X = np.hstack([Z, prior[:, None]])
    m = LatencyModel().fit(X[:28], y[:28], prior_col=n_nodes)
    assert m.prior_col == n_nodes and m.model is None  # no residual trees on 28 points
    assert spearman(m.predict(X[28:]), y[28:]) >= 0.9
    # a constant prior column (no prior: TVM latency) is ignored, the model still fits
    Xc = np.hstack([Z, np.zeros((n, 1))])
    mc = LatencyModel().fit(Xc[:28], y[:28], prior_col=n_nodes)
    assert mc.prior_col is None and np.all(np.isfinite(mc.predict(Xc[28:])))


class ProfilingLatency(FakeLatency):
    """A fake target that can also profile per node (like onnxruntime): the driver builds the prior from it."""

    def __init__(self):
        super().__init__()
        self.profiled = 0

    def profile(self, qg, runs=20):
        self.profiled += 1
        return [{"node": n.name, "op": n.op_type, "ms": (1.0 if qg.graph.region(n) == "int" else 2.0)}
                for n in qg.graph.nodes() if n.op_type in ("Conv", "Gemm")]


class KernelProfilingLatency(FakeLatency):
    """A fake TVM-like target that profiles per kernel: each conv kernel named by its shapes, as
    :func:`hago.backend.measure.profile` reports them."""

    def __init__(self):
        super().__init__()
        self.profiled = 0

    def kernel_profile(self, qg):
        self.profiled += 1
        rows = []
        for n in qg.graph.nodes():
            if n.op_type == "Conv":
                sh = [list(n.inputs[0].shape), list(n.inputs[1].shape), list(n.outputs[0].shape)]
                rows.append({"kernel": f"conv_{n.name}", "ms": 1.0 if qg.graph.region(n) == "int" else 2.0,
                             "calls": 1, "shapes": sh})
        return rows + [{"kernel": "hago_border_quantize", "ms": 0.01, "calls": 1, "shapes": [[8, 3, 16, 16]] * 2}]


def test_model_search_builds_the_kernel_profile_prior(setup, tmp_path):
    """A measurer with ``kernel_profile`` (local TVM) gets the kernel-profile prior: two profiled configs."""
    m = KernelProfilingLatency()
    r = _run(setup, tmp_path, strategy="model", budget=16, max_drop=2.0, measure=m)
    assert m.profiled == 2 and r.latency_model["prior"]["kind"] == "KernelProfilePrior"
    assert r.latency_model["prior"]["profiled_configs"] == 2


def test_model_search_builds_the_profile_prior(setup, tmp_path):
    m = ProfilingLatency()
    r = _run(setup, tmp_path, strategy="model", budget=16, max_drop=2.0, measure=m)
    assert m.profiled == 8 and r.latency_model["prior"]["profiled_configs"] == 8
    assert r.best is not None and r.best.latency_ms <= r.fp32_latency_ms
    m2 = ProfilingLatency()
    r2 = _run(setup, tmp_path / "b", strategy="random", budget=4, measure=m2)
    assert m2.profiled == 0 and "prior" not in r2.latency_model  # only the model-based strategy uses it


def test_kernel_profile_conv_key_reads_every_kernel_layout():
    """The kernel-profile prior finds a conv by (in C, KH, KW, out C, OH, OW) whatever layout its kernel has."""
    from hago.search.latency import _conv_key

    key = (64, 1, 1, 256, 56, 56)
    assert _conv_key((1, 64, 56, 56), (256, 64, 1, 1), (1, 256, 56, 56)) == key  # float NCHW
    assert _conv_key((1, 64, 56, 56), (16, 4, 1, 1, 4, 16, 4), (1, 256, 56, 56)) == key  # NCHW packed int8
    assert _conv_key((1, 56, 56, 64), (16, 1, 1, 16, 16, 4), (1, 56, 56, 256)) == key  # NHWC packed int8 (VNNI)
    dw = (144, 3, 3, 144, 28, 28)
    assert _conv_key((1, 144, 56, 56), (144, 1, 3, 3), (1, 144, 28, 28)) == dw  # float / NCHW depthwise
    assert _conv_key((1, 58, 58, 144), (3, 3, 1, 144), (1, 28, 28, 144)) == dw  # NHWC depthwise (HWIO)
    # a classifier conv on 1x1 pixels is not mistaken for an NHWC depthwise one
    assert _conv_key((1, 512, 1, 1), (1000, 512, 1, 1), (1, 1000, 1, 1)) == (512, 1, 1, 1000, 1, 1)


def test_symbolic_input_dims_are_timed_on_a_calibration_sample(tmp_path, monkeypatch):
    """A model whose height and width are symbolic (a text-line recognizer) is timed on one real calibration sample,
    not with every symbolic dim bound to 1; the caller's measurer is left as it was, and a model whose only symbolic
    dim is the batch keeps random inputs of its own shapes."""
    from hago.search.latency import OrtLatency, latency_inputs

    m = conv_bn_net()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    g = hago.load(m)
    c = calib([4, 3, 24, 40], n=2)
    li = latency_inputs(g, c[0])
    assert list(li) == ["x"] and li["x"].shape == (1, 3, 24, 40)
    np.testing.assert_array_equal(li["x"][0], c[0]["x"][0])
    # static shapes, or a symbolic batch dim alone: random inputs of the model's shapes at batch 1, as before
    assert latency_inputs(hago.load(conv_bn_net(batch=4)), calib([4, 3, 16, 16], n=1)[0]) is None
    assert latency_inputs(hago.load(conv_bn_net()), calib([4, 3, 16, 16], n=1)[0]) is None
    # the latency features see the timed size: the first conv's output is 24 x 40 there, not 1 x 1
    from hago.search.latency import bound_shapes

    shaped = bound_shapes(g, li)
    conv = next(n for n in shaped.nodes() if n.op_type == "Conv")
    assert list(conv.outputs[0].shape) == [1, 8, 24, 40]
    assert not all(isinstance(d, int) for d in next(n for n in g.nodes() if n.op_type == "Conv").outputs[0].shape)

    seen = []
    real_call = OrtLatency.__call__

    def spy(self, qg):
        seen.append(None if self.inputs is None else {k: v.shape for k, v in self.inputs.items()})
        return real_call(self, qg)

    monkeypatch.setattr(OrtLatency, "__call__", spy)
    mine = OrtLatency(threads=1, repeat=3, warmup=1, min_seconds=0.0)
    key = mine.target_key
    r = hago.search(g, "x86_avx2", c, c, measure=mine, budget=2, progress=False, confirm=0,
                    cache_dir=str(tmp_path / "cache"))
    assert r.best is not None and seen
    assert all(s == {"x": (1, 3, 24, 40)} for s in seen)
    assert mine.inputs is None and mine.target_key == key  # the caller's object is untouched
    # the latency database of these inputs is not the one of other input shapes
    assert os.listdir(tmp_path / "cache") and all(d != key for d in os.listdir(tmp_path / "cache"))



class _FallbackDriver:
    """The parts of a search driver that the sensitive-node fallback uses; accuracy 1.0 once the ``need`` most
    sensitive nodes are float, 0.9 before (the floor is 0.99)."""

    def __init__(self, n_nodes, need, history=()):
        self.space, self.default_method, self.need = None, "mse", need
        self.nodes = [f"n{i}" for i in range(n_nodes)]
        self.history = list(history)

    def accuracy_floor(self):
        return 0.99

    def remaining(self):
        return 100

    def trial(self, cfg, tag):
        from types import SimpleNamespace

        ok = set(self.nodes[:self.need]) <= set(cfg.float_nodes)
        t = SimpleNamespace(config=cfg, accuracy=1.0 if ok else 0.9, strategy=tag)
        self.history.append(t)
        return t


@pytest.mark.parametrize("n_nodes,need", [(300, 37), (300, 9), (40, 40), (300, 300)])
def test_sensitive_fallback_doubles_then_bisects_the_float_count(n_nodes, need):
    """Where all-INT8 and the seeds (1, 2, 4, 8 most sensitive nodes float) break the budget, the model-based search
    floats the most sensitive nodes in doubling numbers until the budget holds, then bisects the count to within an
    eighth: a feasible mixed configuration with few float nodes, in a logarithmic number of evaluations."""
    from types import SimpleNamespace

    from hago.search.strategies import _sensitive_fallback

    seeds = [SimpleNamespace(config=Config.make({}, [f"n{i}" for i in range(k)], "mse"), accuracy=0.9)
             for k in (0, 1, 2, 4, 8)]
    d = _FallbackDriver(n_nodes, need, seeds)
    _sensitive_fallback(d, d.nodes)
    fb = d.history[len(seeds):]
    assert fb and all(t.strategy == "model:fallback" for t in fb)
    ks = [len(t.config.float_nodes) for t in fb if t.accuracy >= 0.99]
    assert min(ks) >= need and min(ks) <= need + max(1, need // 8)
    assert ks[0] == 16 * 2 ** int(np.ceil(np.log2(max(need, 16) / 16))) or ks[0] == n_nodes
    assert len(fb) <= 2 * int(np.ceil(np.log2(n_nodes))) + 1
    assert all(t.config.float_nodes == frozenset(d.nodes[:len(t.config.float_nodes)]) for t in fb)

    # a seed with an integer node left that meets the budget: nothing to do
    met = seeds + [SimpleNamespace(config=Config.make({}, ["n0"], "mse"), accuracy=0.995)]
    d2 = _FallbackDriver(n_nodes, need, met)
    _sensitive_fallback(d2, d2.nodes)
    assert len(d2.history) == len(met)


def test_search_starts_from_the_method_quantize_picks(setup, tmp_path):
    """By default the search's thresholds are the ones ``hago.quantize``'s ``auto`` picks for the all-integer model,
    so its all-INT8 starting point is the model quantize gives; an explicit method is kept."""
    g, c, e = setup
    picked = hago.quantize(g, "x86_avx2", c).calibration["method"]
    r = _run(setup, tmp_path, strategy="random", budget=2, confirm=0)
    assert {t.config.method for t in r.history[:1]} == {picked}
    r2 = _run(setup, tmp_path, strategy="random", budget=2, confirm=0, method="minmax")
    assert r2.history[0].config.method == "minmax"
