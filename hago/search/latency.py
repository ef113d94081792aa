"""Latency: measured on the target (TVM-compiled, local or over RPC; or onnxruntime), and an xgboost model of it.

Measuring every candidate is too slow, so the search fits a model of
whole-model latency from per-config features (integer and float MACs per op
class, per-node precision, bytes crossing int/float boundaries of the regions
the config really gets) on the measurements made so far, asks it about many
candidates, and measures only the most promising ones (active learning).
Where the measurer can profile, a profile-composed prior is one of the
features and the model corrects its residual: per node on onnxruntime
(:class:`ProfilePrior`: per-node times of 8 profiled configs, summed per
config), per kernel on local TVM (:class:`KernelProfilePrior`: the conv kernels
of the all-float and all-integer artifacts, which a mixed candidate reuses). Measurements are kept in a JSON-lines
database per target and model so a later search starts warm.

SPARQ has no kernel here: where a spec declares SPARQ and the measurer has no
SPARQ kernel (``measurer.sparq_kernel`` is not true), :class:`SparqLatencyTerm`
models its speed-up from the paper's figures on top of the measured latency of
the same configuration with plain 8-bit activations, and reports say so.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time

import numpy as np

from ..errors import HagoError
from ..ir.graph import Graph
from .space import MULTIPOINT_BUDGET, Config, SearchSpace, sparq_mode


# ------------------------------------------------------------------------------------------------
# measurement


class OrtLatency:
    """Latency of the QDQ model on onnxruntime (CPU EP, all graph optimizations: what a user deploys)."""

    name = "onnxruntime"

    def __init__(self, threads: int = 1, repeat: int = 20, warmup: int = 3, inputs: dict | None = None,
                 min_seconds: float = 0.25):
        self.threads, self.repeat, self.warmup, self.inputs = threads, repeat, warmup, inputs
        self.min_seconds = min_seconds
        import onnxruntime

        self.target_key = f"onnxruntime-{onnxruntime.__version__}-cpu-t{threads}"
        if inputs:
            self.target_key += input_key(inputs)

    def profile(self, qg, runs: int = 20, min_seconds: float = 1.0) -> list[dict]:
        """Per-node time of ``qg``'s QDQ model from onnxruntime's profiler (same threads and inputs as a
        measurement): the rows of :func:`hago.runtime.ort.profile_nodes`. Used for the latency model's prior.
        At least ``runs`` profiled runs and about ``min_seconds`` of them (a first measurement sizes it), so a
        small model is not profiled on a handful of noisy runs."""
        from ..runtime import ort as rt

        one = self(qg)
        runs = int(min(max(runs, np.ceil(min_seconds * 1e3 / max(one, 1e-3))), 200))  # the profiler is slow per run
        return rt.profile_nodes(qg.to_qdq(), self.inputs, threads=self.threads, runs=runs)

    def with_inputs(self, inputs: dict) -> "OrtLatency":
        """A copy that times on ``inputs`` (its latency database key names their shapes)."""
        m = copy.copy(self)
        m.inputs = inputs
        m.target_key = self.target_key + input_key(inputs)
        return m

    def __call__(self, qg) -> float:
        from ..runtime import ort as rt

        sess = rt.session(qg.to_qdq(), threads=self.threads, optimize=True)
        feeds = self.inputs or rt.random_feeds(sess)
        t0 = time.perf_counter()
        for _ in range(max(1, self.warmup)):
            sess.run(None, feeds)
        one = (time.perf_counter() - t0) / max(1, self.warmup)
        # small models: at least min_seconds of samples, so a sub-millisecond model is not decided by timer noise
        repeat = int(min(max(self.repeat, np.ceil(self.min_seconds / max(one, 1e-6))), 5000))
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            ts.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(ts))


class TvmLatency:
    """Latency of the TVM-compiled integer code (hago.compile + hago.measure), locally or over RPC.

    Candidates are compiled with ``border_kernels="separate"`` and ``tune_scope="compute"`` (see
    :func:`hago.compile`): the quantize/dequantize at each float/integer border is a kernel of its own, so a float
    conv keeps the kernel it has in the all-float model and an integer conv the one it has in the all-integer model,
    and once those two models are tuned a mixed configuration needs no new tuning (its remaining new kernels are
    elementwise or requantize+concat kernels, which are not tuned). The artifact of the search's result must be
    compiled the same way (:attr:`compile_options`) to run at the measured speed."""

    name = "tvm"
    compile_options = {"border_kernels": "separate", "tune_scope": "compute"}

    def __init__(self, spec, *, tune_trials: int = 0, cache_dir: str | None = None, threads: int | None = None,
                 rpc=None, repeat: int = 20, warmup: int = 3, max_seconds: float = 4.0, keep: int = 8,
                 inputs: dict | None = None):
        """``repeat`` timed runs after ``warmup``, but a slow model stops at about ``max_seconds`` of timed runs
        (at least 5): a 500 ms model is not run 20 times per candidate. ``keep``: compiled artifacts kept, keyed
        by the QDQ model they were compiled from, so the search's final side-by-side rounds re-time a finalist
        without compiling it again. ``inputs``: ``{name: array}`` to time on (and to fix symbolic input dims
        at compile time); random inputs of the model's shapes, symbolic dims 1, when None."""
        self.inputs = inputs
        self.spec, self.tune_trials, self.cache_dir, self.threads, self.rpc, self.repeat = (
            spec, tune_trials, cache_dir, threads, rpc, repeat)
        self.warmup, self.max_seconds, self.keep = warmup, max_seconds, keep
        self._artifacts: dict[str, object] = {}  # QDQ digest -> Artifact, least recently used first
        self.compiles = 0
        self.tuned_tasks = 0  # kernels tuned while compiling candidates (0 once the ends are tuned: separate borders)
        self.tuned_names: list = []  # their names, the first few, to see what needed tuning
        tgt = json.dumps(spec.target, sort_keys=True)
        self.target_key = "tvm-" + hashlib.sha1(f"{tgt}|{rpc}|{threads}".encode()).hexdigest()[:12]
        if inputs:
            self.target_key += input_key(inputs)

    def with_inputs(self, inputs: dict) -> "TvmLatency":
        """A copy that compiles for and times on ``inputs`` (own artifact cache; database key names the shapes)."""
        return TvmLatency(self.spec, tune_trials=self.tune_trials, cache_dir=self.cache_dir, threads=self.threads,
                          rpc=self.rpc, repeat=self.repeat, warmup=self.warmup, max_seconds=self.max_seconds,
                          keep=self.keep, inputs=inputs)

    def artifact(self, qg):
        """The compiled artifact of ``qg`` (compiled once per distinct QDQ model among the last ``keep``)."""
        import hago

        key = hashlib.sha1(qg.to_qdq().SerializeToString(deterministic=True)).hexdigest()
        art = self._artifacts.pop(key, None)
        if art is None:
            shapes = {k: list(np.shape(v)) for k, v in self.inputs.items()} if self.inputs else None
            art = hago.compile(qg, self.spec, tune_trials=self.tune_trials, cache_dir=self.cache_dir,
                               threads=self.threads, progress=False, input_shapes=shapes, **self.compile_options)
            self.compiles += 1
            rep = getattr(art, "tuning", None)
            if rep is not None and rep.tuned_tasks:
                self.tuned_tasks += rep.tuned_tasks
                self.tuned_names.extend(rep.tuned_names[:max(0, 16 - len(self.tuned_names))])
        self._artifacts[key] = art
        while len(self._artifacts) > max(self.keep, 1):
            self._artifacts.pop(next(iter(self._artifacts)))
        return art

    def kernel_profile(self, qg, runs: int = 10) -> list[dict]:
        """Per-kernel time of ``qg``'s artifact (:func:`hago.backend.measure.profile`; local artifacts only):
        the rows of the latency model's :class:`KernelProfilePrior`."""
        from ..backend.measure import profile

        if self.rpc is not None:
            raise HagoError("kernel_profile: per-kernel profiles are taken locally, not over RPC")
        return profile(self.artifact(qg), self.inputs, runs=runs, threads=self.threads)

    def __call__(self, qg) -> float:
        import hago

        art = self.artifact(qg)
        repeat = self.repeat
        if self.rpc is None and self.max_seconds:  # size the timed runs by one run's time
            one = hago.measure(art, self.inputs, repeat=1, warmup=max(self.warmup - 1, 0), threads=self.threads).median_ms
            repeat = int(min(self.repeat, max(5, np.ceil(self.max_seconds * 1e3 / max(one, 1e-3)))))
        stats = hago.measure(art, self.inputs, repeat=repeat, warmup=1, threads=self.threads, rpc=self.rpc)
        return float(stats.median_ms)


