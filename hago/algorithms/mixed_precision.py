"""Mixed precision whose calibration loss is not above fp32 (Cheng and Chen, arXiv 2207.10083), with the
layer-input-error layout of the companion paper (arXiv 2202.05137) and a Hessian-style layout as baselines.

Quantization is treated as noise on each layer's input. With ``x_l`` the input
of layer ``l`` and ``e_l(b) = Q_b(x_l) - x_l`` its quantization noise at ``b``
bits, a second-order expansion of the loss gives

    L(x + e) - L(x)  ~=  sum_l [ g_l . e_l(b_l)  +  1/2 e_l(b_l)^T H_l e_l(b_l) ]

(the cross terms between layers are dropped; the papers argue that the noise on
layer inputs, not on parameters, dominates). The first-order term can be
*negative*: some noise lowers the loss. Choosing per-layer precisions whose
contributions sum to at most zero gives a quantized model whose loss on the data
is not above the fp32 model's, sometimes below. hago solves the layout as the
follow-up paper frames it, a multiple-choice knapsack: minimise the precision
cost ``sum_l bits_l x size_l`` subject to ``sum_l Delta_l(b_l) <= 0``, exactly,
by branch and bound. The solution is then *measured* (all layers quantized
together); when the dropped interactions push it above fp32, the constraint is
tightened by the excess and solved again, then precisions are raised greedily,
and finally layers fall back to float (which the paper allows: the all-float
model meets the constraint trivially). The result says honestly which of these
happened. With ``refine=True`` (hago's addition) the verified layout is then
lowered further, layer by layer in order of increasing Delta, while the measured
loss stays <= fp32.

Estimating the terms without autodiff: the quantized model is built once with
every quantizer mixed as ``x + t * (Q(x) - x)`` (:class:`hago.algorithms.lapq.ParamModel`
with ``mix=True``). Setting ``t = +1`` and ``t = -1`` on one layer (its input and
the weights of the ops reading it) and 0 elsewhere, central differences give

    g . e  = (L(+1) - L(-1)) / 2        e^T H e = L(+1) + L(-1) - 2 L(0)

exactly for the quadratic model, two onnxruntime runs per layer and precision.
``method="first_order"`` uses ``g . e`` alone, ``"second_order"`` (default)
``g . e + e^T H e / 2``.

Baselines (each a greedy layout under the same measured constraint, lowering the
layer with the lowest score first and keeping the step only when the measured
loss stays <= fp32): ``"input_error"`` ranks by the relative quantization error of
the layer's input, ``||e_l||^2 / ||x_l||^2`` (2202.05137's criterion);
``"hessian"`` by the curvature along the *weight* quantization noise,
``e_W^T H_W e_W`` (a HAWQ-style parameter criterion: measured the same way once per
layer at the lowest precision, scaled by the weight noise power of each precision).

A "layer" here is a root activation edge (an edge entering integer ops, with the
edges tied to it) together with the weights of the Conv/Gemm/MatMul nodes that
read it. With ``units="weighted"`` only the inputs of Conv/Gemm/MatMul nodes are
layers, as in the paper, and each carries the quantized edges after its layer up to
the next one (activation functions, residual adds, the pieces of a decomposed
HardSwish or LayerNorm): on PP-OCRv4 rec this is 47 layers instead of 287 edges. Deviation, documented: the full text of 2207.10083 could not be read
from this machine; the layout follows the summaries of both papers and of the
ICLR 2023 follow-up (knapsack / branch and bound); details such as their exact
cost model may differ.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Sequence

import numpy as np

from ..errors import HagoError
from ..ir.annotation import fake_quantize
from ..ir.graph import REASON_KEY, REGION_KEY, Fallback, Graph
from .lapq import LossEvaluator, ParamModel, make_loss, stack_batches

__all__ = ["select_precision", "MixedPrecisionResult", "apply", "search_strategy", "METHODS"]

METHODS = ("second_order", "first_order", "input_error", "hessian")
FLOAT = "float"


@dataclasses.dataclass
class _Option:
    key: object  # activation bits (int) or "float"
    act_bits: int | None
    weight_bits: dict  # weight edge -> bits
    cost: float
    feeds: dict  # ParamModel feeds of the unit's groups, t = 1


@dataclasses.dataclass
class _Unit:
    name: str  # root activation edge (the layer input)
    groups: list  # ParamModel groups: the root, then the unit's weights
    edges: list  # activation edges (root and tied)
    weights: list  # weight edges of the ops reading the root or its tied edges
    nodes: list  # those ops
    size: float
    options: list  # _Option, highest precision first


@dataclasses.dataclass
class MixedPrecisionResult:
    """A precision per layer input, its measured calibration loss against fp32, and how it was found."""

    bits: dict  # edge -> bits (activations and weights); None = float
    unit_bits: dict  # layer input edge -> bits or "float"
    float_nodes: list
    fp32_loss: float
    quant_loss: float
    feasible: bool  # quant_loss <= fp32_loss
    fallback: str | None  # None | "tightened" | "raised" | "float"
    method: str
    loss: str
    predicted_delta: float
    avg_bits: float  # size-weighted precision (float = 32)
    max_bits_loss: float  # all layers at their highest candidate
    min_loss: float  # measured loss of the layout taking each layer's lowest-Delta option
    sensitivities: dict  # unit -> {option: {"first", "second", "delta", "input_error", "hessian"}}
    evals: int  # loss evaluations in all
    sensitivity_evals: int  # of them, measuring the per-layer sensitivities (0 with ``reuse``)
    seconds: float
    history: list  # (what, loss) of every measured layout
    spec_name: str
    _base: object = dataclasses.field(default=None, repr=False)  # (graph at max bits, spec, options, ranges)

    @property
    def improvement(self) -> float:
        """fp32 loss minus the selection's loss (positive: lower loss than fp32)."""
        return self.fp32_loss - self.quant_loss

    def report(self) -> str:
        lines = [f"mixed precision ({self.method}, {self.loss} loss, spec {self.spec_name}): calibration loss "
                 f"fp32 {self.fp32_loss:.5f}, selection {self.quant_loss:.5f} "
                 f"({'<=' if self.feasible else '>'} fp32), all-max {self.max_bits_loss:.5f}, lowest-Delta layout "
                 f"{self.min_loss:.5f}; average {self.avg_bits:.2f} bits; predicted Delta {self.predicted_delta:+.5f}"
                 + (f"; fallback: {self.fallback}" if self.fallback else "") + f"; {self.evals} evaluations, "
                 f"{self.seconds:.1f} s"]
        lines.append(f"  {'layer input':<48}{'bits':>6}  " + "  ".join(
            f"{'b=' + str(k):>26}" for k in self._option_keys()))
        for u, b in self.unit_bits.items():
            cells = []
            for k in self._option_keys():
                s = self.sensitivities.get(u, {}).get(k)
                cells.append(f"{'-':>26}" if s is None else
                             f"g.e {s['first']:+.4f} eHe {s['second']:+.4f}".rjust(26))
            lines.append(f"  {u[-47:]:<48}{str(b):>6}  " + "  ".join(cells))
        return "\n".join(lines)

    def _option_keys(self):
        keys = []
        for d in self.sensitivities.values():
            for k in d:
                if k not in keys:
                    keys.append(k)
        return keys

    def to_config(self, space=None, method: str = "mse"):
        """The selection as a :class:`hago.search.space.Config` (bits per edge, float nodes)."""
        from ..search.space import Config

        bits = {e: b for e, b in self.bits.items() if b is not None}
        return Config.make(bits, self.float_nodes, method, space)

    def apply(self):
        """The selection as a :class:`hago.QuantizedGraph` (no calibration data needed)."""
        return apply(self)