def input_key(inputs: dict) -> str:
    """A short tag of the input shapes a measurer times on (part of its latency database key)."""
    shapes = "|".join(f"{k}:{'x'.join(str(d) for d in np.shape(v))}" for k, v in sorted(inputs.items()))
    return "-in" + hashlib.sha1(shapes.encode()).hexdigest()[:8]


def latency_inputs(graph, batch: dict) -> dict | None:
    """The inputs to time a model with symbolic input dims on: the first sample of ``batch`` (a calibration
    batch), so a model whose width or length is symbolic (a text recognizer) is timed at a real size, not with
    every symbolic dim bound to 1. ``None`` when no input has a symbolic dim past the batch dim (random inputs of
    the model's shapes at batch 1 are the same thing)."""
    ins = {v.name: v for v in graph.inputs}
    if all(v.shape is not None and all(isinstance(d, int) for d in list(v.shape)[1:]) for v in ins.values()):
        return None
    out = {}
    for name, v in ins.items():
        if name not in batch:
            return None
        a = np.asarray(batch[name])
        lead = v.shape[0] if v.shape is not None and len(v.shape) else None
        if a.ndim and not (isinstance(lead, int) and lead == a.shape[0]):
            a = a[:1]  # one sample (batch 1) where the batch dim is symbolic
        out[name] = np.ascontiguousarray(a)
    return out


def bound_shapes(graph: Graph, inputs: dict) -> Graph:
    """A clone of ``graph`` whose value shapes are the ones of one float run on ``inputs`` (onnxruntime): the latency
    features (MACs, border sizes) of a model with symbolic dims at the size it is timed at. Values the run does not
    produce keep their shapes."""
    import onnx_ir as ir

    from ..runtime import ort as rt

    g = graph.clone()
    vals = {v.name: v for n in g.nodes() for v in n.outputs if v is not None and v.name}
    names = list(vals)
    sess = rt.session(rt.with_outputs(g.to_onnx(), names), threads=1, optimize=False, source=g.source)
    fetch = [o.name for o in sess.get_outputs()]
    for name, arr in zip(fetch, sess.run(fetch, {k: np.asarray(v) for k, v in inputs.items()})):
        v = vals.get(name)
        if v is not None and isinstance(arr, np.ndarray):
            v.shape = ir.Shape(list(arr.shape))
    for v in g.inputs:
        if v.name in inputs:
            v.shape = ir.Shape(list(np.shape(inputs[v.name])))
    return g


def make_measurer(measure, spec, inputs: dict | None = None, **kw):
    """'onnxruntime', 'tvm', 'rpc://HOST:PORT:KEY', or any callable(QuantizedGraph) -> ms.

    ``inputs``: what to time on (:func:`latency_inputs`); a given :class:`OrtLatency` / :class:`TvmLatency` without
    inputs of its own is copied with them (the caller's object is left as it is)."""
    if callable(measure):
        if inputs and getattr(measure, "inputs", "absent") is None and hasattr(measure, "with_inputs"):
            return measure.with_inputs(inputs)
        return measure
    if measure in (None, "onnxruntime", "ort"):
        return OrtLatency(threads=kw.get("threads") or 1, inputs=inputs)
    if measure in ("tvm", "local"):
        return TvmLatency(spec, tune_trials=kw.get("tune_trials", 0), cache_dir=kw.get("cache_dir"),
                          threads=kw.get("threads"), inputs=inputs)
    if isinstance(measure, str) and measure.startswith("rpc://"):
        return TvmLatency(spec, tune_trials=kw.get("tune_trials", 0), cache_dir=kw.get("cache_dir"),
                          threads=kw.get("threads"), rpc=measure[len("rpc://"):], inputs=inputs)
    raise HagoError(f"measure={measure!r}: use 'onnxruntime', 'tvm', 'rpc://HOST:PORT:KEY' or a callable")


# ------------------------------------------------------------------------------------------------
# features and the xgboost model

_CLASSES = ("conv", "dwconv", "gemm", "other")


def _macs(node, out_shape) -> tuple[str, float]:
    def dims(shape):
        return [d if isinstance(d, int) else 1 for d in shape] if shape is not None else []

    op = node.op_type
    out = dims(out_shape)
    if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].shape is not None:
        w = dims(node.inputs[1].shape)
        group = node.attributes.get_int("group", 1)
        k = int(np.prod(w[1:])) if len(w) > 1 else 1
        cls = "dwconv" if group > 1 and group == (out[1] if len(out) > 1 else 0) else "conv"
        return cls, float(np.prod(out)) * k if out else float(k)
    if op in ("Gemm", "MatMul") and node.inputs[0] is not None and node.inputs[0].shape is not None:
        a = dims(node.inputs[0].shape)
        kdim = a[-1] if op == "MatMul" or not node.attributes.get_int("transA", 0) else a[0]
        return "gemm", float(np.prod(out)) * kdim if out else float(kdim)
    return "other", float(np.prod(out)) if out else 0.0


def _elems(v) -> float:
    dims = [d if isinstance(d, int) else 1 for d in (v.shape or [])] if v is not None else []
    return float(np.prod(dims)) if dims else 1.0


class Regions:
    """Which nodes a config really runs in integer, by partition's own rule and without cloning the graph.

    A node is integer when it is integer in the all-integer partition, the config does not keep it float, and it
    reads an integer producer's output (or cannot run in float at all): a float leader thus takes its float-capable
    followers (Relu, Reshape, Transpose, ...) to float with it, which ``cfg.float_nodes`` alone does not say.
    ``leader[n]``: the fusion leader of a fused follower (partition's ``FUSED_KEY``)."""

    def __init__(self, graph: Graph, spec):
        from ..passes.partition import FUSED_KEY, partition

        g = graph.clone()
        partition(g, spec)
        self.order = [n.name for n in g.nodes()]
        self.int_ok = {n.name for n in g.nodes() if g.region(n) == "int"}
        self.can_float, self.producers, self.leader = {}, {}, {}
        self.edges = []  # (producer or None for a graph input, consumer or None for a graph output, elements)
        for n in g.nodes():
            op = spec.op(n.op_type) if n.domain in ("", "ai.onnx") else None
            self.can_float[n.name] = bool(op is not None and op.float_signatures)
            prods = []
            for v in n.inputs:
                if v is None or v.const_value is not None:
                    continue
                p = v.producer()
                if p is None and not v.is_graph_input():
                    continue
                prods.append(p.name if p is not None else None)
                self.edges.append((p.name if p is not None else None, n.name, _elems(v)))
            self.producers[n.name] = [p for p in prods if p is not None]
            for v in n.outputs:
                if v.is_graph_output():
                    self.edges.append((n.name, None, _elems(v)))
            if n.meta.get(FUSED_KEY) and n.inputs and n.inputs[0] is not None and n.inputs[0].producer() is not None:
                p = n.inputs[0].producer().name
                self.leader[n.name] = self.leader.get(p, p)

    def __call__(self, float_nodes) -> dict[str, bool]:
        is_int: dict[str, bool] = {}
        for n in self.order:
            is_int[n] = (n in self.int_ok and n not in float_nodes
                         and (any(is_int.get(p, False) for p in self.producers[n]) or not self.can_float[n]))
        return is_int

    def boundaries(self, is_int: dict[str, bool]) -> tuple[int, float]:
        """(count, elements) of activation edges between an integer and a float node (a Q or DQ at run time)."""
        k, el = 0, 0.0
        for p, c, e in self.edges:
            if is_int.get(p, False) != is_int.get(c, False):
                k += 1
                el += e
        return k, el