# ---------------------------------------------------------------------------------------------
# units and options
# ---------------------------------------------------------------------------------------------

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


UNITS = ("all", "weighted")


def _units(g: Graph, pm: ParamModel, spec, candidates, allow_float: bool, observers: dict,
           units_mode: str = "all") -> list[_Unit]:
    from ..calibrate.observers import weight_range
    from ..passes.partition import bit_limits

    limits = bit_limits(g, spec)
    anns = pm.anns
    units: dict[str, _Unit] = {}
    for gname, grp in pm.groups.items():
        if grp.kind != "activation" or grp.ann.fixed:
            continue
        units[gname] = _Unit(gname, [gname], list(grp.edges), [], [], 0.0, [])
    for gname, grp in pm.groups.items():
        if grp.kind != "weight" or grp.ann.fixed:
            continue
        v = g.value(gname)
        for use in v.uses():
            node = use.node
            x = node.inputs[0]
            if x is not None and x.name in pm.edge_group and pm.edge_group[x.name] in units:
                u = units[pm.edge_group[x.name]]
                if gname not in u.weights:
                    u.weights.append(gname)
                    u.groups.append(gname)
                if node.name not in u.nodes:
                    u.nodes.append(node.name)
                break
    for u in units.values():
        for e in u.edges:
            for use in g.value(e).uses():
                if use.node.op_type in COMPUTE_OPS and use.idx == 0 and use.node.name not in u.nodes:
                    u.nodes.append(use.node.name)
    if units_mode == "weighted":
        units = _merge_into_weighted(g, pm, units)
    for u in units.values():
        acts = [gr for gr in u.groups if gr not in u.weights]
        u.size = sum(_act_size(g, a) for a in acts) + sum(float(Graph.const(g.value(w)).size) for w in u.weights)
        lo = max(limits.get(e, (2, 32))[0] for e in u.edges)
        hi = min(limits.get(e, (2, 32))[1] for e in u.edges)
        seen = set()
        cands = sorted({int(b) for b in candidates}, reverse=True)
        for b in cands:
            ab = min(max(b, lo), hi)
            wb = {}
            for w in u.weights:
                wl, wh = limits.get(w, (2, 32))
                wb[w] = min(max(b, wl), wh)
            key = (ab, tuple(sorted(wb.items())))
            if key in seen:
                continue
            seen.add(key)
            feeds, ranges = {}, {}
            for a in acts:
                ra = anns[a].copy(bits=ab)
                lo_r, hi_r = observers[a].range(ra.method, ra)
                feeds.update(pm.range_feeds(a, lo_r, hi_r, ra))
                ranges[a] = (lo_r, hi_r)
            for w in u.weights:
                aw = anns[w].copy(bits=wb[w])
                r = weight_range(Graph.const(g.value(w)), aw, aw.method)
                feeds.update(pm.range_feeds(w, r[0], r[1], aw))
                ranges[w] = r
            label = ab if ab not in [o.key for o in u.options] else f"{ab}/w{min(wb.values(), default=ab)}"
            opt = _Option(label, ab, wb, ab * u.size, feeds)
            opt.ranges = ranges
            u.options.append(opt)
        if allow_float:
            opt = _Option(FLOAT, None, {w: None for w in u.weights}, 32.0 * u.size, {})
            opt.ranges = {}
            u.options.append(opt)
    return list(units.values())


def _act_size(g: Graph, name: str) -> float:
    shape = g.value(name).shape
    return float(np.prod([d for d in shape if isinstance(d, int)][1:])) if shape is not None else 1.0


def _merge_into_weighted(g: Graph, pm: ParamModel, units: dict) -> dict:
    """``units="weighted"``: a layer is a Conv/Gemm/MatMul with its input, its weights and the quantized
    edges of the ops after it up to the next weighted layer (activation functions, residual adds, the
    pieces of a decomposed HardSwish or LayerNorm). Each activation unit without weights joins the
    weighted unit that owns its producer (ownership flows forward through the graph from each weighted
    op); an edge with no owner upstream (before the first weighted op) joins the first weighted unit
    below it. A unit that reaches no weighted op stays on its own."""
    weighted = {n: u.name for u in units.values() if u.weights for n in u.nodes}
    if not weighted:
        return units
    owner: dict[str, str] = {}  # node name -> unit
    for n in g.nodes():
        if n.name in weighted:
            owner[n.name] = weighted[n.name]
            continue
        for x in n.inputs:
            p = x.producer() if x is not None else None
            if p is not None and p.name in owner:
                owner[n.name] = owner[p.name]
                break

    def downstream(v) -> str | None:
        frontier, seen = [v], set()
        while frontier:
            nxt = []
            for val in frontier:
                for use in val.uses():
                    n = use.node
                    if n.name in seen:
                        continue
                    seen.add(n.name)
                    if n.name in weighted:
                        return weighted[n.name]
                    nxt.extend(n.outputs)
            frontier = nxt
        return None

    out = {k: u for k, u in units.items() if u.weights}
    for k, u in units.items():
        if u.weights:
            continue
        v = g.value(u.name)
        p = v.producer()
        target = owner.get(p.name) if p is not None else None
        if target is None and p is None:  # a constant operand: the owner of the op it feeds
            target = next((owner[use.node.name] for use in v.uses() if use.node.name in owner), None)
        if target is None:
            target = downstream(v)
        if target is None:
            out[k] = u
            continue
        t = out[target]
        t.groups.append(u.name)
        t.edges.extend(e for e in u.edges if e not in t.edges)
        t.nodes.extend(n for n in u.nodes if n not in t.nodes)
    return out