_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def _profile_owner(raw: str, nodes: dict, produced: dict) -> str | None:
    """The graph node an onnxruntime profile row belongs to: onnxruntime keeps a node's name (``n12``), adds
    ``_token_<k>`` to nodes its optimizers rewrite (QLinearConv), and names NCHWc nodes after their output value
    (``r2_nchwc``: the Conv+Relu ending at value ``r2``); layout nodes it inserts (``ReorderInput``,
    ``Transpose_token_7``) belong to no graph node."""
    import re

    name = re.sub(r"(_token_\d+)+$", "", raw)
    for suf in ("_nchwc", "__Q", "__DQ"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    if name in nodes:
        return name
    return produced.get(name)


class ProfilePrior:
    """A latency prior composed from per-node profiles of the target (onnxruntime's profiler).

    Profiled configs: all-float, all-integer, and six depth patterns (:meth:`patterns`), so that each node group is
    timed inside a run of its own precision and next to the other one: a float MaxPool whose consumer is integer
    gets onnxruntime's Q moved above it and runs on uint8 in NCHW, about 20x slower than in the all-float model,
    which the two extremes alone cannot show. ``prior(cfg) = sum over node groups of time[group, own precision,
    producer's precision, any consumer integer] (falling back to fewer neighbours where that combination was not
    profiled) + Q/DQ cost per element x elements crossing int/float boundaries +
    unattributed time`` (layout nodes the runtime inserts: interpolated between the extremes by the integer share,
    plus a per-boundary-element excess learned from the mixed profiles). Groups are fusion groups (a follower's time
    goes to its leader, as onnxruntime fuses them too). The learned model corrects the residual."""

    def __init__(self, graph: Graph, regions: Regions, profiles: list[tuple[frozenset, list[dict]]]):
        """``profiles``: ``(float_nodes of the profiled config, profile rows)``; the first two must be the
        all-float and the all-integer config."""
        import re

        self.regions = regions
        nodes = {n.name for n in graph.nodes()}
        produced = {v.name: n.name for n in graph.nodes() for v in n.outputs}
        values = {}
        for n in graph.nodes():
            for v in list(n.inputs) + list(n.outputs):
                if v is not None:
                    values[v.name] = v
        # the producer group of each group (its main input's) and its consumer groups
        self.prod, self.cons = {}, {}
        for n in graph.nodes():
            x = n.inputs[0] if n.inputs else None
            p = x.producer() if x is not None else None
            self.prod[n.name] = regions.leader.get(p.name, p.name) if p is not None else None
            me = regions.leader.get(n.name, n.name)
            for v in n.outputs:
                for u in v.uses():
                    c = regions.leader.get(u.node.name, u.node.name)
                    if c != me:
                        self.cons.setdefault(me, set()).add(c)
        samples: dict[tuple, list[float]] = {}
        q_ms = q_el = 0.0
        self.u = []  # (integer share, boundary elements, unattributed ms) per profile
        for float_nodes, rows in profiles:
            is_int = regions(float_nodes)
            per: dict[str, float] = {}
            un = 0.0
            for r in rows:
                ms = float(r["ms"])
                if r.get("op") in _QDQ_OPS:  # a boundary: priced per element
                    v = values.get(re.sub(r"(_token_\d+)+$", "", r["node"]).rsplit("__", 1)[0].removesuffix("_q")
                                   .removesuffix("_dq"))
                    if v is not None:
                        q_ms, q_el = q_ms + ms, q_el + _elems(v)
                        continue
                o = _profile_owner(r["node"], nodes, produced)
                if o is None:
                    un += ms
                    continue
                o = regions.leader.get(o, o)
                per[o] = per.get(o, 0.0) + ms
            for g, ms in per.items():
                samples.setdefault(self._key(g, is_int), []).append(ms)
            self.u.append((is_int, un))
        self.time = {k: float(np.mean(v)) for k, v in samples.items()}
        own: dict[tuple, list[float]] = {}
        prod: dict[tuple, list[float]] = {}
        for (g, i, pi, _), t in self.time.items():
            own.setdefault((g, i), []).append(t)
            prod.setdefault((g, i, pi), []).append(t)
        self.own = {k: float(np.mean(v)) for k, v in own.items()}
        self.own_prod = {k: float(np.mean(v)) for k, v in prod.items()}
        self.groups = sorted({k[0] for k in self.time})
        self.q_per_elem = q_ms / q_el if q_el > 0 else 0.0
        self.u_float = self.u[0][1] if self.u else 0.0
        self.u_int = self.u[1][1] if len(self.u) > 1 else self.u_float
        ex, el = [], []
        for is_int, un in self.u[2:]:
            ex.append(un - self._interp(is_int))
            el.append(regions.boundaries(is_int)[1])
        self.layout_per_elem = max(sum(ex) / sum(el), 0.0) if el and sum(el) > 0 else 0.0

    @property
    def profiled_configs(self) -> int:
        return len(self.u)

    def _key(self, g: str, is_int: dict) -> tuple:
        """A group's time depends on its own precision and its neighbours' (onnxruntime's layout choices: NCHWc
        only inside float runs; Q moved above a float MaxPool whose consumer is integer, which then runs on uint8)."""
        return (g, is_int.get(g, False), is_int.get(self.prod.get(g), False),
                any(is_int.get(c, False) for c in self.cons.get(g, ())))

    def _time(self, g: str, is_int: dict) -> float:
        k = self._key(g, is_int)
        t = self.time.get(k)
        if t is None:
            t = self.own_prod.get(k[:3])
        if t is None:
            t = self.own.get(k[:2], 0.0)
        return t

    def _share(self, is_int) -> float:
        w_int = w_all = 0.0
        for g in self.groups:
            ti = self.own.get((g, True), 0.0)
            w_all += ti
            if is_int.get(g, False):
                w_int += ti
        return w_int / w_all if w_all > 0 else 0.0

    def _interp(self, is_int) -> float:
        s = self._share(is_int)
        return s * self.u_int + (1.0 - s) * self.u_float

    def parts(self, is_int: dict[str, bool]) -> tuple[float, float, float, float]:
        """(float-group ms, integer-group ms, boundary ms, unattributed ms) of a config's regions."""
        fl = it = 0.0
        for g in self.groups:
            i = is_int.get(g, False)
            t = self._time(g, is_int)
            if i:
                it += t
            else:
                fl += t
        _, el = self.regions.boundaries(is_int)
        return fl, it, (self.q_per_elem + self.layout_per_elem) * el, self._interp(is_int)

    def __call__(self, is_int: dict[str, bool]) -> float:
        return float(sum(self.parts(is_int)))

    @staticmethod
    def patterns(graph: Graph, space: SearchSpace) -> list[frozenset]:
        """Float-node sets by depth (longest path over candidate nodes from the inputs): even / odd depth
        (checkerboards: every node next to the other precision) and runs of two (depth mod 4 in {k, k+1}: a node
        with a float producer and an integer consumer, and the reverse), so that each group is profiled with each
        combination of its own, its producer's and its consumers' precision in a chain."""
        cand = set(space.nodes)
        depth: dict[str, int] = {}
        for n in graph.nodes():
            ps = [v.producer() for v in n.inputs if v is not None and v.producer() is not None]
            d = max((depth.get(p.name, 0) for p in ps), default=0)
            depth[n.name] = d + (1 if n.name in cand else 0)
        out = [frozenset(n for n in space.nodes if depth[n] % 2 == r) for r in (0, 1)]
        out += [frozenset(n for n in space.nodes if depth[n] % 4 in (k, (k + 1) % 4)) for k in range(4)]
        return out

    @staticmethod
    def measure(graph: Graph, space: SearchSpace, build, profile, method: str = "mse",
                regions: "Regions | None" = None, runs: int = 20) -> "ProfilePrior":
        """Profile the all-float, all-integer and the six :meth:`patterns` configs (8 profiled configs):
        ``build(cfg) -> QuantizedGraph``, ``profile(qg, runs) -> rows`` (e.g. :meth:`OrtLatency.profile`)."""
        regions = regions or Regions(graph, space.spec)
        fls = [frozenset(space.nodes), frozenset()] + ProfilePrior.patterns(graph, space)
        profs = [(fl, profile(build(Config.make({}, fl, method, space)), runs)) for fl in fls]
        return ProfilePrior(graph, regions, profs)


def _conv_key(data, weight, out) -> tuple | None:
    """A conv's identity in a kernel profile: (input channels, kernel H, W, output C, H, W). The layouts it reads:
    float NCHW kernels with OIHW weights and hago's NCHW packed int8 kernels ``[O/16, I/ib, KH, KW, ib/4, 16, 4]``
    (KH, KW at positions 2, 3 in both); on VNNI targets the NHWC int8 kernels, packed ``[O/16, KH, KW, I/4, 16, 4]``
    or depthwise HWIO ``[KH, KW, 1, C]``, with NHWC data and output. The input's height and width are left out: TVM
    may pad the input in a kernel of its own, so a conv kernel can read the padded input."""
    if len(data) != 4 or len(weight) < 4 or len(out) != 4:
        return None
    if len(weight) == 6:  # NHWC packed int8
        return tuple(int(d) for d in (data[3], weight[1], weight[2], out[3], out[1], out[2]))
    if len(weight) == 4 and weight[2] == 1 and weight[3] == data[3] == out[3] > 1 and data[1] != weight[0]:
        return tuple(int(d) for d in (data[3], weight[0], weight[1], out[3], out[1], out[2]))  # NHWC depthwise
    return tuple(int(d) for d in (data[1], weight[2], weight[3], out[1], out[2], out[3]))


class KernelProfilePrior:
    """The latency prior for TVM-compiled candidates, composed from the per-kernel profiles of two artifacts: the
    all-float and the all-integer model (:func:`hago.backend.measure.profile`).

    A candidate is compiled with separate border kernels (:class:`TvmLatency`), so a float conv runs the kernel it
    has in the all-float model and an integer conv the one it has in the all-integer model: its time is close to
    ``sum over convs of time[conv, its precision] + border cost per element x elements crossing int/float borders +
    the rest`` (pools, concats, the VM's allocations: interpolated between the two models by the integer share of
    the conv time). Conv kernels are matched to graph nodes by their shapes (input, kernel window, output); convs
    of the same shapes share their kernel's time. The border cost per element is the all-integer model's input
    quantize kernel's. Same interface as :class:`ProfilePrior` (``parts``, ``__call__``)."""

    def __init__(self, graph: Graph, regions: Regions, float_rows: list[dict], int_rows: list[dict]):
        self.regions = regions
        self.node_key: dict[str, tuple] = {}
        for n in graph.nodes():
            if n.op_type != "Conv" or len(n.inputs) < 2 or not n.outputs:
                continue
            x, w, y = n.inputs[0], n.inputs[1], n.outputs[0]
            shapes = [list(v.shape) if v is not None and v.shape is not None else None for v in (x, w, y)]
            if any(sh is None for sh in shapes):
                continue
            try:  # the batch dimension may be symbolic: the key does not use it
                k = _conv_key(*shapes)
            except (TypeError, ValueError):
                continue
            if k is not None:
                self.node_key[n.name] = k
        count: dict[tuple, int] = {}
        for k in self.node_key.values():
            count[k] = count.get(k, 0) + 1
        self.time: dict[tuple, float] = {}  # (conv key, integer?) -> ms per conv
        self.rest = [0.0, 0.0]  # ms outside matched conv kernels: float model, integer model
        self.q_per_elem = 0.0
        for i, rows in enumerate((float_rows, int_rows)):
            for r in rows:
                sh = r.get("shapes") or []
                k = _conv_key(sh[0], sh[1], sh[-1]) if len(sh) >= 3 else None
                if k is not None and k in count:
                    self.time[(k, bool(i))] = self.time.get((k, bool(i)), 0.0) + float(r["ms"]) / count[k]
                    continue
                self.rest[i] += float(r["ms"])
                if i == 1 and "border_quantize" in r["kernel"] and sh:
                    self.q_per_elem = max(self.q_per_elem, float(r["ms"]) / max(float(np.prod(sh[0])), 1.0))

    profiled_configs = 2

    def _conv_ms(self, n: str, integer: bool) -> float:
        k = self.node_key[n]
        return self.time.get((k, integer), self.time.get((k, not integer), 0.0))

    def parts(self, is_int: dict[str, bool]) -> tuple[float, float, float, float]:
        """(float conv ms, integer conv ms, border ms, the rest) of a config's regions."""
        fl = it = 0.0
        for n in self.node_key:
            if is_int.get(n, False):
                it += self._conv_ms(n, True)
            else:
                fl += self._conv_ms(n, False)
        total_i = sum(self._conv_ms(n, True) for n in self.node_key) or 1.0
        share = it / total_i
        _, el = self.regions.boundaries(is_int)
        return fl, it, self.q_per_elem * el, share * self.rest[1] + (1.0 - share) * self.rest[0]

    def __call__(self, is_int: dict[str, bool]) -> float:
        return float(sum(self.parts(is_int)))

    @staticmethod
    def measure(graph: Graph, space: SearchSpace, build, kernel_profile, method: str = "mse",
                regions: "Regions | None" = None) -> "KernelProfilePrior":
        """Profile the all-float and the all-integer configs: ``kernel_profile(qg) -> rows`` (e.g.
        :meth:`TvmLatency.kernel_profile`)."""
        regions = regions or Regions(graph, space.spec)
        rows = [kernel_profile(build(Config.make({}, fl, method, space))) for fl in (space.nodes, ())]
        return KernelProfilePrior(graph, regions, rows[0], rows[1])


class FeatureMap:
    """Config -> feature vector (fixed layout for a given graph and space)."""

    def __init__(self, graph: Graph, space: SearchSpace):
        self.space = space
        nodes = {n.name: n for n in graph.nodes()}
        self.cls, self.macs, self.size = {}, {}, {}
        for name in space.nodes:
            n = nodes[name]
            c, m = _macs(n, n.outputs[0].shape if n.outputs else None)
            self.cls[name], self.macs[name] = c, m
        # edges between candidate nodes: (producer, consumer, elements)
        self.links = []
        for n in graph.nodes():
            if n.name not in self.cls:
                continue
            for v in n.inputs:
                p = v.producer() if v is not None else None
                if p is not None and p.name in self.cls:
                    shape = [d if isinstance(d, int) else 1 for d in (v.shape or [])]
                    self.links.append((p.name, n.name, float(np.prod(shape)) if shape else 1.0))
        self.names = list(space.nodes)
        # appended: MACs behind bSPARQ / vSPARQ edges, extra multipoint MACs, per-tensor weights, MACs on other signatures
        self.out_elems = {}
        for name in space.nodes:
            shape = nodes[name].outputs[0].shape if nodes[name].outputs else None
            dims = [d if isinstance(d, int) else 1 for d in (shape or [])]
            self.out_elems[name] = float(np.prod(dims)) if dims else 1.0
        self.regions = Regions(graph, space.spec)
        self.prior: ProfilePrior | None = None  # set_prior: the profile-composed prior (onnxruntime measurers)
        self.base_dim = len(self.names) + 2 * len(_CLASSES) + 4 + 5 + 1
        # appended: boundaries of the real regions (count, elements), and the prior (total, float part, int part)
        self.prior_index = self.base_dim + 2
        self.dim = self.base_dim + 5

    def set_prior(self, prior: "ProfilePrior | None") -> None:
        self.prior = prior

    def __call__(self, cfg: Config) -> np.ndarray:
        fl = cfg.float_nodes
        f = np.zeros(self.dim, dtype=np.float64)
        for i, n in enumerate(self.names):
            f[i] = 0.0 if n in fl else 1.0
        base = len(self.names)
        for n in self.names:
            j = _CLASSES.index(self.cls[n])
            f[base + (len(_CLASSES) if n in fl else 0) + j] += self.macs[n] / 1e6
        k = base + 2 * len(_CLASSES)
        cross = [(s) for p, c, s in self.links if (p in fl) != (c in fl)]
        f[k] = len(cross)
        f[k + 1] = sum(cross) / 1e3
        b = cfg.bits_dict()
        f[k + 2] = np.mean([b.get(e.name, e.max) for e in self.space.edges]) if self.space.edges else 8
        f[k + 3] = sum(1 for n in self.names if n not in fl)
        for e, choice in cfg.sparq:
            cons = [n for n in self.space.sparq_consumers.get(e, ()) if n not in fl]
            m = sum(self.macs.get(n, 0.0) for n in cons) / 1e6
            f[k + (5 if sparq_mode(choice)[0] == "vsparq" else 4)] += m
        for n, choice in cfg.multipoint:
            if n not in fl:
                pts = MULTIPOINT_BUDGET if choice == "adaptive" else float(choice)
                f[k + 6] += self.macs.get(n, 0.0) * (pts - 1.0) / 1e6
        f[k + 7] = len(cfg.per_tensor)
        f[k + 8] = sum(self.macs.get(n, 0.0) for n, _ in cfg.signatures if n not in fl) / 1e6
        f[k + 9] = sum(self.out_elems[n] for n in self.names if n not in fl) / 1e4  # activations written in int8
        is_int = self.regions(fl)
        nb, el = self.regions.boundaries(is_int)
        d = self.base_dim
        f[d], f[d + 1] = nb, el / 1e3
        if self.prior is not None:  # 0 without one (TVM latency): a constant column, the model works as before
            pf, pi, pq, pu = self.prior.parts(is_int)
            f[d + 2], f[d + 3], f[d + 4] = pf + pi + pq + pu, pf, pi
        return f


SPARQ_SOURCE = ("Shomron et al., Post-Training Sparsity-Aware Quantization, NeurIPS 2021: 4-bit x 8-bit multipliers "
                "behind a shifter give about 2x the throughput of 8-bit MACs; a vSPARQ pair that takes the 8-bit path "
                "costs like 8-bit")


class SparqLatencyTerm:
    """The modeled SPARQ speed-up (no SPARQ kernel exists: the numbers are the paper's, not measurements).

    ``latency = measured_8bit * (1 - sum_n share_n * (1 - cost_n))`` where ``measured_8bit`` is the measured
    latency of the same configuration with plain 8-bit activations, ``share_n`` is multiplier node ``n``'s share of
    the model's MACs (each node's time taken proportional to its MACs; non-MAC ops count their output elements),
    and ``cost_n`` the relative cost of its MACs behind a SPARQ edge: ``1/speedup`` for bSPARQ, and
    ``f8 + (1 - f8)/speedup`` for vSPARQ with ``f8`` the fraction of activation pairs taking the 8-bit path.
    ``speedup`` is the spec's ``sparq.speedup`` (2.0 by default, the paper's figure). Active only when the
    spec declares SPARQ and the measurer has no SPARQ kernel (``measurer.sparq_kernel``)."""

    def __init__(self, graph: Graph, space: SearchSpace, spec, measurer=None):
        self.speedup = float((spec.sparq or {}).get("speedup", 2.0)) if spec.sparq else 1.0
        self.kernel = bool(getattr(measurer, "sparq_kernel", False))
        self.declared = bool(spec.sparq)
        self.active = self.declared and not self.kernel and self.speedup > 0
        self.consumers = dict(space.sparq_consumers)
        self.macs = {}
        for n in graph.nodes():
            self.macs[n.name] = _macs(n, n.outputs[0].shape if n.outputs else None)[1]
        self.total = sum(self.macs.values()) or 1.0
        self.f8: dict[str, float] = {}  # last known fraction of 8-bit-path pairs per edge (for predictions)

    def cost(self, mode: str, f8: float) -> float:
        if mode == "vsparq":
            return f8 + (1.0 - f8) / self.speedup
        return 1.0 / self.speedup

    def saved_fraction(self, cfg: Config, applied: dict | None = None) -> float:
        """Fraction of the 8-bit latency the config's SPARQ edges save. ``applied``: ``{edge: {"mode",
        "frac_8bit_pairs"}}`` as built (default: the config's choices with the last known pair statistics)."""
        if not self.active or not cfg.sparq:
            return 0.0
        if applied is None:
            applied = {e: {"mode": sparq_mode(c)[0], "frac_8bit_pairs": self.f8.get(e, 1.0)} for e, c in cfg.sparq}
        pts = {n: (MULTIPOINT_BUDGET if c == "adaptive" else float(c)) for n, c in cfg.multipoint if n not in cfg.float_nodes}
        total = self.total + sum(self.macs.get(n, 0.0) * (p - 1.0) for n, p in pts.items())
        saved = 0.0
        for e, d in applied.items():
            c = self.cost(d.get("mode", "bsparq"), float(d.get("frac_8bit_pairs", 1.0)))
            for n in self.consumers.get(e, ()):
                if n not in cfg.float_nodes:
                    saved += self.macs.get(n, 0.0) * pts.get(n, 1.0) / total * (1.0 - c)
        return min(max(saved, 0.0), 0.95)

    def adjust(self, ms: float, cfg: Config, applied: dict | None = None) -> float:
        return float(ms) * (1.0 - self.saved_fraction(cfg, applied))

    def describe(self) -> dict:
        if not self.declared:
            return {}
        if self.kernel:
            return {"modeled": False, "note": "SPARQ latency measured with the measurer's SPARQ kernel"}
        return {"modeled": True, "speedup": self.speedup, "source": SPARQ_SOURCE,
                "note": "SPARQ speed-up is modeled, not measured: no SPARQ kernel exists for this target; a SPARQ "
                        "trial's latency is the measured latency of the same configuration with plain 8-bit "
                        "activations, reduced by the modeled MAC savings (each layer's time taken proportional to "
                        "its MACs)"}


class LatencyModel:
    """Latency model: a ridge regression of latency on the config features (latency is close to additive over
    layers, so this is right with few measurements), plus xgboost trees on its log-residuals (what is not
    additive: fusion, cache effects, layout changes at int/float borders). With a profile prior
    (``fit(..., prior_col=)``) the prior and the intercept are unpenalized and trees wait for 100 measurements."""

    def __init__(self, seed: int = 0, ridge: float = 1e-3, min_tree_samples: int = 30):
        self.seed, self.ridge, self.min_tree_samples = seed, ridge, min_tree_samples
        self.model = None
        self.coef = None
        self.n = 0

    def _design(self, X):
        X = np.asarray(X, dtype=np.float64)
        return np.hstack([X, np.ones((len(X), 1))])

    def fit(self, X: np.ndarray, y_ms: np.ndarray, prior_col: int | None = None) -> "LatencyModel":
        """``prior_col``: the column of a latency prior (:class:`ProfilePrior`); when it varies over the
        measurements, it and the intercept are left unpenalized (latency ~ a * prior + b) and the ridge only
        corrects the prior's residual, with strengths up to shutting the correction off."""
        import xgboost as xgb

        A = self._design(X)
        y = np.asarray(y_ms, dtype=np.float64)
        self.mu = A.mean(axis=0)
        self.sd = A.std(axis=0) + 1e-9
        self.sd[-1] = 1.0
        self.mu[-1] = 0.0
        An = (A - self.mu) / self.sd
        # ridge strength by leave-one-out cross-validation (closed form through the hat matrix): with fewer
        # measurements than features a fixed strength either overfits the per-node indicators or washes out
        # the additive MAC terms
        best = None
        eye = np.eye(An.shape[1])
        lams = (self.ridge, 1e-2, 1e-1, 1.0, 10.0)
        self.prior_col = None
        if prior_col is not None and len(y) >= 3 and np.std(A[:, prior_col]) > 1e-9:
            self.prior_col = prior_col
            eye[prior_col, prior_col] = 0.0
            eye[-1, -1] = 0.0
            lams = lams + (100.0, 1e4)
        for lam in lams:
            inv = np.linalg.solve(An.T @ An + lam * len(y) * eye, An.T)
            coef = inv @ y
            h = np.einsum("ij,ji->i", An, inv)
            loo = (y - An @ coef) / np.maximum(1.0 - h, 1e-6)
            err = float(np.mean(loo ** 2))
            if best is None or err < best[0]:
                best = (err, lam, coef)
        _, self.lam, self.coef = best
        base = np.maximum(An @ self.coef, 1e-6)
        resid = np.log(y) - np.log(base)
        self.n = len(y)
        self.model = None
        # trees on the residuals only once there is data for them; with a profile prior the residual is small and
        # trees fit on a few dozen points added noise (held-out rank correlation fell on squeezenet and shufflenet)
        min_trees = self.min_tree_samples if self.prior_col is None else max(self.min_tree_samples, 100)
        if self.n >= min_trees:
            self.model = xgb.XGBRegressor(n_estimators=120, max_depth=3, learning_rate=0.05, subsample=1.0,
                                          random_state=self.seed, n_jobs=1, verbosity=0)
            self.model.fit(np.asarray(X), resid)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise HagoError("the latency model is not trained yet")
        An = (self._design(X) - self.mu) / self.sd
        base = np.maximum(An @ self.coef, 1e-6)
        return base * (np.exp(self.model.predict(np.asarray(X))) if self.model is not None else 1.0)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).correlation)


class LatencyDB:
    """Measured latencies per (target, model) in a JSON-lines file, so later searches start warm."""

    def __init__(self, root: str | None, target_key: str, model_hash: str):
        root = root or os.path.join(os.path.expanduser("~"), ".cache", "hago", "latency")
        self.path = os.path.join(root, target_key, f"{model_hash}.jsonl")
        self.rows: dict[str, float] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                        self.rows[r["key"]] = float(r["latency_ms"])
                    except (ValueError, KeyError):
                        continue  # a torn last line after a kill

    def get(self, cfg: Config):
        return self.rows.get(cfg.key())

    def add(self, cfg: Config, ms: float) -> None:
        self.rows[cfg.key()] = ms
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": cfg.key(), "config": cfg.to_dict(), "latency_ms": ms}) + "\n")