def _knapsack(items: list[list[tuple[float, float]]], budget: float, node_limit: int = 500_000):
    """Choose one option per item minimising total cost with total delta <= budget (branch and bound).

    ``items[i]`` lists ``(cost, delta)``. Returns ``(choice indices, cost, delta, exact)`` or None when no
    choice meets the budget. Deterministic.
    """
    n = len(items)
    order = sorted(range(n), key=lambda i: -(max(d for _, d in items[i]) - min(d for _, d in items[i])))
    opts = [sorted(range(len(items[i])), key=lambda k: (items[i][k][0], items[i][k][1])) for i in order]
    min_d = [min(d for _, d in items[i]) for i in order]
    min_c = [min(c for c, _ in items[i]) for i in order]
    suf_d = np.concatenate([np.cumsum(min_d[::-1])[::-1], [0.0]])
    suf_c = np.concatenate([np.cumsum(min_c[::-1])[::-1], [0.0]])
    if suf_d[0] > budget + 1e-15:
        return None
    best = {"cost": np.inf, "choice": None, "delta": None}
    visited = [0]
    choice = [0] * n
    eps = 1e-12

    def dfs(i: int, cost: float, delta: float) -> None:
        visited[0] += 1
        if visited[0] > node_limit:
            return
        if cost + suf_c[i] >= best["cost"] - eps:
            return
        if delta + suf_d[i] > budget + 1e-15:
            return
        if i == n:
            best["cost"], best["delta"], best["choice"] = cost, delta, list(choice)
            return
        it = items[order[i]]
        for k in opts[i]:
            choice[i] = k
            dfs(i + 1, cost + it[k][0], delta + it[k][1])

    dfs(0, 0.0, 0.0)
    if best["choice"] is None:
        return None
    out = [0] * n
    for pos, i in enumerate(order):
        out[i] = best["choice"][pos]
    return out, best["cost"], best["delta"], visited[0] <= node_limit


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------

def _prepare(graph_or_qg, spec, calib, *, calib_method, weight_method, per_channel, threads):
    from ..hwspec import load_spec
    from ..pipeline import QuantizedGraph, quantize

    if isinstance(graph_or_qg, QuantizedGraph):
        qg = graph_or_qg
        spec = qg.spec if spec is None else load_spec(spec)
    else:
        if spec is None:
            raise HagoError("select_precision: give the hardware spec (path, name or HardwareSpec) for a float graph")
        qg = quantize(graph_or_qg, spec, calib, method=calib_method, weight_method=weight_method,
                      per_channel=per_channel, sparq=None, threads=threads)
        spec = qg.spec
    return qg, spec


def select_precision(graph_or_qg, spec=None, calib: Iterable[dict] | None = None, *,
                     candidates: Sequence[int] = (4, 6, 8), method: str = "second_order", allow_float: bool = True,
                     loss=None, calib_method: str = "mse", weight_method: str = "mse", per_channel: bool = True,
                     max_repairs: int = 4, max_samples: int | None = None, seed: int = 0, observers: dict | None = None,
                     hessian: bool = False, reuse: "MixedPrecisionResult | None" = None, refine: bool = True,
                     units: str = "all", threads: int | None = None,
                     verbose: bool = False) -> MixedPrecisionResult:
    """Per-layer precision from layer-input noise sensitivity, with calibration loss not above fp32.

    ``graph_or_qg``: a float graph (path, ModelProto, :class:`hago.Graph`; it is
    quantized for ``spec`` with ``calib_method``/``weight_method`` at the
    spec's maximum bits first) or a :class:`hago.QuantizedGraph` (its
    annotations and methods are the starting point; it is not modified).
    ``candidates``: bits per layer input (clamped to the spec's limits per
    edge; weights of the layer get the same bits, clamped to theirs); with
    ``allow_float`` a layer may also stay float. ``method``: ``"second_order"``
    (g.e + e'He/2, the default), ``"first_order"`` (g.e) -- both solved as a
    knapsack -- or the greedy baselines ``"input_error"`` and ``"hessian"``.
    ``loss``: cross-entropy against the batches' ``label`` arrays by default,
    without labels cross-entropy against the fp32 model's top-1
    (``"pseudo_ce"``); ``"kl"`` (KL to fp32, >= 0 = its fp32 value, so only the
    float model meets the constraint), ``"mse"`` or a function as in
    :func:`hago.algorithms.lapq.lapq`. ``max_samples`` draws that many calibration
    samples at random with ``seed``. ``hessian=True`` also measures the
    weight-curvature terms the ``"hessian"`` baseline ranks by. ``reuse``: a
    previous result on the same model, spec, candidates and data whose
    measured sensitivities are taken instead of measured again (to compare
    methods cheaply). ``refine`` (knapsack methods): once the layout is
    verified <= fp32, keep lowering precisions in order of increasing Delta while
    the measured loss stays <= fp32 (hago's addition to the paper's layout; the
    prediction ignores the interactions between layers, so its layout is
    conservative after the repairs). Returns a :class:`MixedPrecisionResult`;
    :func:`apply` turns it into a QuantizedGraph. ``units``: ``"all"`` (default) makes every
    quantized activation edge a layer input of its own; ``"weighted"`` makes the inputs of the
    Conv/Gemm/MatMul layers the units, each carrying the quantized edges after its layer up to the next one
    (the paper's layers; on a transformer-style model it cuts the sensitivity measurements several-fold).
    """
    from ..calibrate import activation_edges, collect_stats
    from ..runtime import ort as rt

    if method not in METHODS:
        raise HagoError(f"method={method!r}: use one of {', '.join(METHODS)}")
    if units not in UNITS:
        raise HagoError(f"units={units!r}: use one of {', '.join(UNITS)}")
    if not candidates or any(not isinstance(b, (int, np.integer)) or not 2 <= int(b) <= 16 for b in candidates):
        raise HagoError(f"candidates={tuple(candidates)!r}: give integer bit-widths in 2..16, e.g. (4, 6, 8)")
    t_start = time.perf_counter()
    qg, spec = _prepare(graph_or_qg, spec, calib, calib_method=calib_method, weight_method=weight_method,
                        per_channel=per_channel, threads=threads)
    g = qg.graph.clone()
    data, labels = stack_batches(calib, g.input_names)
    n_all = len(next(iter(data.values())))
    if max_samples and max_samples < n_all:
        idx = np.sort(np.random.RandomState(seed).choice(n_all, max_samples, replace=False))
        data = {k: v[idx] for k, v in data.items()}
        labels = labels[idx] if labels is not None else None
    loss_name, loss_fn = make_loss(loss, labels is not None, unlabeled="pseudo_ce")
    act_names = [v.name for v, _ in activation_edges(g)]
    if observers is None or any(observers.get(n) is None or observers[n].hist is None for n in act_names):
        batches = [{k: v[i:i + 256] for k, v in data.items()} for i in range(0, len(next(iter(data.values()))), 256)]
        observers = collect_stats(g, batches, act_names, histogram=True, threads=threads)
    pm = ParamModel(g, mix=True, threads=threads)
    ref = rt.run(rt.session(g.to_onnx(), threads=threads, source=g.source), data)
    ev = LossEvaluator(pm, data, labels, loss_fn, ref)
    units = _units(g, pm, spec, candidates, allow_float, observers, units_mode=units)
    if not units:
        raise HagoError(f"{g.source}: no quantized layer inputs to choose precisions for")
    base = pm.params_from_annotations()
    for k in [k for k in base if k.endswith("__t")]:
        base[k] = np.array(0.0, np.float32)
    history: list[tuple[str, float]] = []

    def feeds_for(layout: dict, scale: dict | None = None, weights_only: bool = False) -> dict:
        """layout: unit -> option index; scale: unit -> t (default 1)."""
        f = dict(base)
        for u in units:
            k = layout.get(u.name)
            if k is None:
                continue
            opt = u.options[k]
            if opt.key == FLOAT:
                continue
            f.update(opt.feeds)
            t = (scale or {}).get(u.name, 1.0)
            for gname in u.groups:
                on = (gname in u.weights) or not weights_only
                f[f"{gname}__t"] = np.array(t if on else 0.0, np.float32)
        return f

    def measure(layout: dict, what: str) -> float:
        val = ev(feeds_for(layout))
        history.append((what, val))
        return val

    fp32_loss = ev(dict(base))  # every t = 0: the float network through the same engine
    history.append(("fp32", fp32_loss))

    # -- sensitivities ------------------------------------------------------------------------------
    sens: dict[str, dict] = {}
    act_of = {}
    if reuse is None:
        acts = rt.run(rt.session(rt.with_outputs(g.to_onnx(), [u.name for u in units]), threads=threads,
                                 source=g.source), data, [u.name for u in units])
        act_of = dict(zip([u.name for u in units], acts))
    if reuse is not None:
        want = {u.name: [o.key for o in u.options] for u in units}
        have = {u: list(d) for u, d in reuse.sensitivities.items()}
        if want != have:
            raise HagoError("select_precision(reuse=...): the previous result has other layers or candidates")
        if method == "hessian" and not any(s.get("hessian") for d in reuse.sensitivities.values() for s in d.values()):
            raise HagoError("select_precision(method='hessian', reuse=...): the previous result was measured without "
                            "hessian=True")
        sens = {u: {k: dict(v) for k, v in d.items()} for u, d in reuse.sensitivities.items()}
    if verbose and reuse is None:
        n_opts = sum(1 for u in units for o in u.options if o.key != FLOAT)
        print(f"mixed precision: {len(units)} layer inputs ({sum(1 for u in units if u.weights)} with weights), "
              f"{n_opts} quantized options: {2 * n_opts} loss evaluations for the sensitivities")
    for u in units if reuse is None else ():
        sens[u.name] = {}
        x = act_of[u.name]
        xn = float(np.mean(x.astype(np.float64) ** 2)) + 1e-30
        for k, opt in enumerate(u.options):
            if opt.key == FLOAT:
                sens[u.name][FLOAT] = {"first": 0.0, "second": 0.0, "delta": 0.0, "input_error": 0.0, "hessian": 0.0}
                continue
            fp = ev(feeds_for({u.name: k}, {u.name: 1.0}))
            fm = ev(feeds_for({u.name: k}, {u.name: -1.0}))
            first = (fp - fm) / 2.0
            second = fp + fm - 2.0 * fp32_loss
            ann = pm.anns[u.name].copy(bits=opt.act_bits)
            lo, hi = opt.ranges[u.name]
            ann.set_range(lo, hi)
            ie = float(np.mean((fake_quantize(x, ann).astype(np.float64) - x) ** 2)) / xn
            s = {"first": first, "second": second, "delta": first + second / 2.0, "input_error": ie, "hessian": 0.0}
            sens[u.name][opt.key] = s
        if (method == "hessian" or hessian) and u.weights:
            # HAWQ-style: the curvature along the weight noise, measured once (at the lowest precision), times the
            # weight noise power of each precision relative to it
            ks = [k for k, o in enumerate(u.options) if o.key != FLOAT]
            kl = ks[-1]
            hp = ev(feeds_for({u.name: kl}, {u.name: 1.0}, weights_only=True))
            hm = ev(feeds_for({u.name: kl}, {u.name: -1.0}, weights_only=True))
            curv = hp + hm - 2.0 * fp32_loss
            power = {k: _weight_noise(g, pm, u, u.options[k]) for k in ks}
            for k in ks:
                sens[u.name][u.options[k].key]["hessian"] = curv * power[k] / max(power[kl], 1e-30)
        if verbose:
            print(f"mixed precision: {u.name}: " + ", ".join(
                f"{k}: g.e {v['first']:+.4g} eHe {v['second']:+.4g}" for k, v in sens[u.name].items()))

    sensitivity_evals = ev.evals - 1  # less the fp32 evaluation

    def delta(u: _Unit, k: int) -> float:
        s = sens[u.name][u.options[k].key]
        return s["first"] if method == "first_order" else s["delta"]

    max_layout = {u.name: 0 for u in units}
    max_loss = measure(max_layout, "all max bits")
    min_layout = {u.name: int(np.argmin([delta(u, k) for k in range(len(u.options))])) for u in units}
    min_loss = measure(min_layout, "lowest predicted Delta")
    limit = fp32_loss

    fallback = None
    if method in ("second_order", "first_order"):
        items = [[(opt.cost, delta(u, k)) for k, opt in enumerate(u.options)] for u in units]
        budget = 0.0
        layout, cur = None, np.inf
        for attempt in range(max_repairs + 1):
            sol = _knapsack(items, budget)
            if sol is None:
                break
            choice = sol[0]
            cand = {u.name: c for u, c in zip(units, choice)}
            val = measure(cand, f"knapsack (budget {budget:+.5f})")
            if val < cur or layout is None:
                layout, cur = cand, val
            if val <= limit:
                layout, cur = cand, val
                break
            fallback = "tightened"
            budget -= (val - limit) * 1.5 + 1e-6
        if layout is None:
            layout, cur = dict(max_layout), max_loss
        if cur > limit:
            layout, cur, fallback = _raise(units, layout, cur, limit, delta, measure, allow_float)
        if refine and cur <= limit:  # hago's addition: measured greedy lowering from the verified layout
            layout, cur = _lower(units, layout, cur, limit, delta, measure)
    else:
        layout, cur, fallback = _greedy(units, sens, method, max_layout, max_loss, limit, delta, measure, allow_float)

    # -- result -----------------------------------------------------------------------------------
    bits, unit_bits, float_nodes = {}, {}, []
    total, weighted = 0.0, 0.0
    ranges = {}
    for u in units:
        opt = u.options[layout[u.name]]
        unit_bits[u.name] = opt.key
        total += u.size
        weighted += opt.cost
        if opt.key == FLOAT:
            for e in u.edges:
                bits[e] = None
            for w in u.weights:
                bits[w] = None
            float_nodes += u.nodes
        else:
            for e in u.edges:
                bits[e] = opt.act_bits
            bits.update(opt.weight_bits)
            ranges.update(opt.ranges)
    pred = float(sum(delta(u, layout[u.name]) for u in units))
    if all(b == FLOAT for b in unit_bits.values()):
        fallback = "float"  # only the float model meets the constraint
    res = MixedPrecisionResult(
        bits=bits, unit_bits=unit_bits, float_nodes=sorted(set(float_nodes)), fp32_loss=fp32_loss, quant_loss=cur,
        feasible=bool(cur <= limit), fallback=fallback, method=method, loss=loss_name, predicted_delta=pred,
        avg_bits=weighted / max(total, 1e-12), max_bits_loss=max_loss, min_loss=min_loss, sensitivities=sens,
        evals=ev.evals, sensitivity_evals=sensitivity_evals, seconds=time.perf_counter() - t_start,
        history=history, spec_name=spec.name,
        _base=(g, spec, dict(qg.options), ranges, {u.name: u for u in units}))
    return res


def _weight_noise(g: Graph, pm: ParamModel, u: _Unit, opt: _Option) -> float:
    """Squared weight quantization error of a layer's weights at an option's precision."""
    total = 0.0
    for w in u.weights:
        a = pm.anns[w].copy(bits=opt.weight_bits[w])
        a.set_range(*opt.ranges[w])
        wv = Graph.const(g.value(w)).astype(np.float32)
        total += float(np.sum((fake_quantize(wv, a).astype(np.float64) - wv) ** 2))
    return total


def _raise(units, layout, cur, limit, delta, measure, allow_float):
    """Raise precisions greedily (largest predicted gain first) until the measured loss is <= limit; then float."""
    layout = dict(layout)
    fallback = "raised"
    while cur > limit:
        best, gain = None, -np.inf
        for u in units:
            k = layout[u.name]
            nk = k - 1  # options are ordered highest precision first (float last)
            if u.options[k].key == FLOAT or nk < 0:
                continue
            gdelta = delta(u, k) - delta(u, nk)
            if gdelta > gain:
                best, gain = u, gdelta
        if best is None:
            break
        layout[best.name] -= 1
        cur = measure(layout, f"raise {best.name}")
    if cur > limit and allow_float:
        fallback = "float"
        order = sorted(units, key=lambda u: -delta(u, layout[u.name]))
        for u in order:
            fk = len(u.options) - 1
            if u.options[fk].key != FLOAT:
                continue
            layout[u.name] = fk
            cur = measure(layout, f"float {u.name}")
            if cur <= limit:
                break
    return layout, cur, fallback


def _greedy(units, sens, method, max_layout, max_loss, limit, delta, measure, allow_float):
    """Baselines: lower precisions in order of increasing score, keeping a step when the measured loss stays
    <= limit (or, while the layout is still above the limit, when it goes down); float as the last resort."""
    def score(u, k):
        return sens[u.name][u.options[k].key][method]

    layout, cur = _lower(units, dict(max_layout), max_loss, limit, score, measure)
    fallback = None
    if cur > limit:  # raise / float by the baseline's own score
        layout, cur, fallback = _raise(units, layout, cur, limit, score, measure, allow_float)
    return layout, cur, fallback


def _lower(units, layout, cur, limit, score, measure):
    """Lower precisions in order of increasing ``score(unit, option)``, keeping a step when the measured loss
    stays <= limit (or, while the layout is still above the limit, when it goes down)."""
    steps = []
    for u in units:
        for k, opt in enumerate(u.options):
            if opt.key == FLOAT or k == 0:
                continue
            steps.append((score(u, k), u.name, k))
    steps.sort(key=lambda s: (s[0], s[1], s[2]))
    by_name = {u.name: u for u in units}
    for _, name, k in steps:
        u = by_name[name]
        if u.options[layout[name]].key == FLOAT or k <= layout[name]:
            continue
        trial = dict(layout)
        trial[name] = k
        val = measure(trial, f"lower {name} to {u.options[k].key}")
        if val <= limit or (cur > limit and val < cur):
            layout, cur = trial, val
    return layout, cur


# ---------------------------------------------------------------------------------------------
# apply and the search strategy
# ---------------------------------------------------------------------------------------------

def apply(result: MixedPrecisionResult):
    """A :class:`hago.QuantizedGraph` with the selected precisions (the annotations that were measured)."""
    from ..calibrate import finalize_derived
    from ..pipeline import QuantizedGraph

    if result._base is None:
        raise HagoError("this MixedPrecisionResult has no base graph (was it loaded from a file?)")
    base, spec, options, ranges, units = result._base
    g = base.clone()
    for e, b in result.bits.items():
        v = g.value(e)
        a = g.annotation(v)
        if a is None:
            continue
        if b is None:
            g.annotate(v, None)
            continue
        a.bits = int(b)
    for e, r in ranges.items():
        a = g.annotation(g.value(e))
        if a is not None:  # None: kept float
            a.set_range(r[0], r[1])
    float_nodes = set(result.float_nodes)
    for n in g.nodes():
        if n.name in float_nodes:
            for v in n.inputs[1:]:
                if v is not None and g.annotation(v) is not None and g.annotation(v).kind in ("weight", "bias"):
                    g.annotate(v, None)
            n.meta[REGION_KEY] = "float"
            n.meta[REASON_KEY] = "kept float by mixed precision (loss <= fp32)"
            g.fallbacks.append(Fallback(n.name, n.op_type, n.meta[REASON_KEY]))
    finalize_derived(g)
    g.history.append(f"mixed precision ({result.method}): loss {result.quant_loss:.4g} vs fp32 {result.fp32_loss:.4g}")
    return QuantizedGraph(g, spec, dict(options) | {"mixed_precision": result.method,
                                                     "float_nodes": sorted(float_nodes)})


def search_strategy(d, *, candidates: Sequence[int] = (4, 6, 8), methods: Sequence[str] = ("second_order", "input_error"),
                    units: str = "all"):
    """A ``hago.search`` strategy: propose the loss-<=-fp32 layouts of ``methods`` as trials.

    Usage: ``hago.search.strategies.STRATEGIES["mixed_precision"] = search_strategy``. It reuses the
    driver's calibration batches and statistics; the per-layer sensitivities are measured once, by the
    first method, and reused by the others; each selection costs a few hundred onnxruntime runs of the
    calibration set, not trials.
    """
    first = None
    for m in methods:
        if d.remaining() <= 0:
            return
        r = select_precision(d.graph, d.spec, d.ev.calib, candidates=candidates, method=m,
                             calib_method=d.default_method, per_channel=d.ev.per_channel, observers=d.ev.observers,
                             units=units, hessian=first is None and "hessian" in methods, reuse=first)
        first = first or r
        d.trial(r.to_config(d.space, d.default_method), f"mixed_precision:{m}")
