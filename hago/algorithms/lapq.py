"""LAPQ: Loss Aware Post-training Quantization (Nahshan, Chmiel, Baskin, Zheltonozhskii, Banner,
Bronstein, Mendelson; arXiv 1911.07190; reference code github.com/ynahshan/nn-quantization-pytorch, ``lapq/``).

At 8 bits the network loss as a function of the clipping values is flat and
nearly separable, so per-tensor choices (min-max, MSE, KL) work. At 4 bits it is
non-separable with steep curvature: the clipping values must be chosen jointly,
against the network's loss. LAPQ does it in two steps:

1. **Lp initialisation**: for a norm ``p``, every quantized tensor gets the
   clipping range that minimizes ``E|x - Q(x)|^p`` (activations: on the
   calibration histogram, :func:`hago.calibrate.observers.lp_range`; weights: on
   the constant, :func:`hago.calibrate.observers.weight_range`, per tensor, or
   per channel where the annotation is per channel). ``p`` is swept over a grid
   and the one whose clippings give the lowest *network* loss on the calibration
   set is kept; like the reference code, a parabola fitted through the grid's
   losses proposes a refined ``p``, kept only when it is better.
2. **Joint optimisation**: starting there, all clipping values are optimised
   together with Powell's derivative-free method
   (``scipy.optimize.minimize(method="Powell")``) on the calibration loss. hago
   optimises one multiplier per tensor on its Lp range (a per-channel weight
   keeps the ratios between its channels; the multiplier scales them all), so
   the variables are of order 1 and Powell's unit initial directions fit them.

The loss is computed by onnxruntime on the exact QDQ simulation. To make the
hundreds of evaluations affordable, :class:`ParamModel` builds the QDQ model
once, with every quantizer's scale, zero point and integer bounds as *graph
inputs* (weights are fake-quantized inside the graph); one evaluation is then
one ``session.run`` with new parameter arrays. ``engine="rebuild"`` evaluates
by re-exporting the QDQ model and a new session per point instead, to measure the
difference (``bench/bench_lapq.py``: on the shared 2-core machine, 256 MNIST
digits per evaluation, 0.53 s vs 0.66 s for mnist_cnn and 0.77 s vs 0.81 s for
mnist_resnet: the forward pass dominates; the parametric model saves the export
and session creation). The parametric model reproduces the exported QDQ model's
outputs exactly (tests/test_lapq.py).

Deviations from the paper, documented: the loss is evaluated on the whole
calibration set each time (the paper uses one calibration batch of 512 images);
the first and last layers are quantized like the others (the reference code
leaves them out); hago's asymmetric activation ranges are scaled at both ends by
the same multiplier.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CalibrationError, HagoError
from ..ir.annotation import EdgeAnnotation, range_to_qparams
from ..ir.graph import Graph

_QDQ_TYPES = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8, "int16": onnx.TensorProto.INT16,
               "uint16": onnx.TensorProto.UINT16}
_NP_TYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}

__all__ = ["lapq", "LapqResult", "ParamModel", "LossEvaluator", "lp_ranges", "make_loss"]


# ---------------------------------------------------------------------------------------------
# The QDQ model with quantization parameters as graph inputs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Group:
    """One set of quantization parameters (a root activation edge with the edges tied to it, or a weight)."""

    name: str
    kind: str  # activation | weight
    ann: EdgeAnnotation
    edges: list[str]
    shape: tuple  # shape of the scale / zero point feed: () or (C,)


def _root(name: str, anns: dict[str, EdgeAnnotation]) -> str:
    seen = set()
    while anns[name].tied_to is not None and anns[name].tied_to in anns and name not in seen:
        seen.add(name)
        name = anns[name].tied_to
    return name


class ParamModel:
    """The annotated graph as a fake-quantized ONNX model whose quantization parameters are inputs.

    For every parameter group ``g`` the model takes ``g__scale``, ``g__zp``
    (in the container's type), ``g__lo``, ``g__hi`` (the real bounds of the
    annotation's integer range, ``(qmin - zp) * scale``...), and with ``mix=True``
    also ``g__t``: the quantized edge becomes ``x + t * (fq(x) - x)`` (``t = 0``
    float, ``t = 1`` quantized, other values for finite differences along the
    quantization noise). Biases of Conv/Gemm are fake-quantized with scale
    ``s_x * s_w`` as :func:`hago.ir.qdq.to_qdq` stores them. The arithmetic
    is QuantizeLinear/DequantizeLinear followed by the bounds of the narrower
    integer range (the values of to_qdq's ``Clip -> Q -> DQ``), so with the
    annotations' own parameters the outputs equal the QDQ model's. Containers
    QuantizeLinear lacks (int32) use Div/Round/Add/Max/Min/Sub/Mul, with
    ``lo``/``hi`` the integer bounds.
    """

    def __init__(self, graph: Graph, *, mix: bool = False, threads: int | None = None):
        from ..runtime import ort as rt

        self.graph = graph
        self.mix = mix
        anns = {v.name: a for v, a in graph.annotated()}
        self.anns = anns
        for n, a in anns.items():
            if a.sparq:
                raise HagoError(f"edge {n!r} carries SPARQ trimming, which the parametric QDQ model of "
                                f"hago.algorithms.lapq does not simulate; quantize with sparq=None")
        model = graph.to_onnx()
        g = model.graph
        inits = {t.name: t for t in g.initializer}
        self.groups: dict[str, _Group] = {}
        self.edge_group: dict[str, str] = {}
        for n, a in anns.items():
            if a.kind == "activation":
                r = _root(n, anns)
                grp = self.groups.get(r)
                if grp is None:
                    grp = self.groups[r] = _Group(r, "activation", anns[r], [], ())
                grp.edges.append(n)
                self.edge_group[n] = r
            elif a.kind == "weight":
                if n not in inits:
                    raise HagoError(f"{graph.source}: weight edge {n!r} is not an initializer")
                w = numpy_helper.to_array(inits[n])
                shape = (w.shape[a.axis],) if a.per_axis else ()
                self.groups[n] = _Group(n, "weight", a, [n], shape)
                self.edge_group[n] = n
        new_inits: list[onnx.TensorProto] = []
        inputs: list[onnx.ValueInfoProto] = []
        for grp in self.groups.values():
            qdq = grp.ann.dtype in _QDQ_TYPES
            zp_type = _QDQ_TYPES[grp.ann.dtype] if qdq else onnx.TensorProto.FLOAT
            bound_shape = grp.shape if qdq else ()
            for suffix, shape, typ in (("scale", grp.shape, onnx.TensorProto.FLOAT), ("zp", grp.shape, zp_type),
                                       ("lo", bound_shape, onnx.TensorProto.FLOAT), ("hi", bound_shape, onnx.TensorProto.FLOAT)):
                inputs.append(helper.make_tensor_value_info(f"{grp.name}__{suffix}", typ, list(shape)))
            if mix:
                inputs.append(helper.make_tensor_value_info(f"{grp.name}__t", onnx.TensorProto.FLOAT, []))
        pre: list[onnx.NodeProto] = []
        after: dict[str, list[onnx.NodeProto]] = {}
        rename: dict[str, str] = {}

        def fq(x: str, grp: _Group, out: str, nodes: list, bshape=None) -> None:
            g_ = grp.name
            s, z, lo, hi = f"{g_}__scale", f"{g_}__zp", f"{g_}__lo", f"{g_}__hi"
            p = out + "__"
            res = p + "fq" if mix else out
            if grp.ann.dtype in _QDQ_TYPES:
                # QuantizeLinear/DequantizeLinear, then the real bounds of the (possibly narrower) integer range:
                # the same values as to_qdq's Clip -> Q -> DQ
                attrs = {"axis": int(grp.ann.axis)} if bshape is not None else {}
                nodes += [helper.make_node("QuantizeLinear", [x, s, z], [p + "q"], **attrs),
                          helper.make_node("DequantizeLinear", [p + "q", s, z], [p + "dq"], **attrs)]
                if bshape is None:
                    nodes.append(helper.make_node("Clip", [p + "dq", lo, hi], [res]))
                else:
                    shp = p + "bshape"
                    new_inits.append(numpy_helper.from_array(np.asarray(bshape, np.int64), shp))
                    nodes += [helper.make_node("Reshape", [lo, shp], [p + "lob"]),
                              helper.make_node("Reshape", [hi, shp], [p + "hib"]),
                              helper.make_node("Max", [p + "dq", p + "lob"], [p + "mx"]),
                              helper.make_node("Min", [p + "mx", p + "hib"], [res])]
            else:  # containers QuantizeLinear lacks (int32): the arithmetic, with lo/hi the integer bounds
                if bshape is not None:
                    shp = p + "bshape"
                    new_inits.append(numpy_helper.from_array(np.asarray(bshape, np.int64), shp))
                    nodes += [helper.make_node("Reshape", [s, shp], [p + "s"]),
                              helper.make_node("Reshape", [z, shp], [p + "z"])]
                    s, z = p + "s", p + "z"
                nodes += [helper.make_node("Div", [x, s], [p + "div"]),
                          helper.make_node("Round", [p + "div"], [p + "rnd"]),
                          helper.make_node("Add", [p + "rnd", z], [p + "add"]),
                          helper.make_node("Max", [p + "add", lo], [p + "lo"]),
                          helper.make_node("Min", [p + "lo", hi], [p + "hi"]),
                          helper.make_node("Sub", [p + "hi", z], [p + "sub"]),
                          helper.make_node("Mul", [p + "sub", s], [res])]
            if mix:
                nodes += [helper.make_node("Sub", [res, x], [p + "noise"]),
                          helper.make_node("Mul", [p + "noise", f"{g_}__t"], [p + "tn"]),
                          helper.make_node("Add", [x, p + "tn"], [out])]

        for n, a in anns.items():
            if a.kind == "activation":
                out = n + "__pq"
                fq(n, self.groups[self.edge_group[n]], out, after.setdefault(n, []))
                rename[n] = out
            elif a.kind == "weight":
                w = numpy_helper.to_array(inits[n])
                bshape = None
                if a.per_axis:
                    bshape = [1] * w.ndim
                    bshape[a.axis] = -1
                fq(n, self.groups[n], n + "__pq", pre, bshape)
                rename[n] = n + "__pq"
        self.bias_of: dict[str, tuple[str, str]] = {}
        # biases: scale = s_x * s_w of the consumer (as hago.calibrate.finalize_derived and to_qdq do)
        for v, a in graph.annotated():
            if a.kind != "bias":
                continue
            for use in v.uses():
                node = use.node
                xs = node.inputs[0].name if node.inputs[0] is not None else None
                ws = node.inputs[1].name if len(node.inputs) > 1 and node.inputs[1] is not None else None
                if xs in self.edge_group and ws in self.edge_group and self.groups[ws].kind == "weight":
                    gx, gw = self.edge_group[xs], self.edge_group[ws]
                    b = v.name
                    p = b + "__pq_"
                    res = p + "fq" if mix else b + "__pq"
                    pre += [helper.make_node("Mul", [f"{gx}__scale", f"{gw}__scale"], [p + "s"]),
                            helper.make_node("Div", [b, p + "s"], [p + "div"]),
                            helper.make_node("Round", [p + "div"], [p + "rnd"]),
                            helper.make_node("Mul", [p + "rnd", p + "s"], [res])]
                    if mix:  # the bias follows its weight's mix
                        pre += [helper.make_node("Sub", [res, b], [p + "noise"]),
                                helper.make_node("Mul", [p + "noise", f"{gw}__t"], [p + "tn"]),
                                helper.make_node("Add", [b, p + "tn"], [b + "__pq"])]
                    rename[b] = b + "__pq"
                    self.bias_of[b] = (gx, gw)
                break
        graph_inputs = [i.name for i in g.input]
        nodes_out = list(pre)
        for n in graph_inputs:
            nodes_out.extend(after.pop(n, []))
        for node in g.node:
            for i, x in enumerate(node.input):
                if x in rename:
                    node.input[i] = rename[x]
            nodes_out.append(node)
            for o in node.output:
                nodes_out.extend(after.pop(o, []))
        for n in list(after):  # activation quantizers on initializers
            nodes_out[:0] = after.pop(n)
        del g.node[:]
        g.node.extend(nodes_out)
        g.initializer.extend(new_inits)
        g.input.extend(inputs)
        model.producer_name = "hago.lapq"
        self.model = model
        self.sess = rt.session(model, threads=threads, optimize="basic", source=graph.source)
        self.data_inputs = list(graph.input_names)

    # -- parameters ------------------------------------------------------------------------
    @staticmethod
    def _params(ann: EdgeAnnotation, scale, zp, shape) -> dict:
        scale = np.asarray(scale, np.float32).reshape(shape)
        zpi = np.asarray(zp).reshape(shape)
        if ann.dtype in _QDQ_TYPES:
            zf = zpi.astype(np.float32)
            lo = np.asarray((np.float32(ann.qmin) - zf) * scale, np.float32).reshape(shape)
            hi = np.asarray((np.float32(ann.qmax) - zf) * scale, np.float32).reshape(shape)
            return {"scale": scale, "zp": zpi.astype(_NP_TYPES[ann.dtype]), "lo": lo, "hi": hi}
        return {"scale": scale, "zp": zpi.astype(np.float32), "lo": np.array(ann.qmin, np.float32),
                "hi": np.array(ann.qmax, np.float32)}

    def params_from_annotations(self) -> dict[str, np.ndarray]:
        """Feeds for the annotations as they are now (all groups quantized: ``t = 1``)."""
        feeds = {}
        for gname, grp in self.groups.items():
            a = self.anns[gname]
            if a.scale is None:
                raise HagoError(f"edge {gname!r} is annotated but not calibrated")
            feeds.update(self.group_feeds(gname, a.scale, a.zero_point if a.zero_point is not None else 0, a))
        return feeds

    def group_feeds(self, gname: str, scale, zp, ann: EdgeAnnotation | None = None, t: float = 1.0) -> dict:
        grp = self.groups[gname]
        ann = ann or grp.ann
        p = self._params(ann, scale, zp, grp.shape)
        out = {f"{gname}__{k}": v for k, v in p.items()}
        if self.mix:
            out[f"{gname}__t"] = np.array(t, np.float32)
        return out

    def range_feeds(self, gname: str, lo, hi, ann: EdgeAnnotation | None = None, t: float = 1.0) -> dict:
        ann = ann or self.groups[gname].ann
        s, z = range_to_qparams(lo, hi, ann)
        return self.group_feeds(gname, s, z, ann, t)

    def run(self, data: dict, params: dict) -> list[np.ndarray]:
        from ..runtime import ort as rt

        feeds = {k: data[k] for k in self.data_inputs}
        feeds.update(params)
        return rt.run(self.sess, feeds)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.reshape(z.shape[0], -1).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def cross_entropy(outputs, labels, ref) -> float:
    """Mean cross-entropy of the first output's softmax against integer labels."""
    lp = _log_softmax(outputs[0])
    return float(-np.mean(lp[np.arange(lp.shape[0]), np.asarray(labels).reshape(-1)]))


def kl_to_fp32(outputs, labels, ref) -> float:
    """Mean KL(softmax(fp32) || softmax(quantized)) of the first output."""
    lq = _log_softmax(outputs[0])
    lr = _log_softmax(ref[0])
    return float(np.mean(np.sum(np.exp(lr) * (lr - lq), axis=1)))


def pseudo_cross_entropy(outputs, labels, ref) -> float:
    """Cross-entropy against the fp32 model's top-1 (a task loss without labels; the fp32 model's own value is
    its mean confidence loss, which a quantized model can beat)."""
    lp = _log_softmax(outputs[0])
    y = ref[0].reshape(ref[0].shape[0], -1).argmax(axis=1)
    return float(-np.mean(lp[np.arange(lp.shape[0]), y]))


def output_mse(outputs, labels, ref) -> float:
    """Mean squared error of all outputs against fp32, normalized by the fp32 variance."""
    return float(np.mean([np.mean((o - r) ** 2) / (np.var(r) + 1e-12) for o, r in zip(outputs, ref)]))


LOSSES = {"ce": cross_entropy, "cross_entropy": cross_entropy, "kl": kl_to_fp32, "mse": output_mse,
          "pseudo_ce": pseudo_cross_entropy}


def make_loss(loss, has_labels: bool, unlabeled: str = "kl") -> tuple[str, Callable]:
    """``(name, fn(outputs, labels, fp32_outputs) -> float)``; None picks CE with labels, else ``unlabeled``."""
    if loss is None:
        loss = "ce" if has_labels else unlabeled
    if callable(loss):
        return getattr(loss, "__name__", "custom"), loss
    if loss not in LOSSES:
        raise HagoError(f"loss={loss!r}: use one of {sorted(LOSSES)} or a function (outputs, labels, fp32_outputs) -> float")
    if LOSSES[loss] is cross_entropy and not has_labels:
        raise CalibrationError("loss='ce' needs a 'label' array in every calibration batch")
    return loss, LOSSES[loss]


def stack_batches(calib, input_names: Sequence[str], max_samples: int | None = None):
    """Concatenate calibration batches into one ``({input: array}, labels or None)``."""
    from ..runtime import ort as rt

    if calib is None:
        raise CalibrationError("no calibration data given: pass an iterable of {input_name: array} batches")
    if isinstance(calib, dict):
        calib = [calib]
    feeds, labels, n_lab, n = {k: [] for k in input_names}, [], 0, 0
    for i, b in enumerate(calib):
        f = rt.check_batch(b, input_names, i)
        for k in input_names:
            feeds[k].append(f[k])
        if "label" in b:
            labels.append(np.asarray(b["label"]).reshape(-1))
            n_lab += 1
        n += 1
    if n == 0:
        raise CalibrationError("the calibration data is empty")
    data = {k: np.concatenate(v, axis=0) for k, v in feeds.items()}
    lab = np.concatenate(labels) if n_lab == n else None
    if max_samples:
        data = {k: v[:max_samples] for k, v in data.items()}
        lab = lab[:max_samples] if lab is not None else None
    return data, lab


class LossEvaluator:
    """The calibration loss of a :class:`ParamModel` under given parameter feeds (counts evaluations)."""

    def __init__(self, pm: ParamModel, data: dict, labels, loss_fn: Callable, ref: list[np.ndarray]):
        self.pm, self.data, self.labels, self.loss_fn, self.ref = pm, data, labels, loss_fn, ref
        self.evals = 0
        self.seconds = 0.0

    def __call__(self, params: dict) -> float:
        t0 = time.perf_counter()
        out = self.pm.run(self.data, params)
        val = self.loss_fn(out, self.labels, self.ref)
        self.evals += 1
        self.seconds += time.perf_counter() - t0
        return val


# ---------------------------------------------------------------------------------------------
# LAPQ
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LapqResult:
    """What :func:`lapq` did. ``clip`` maps each optimised edge to its final ``(rmin, rmax)`` (lists for
    per-channel weights); ``multipliers`` to its Powell multiplier on the Lp range of ``p``."""

    p: float
    p_grid: dict  # p -> calibration loss of the Lp clippings
    p_grid_best: float
    p_refined: float | None
    fp32_loss: float
    minmax_loss: float
    init_loss: float  # Lp clippings of the chosen p (parametric engine)
    final_loss: float  # after Powell (parametric engine)
    init_loss_qdq: float  # the same two points measured on the exported QDQ model
    final_loss_qdq: float
    reverted: bool  # True when the Powell point was not better on the QDQ model (the Lp init is kept)
    loss: str
    history: list  # calibration loss of every evaluation, in order
    clip: dict
    multipliers: dict
    edges: list
    evals: int
    seconds: dict
    engine: str
    powell: dict

    def summary(self) -> str:
        grid = ", ".join(f"p={p:g}: {l:.4f}" for p, l in self.p_grid.items())
        return (f"LAPQ ({self.loss} loss, {len(self.edges)} tensors): fp32 {self.fp32_loss:.4f}, min-max "
                f"{self.minmax_loss:.4f}; Lp grid {grid}; p = {self.p:g}; init {self.init_loss_qdq:.4f} -> "
                f"Powell {self.final_loss_qdq:.4f} ({self.evals} evaluations, {self.seconds['total']:.1f} s)"
                + (" [reverted to the Lp init]" if self.reverted else ""))


def lp_ranges(graph: Graph, observers: dict, edges: Sequence[str], p: float) -> dict[str, tuple]:
    """Lp-optimal ``(rmin, rmax)`` of each named edge (activations from observers, weights from constants)."""
    from ..calibrate.observers import weight_range

    out = {}
    for name in edges:
        v = graph.value(name)
        a = graph.annotation(v)
        if a.kind == "activation":
            out[name] = observers[name].range(f"lp:{p}", a)
        else:
            w = Graph.const(v)
            if w is None:
                raise CalibrationError(f"weight edge {name!r} is not a constant")
            out[name] = weight_range(w, a, f"lp:{p}")
    return out


def minmax_ranges(graph: Graph, observers: dict, edges: Sequence[str]) -> dict[str, tuple]:
    from ..calibrate.observers import weight_range

    out = {}
    for name in edges:
        v = graph.value(name)
        a = graph.annotation(v)
        out[name] = observers[name].range("minmax", a) if a.kind == "activation" else weight_range(Graph.const(v), a, "minmax")
    return out


def _scaled(r: tuple, m: float) -> tuple:
    lo, hi = r
    if isinstance(lo, np.ndarray):
        return lo * m, hi * m
    return float(lo) * m, float(hi) * m


def _amax(r: tuple) -> float:
    return float(np.max(np.maximum(np.abs(np.asarray(r[0])), np.abs(np.asarray(r[1])))))


def _fit_p(ps: np.ndarray, losses: np.ndarray) -> float | None:
    """The minimum of a parabola fitted through the grid losses (the reference code's p interpolation)."""
    if len(ps) < 3 or not np.all(np.isfinite(losses)):
        return None
    a, b, _ = np.polyfit(ps, losses, 2)
    if a <= 0:
        return None
    p = -b / (2 * a)
    if not (ps.min() < p < ps.max()):
        return None
    return float(p)


def lapq(qg, calib: Iterable[dict], *, p_grid: Sequence[float] = (2.0, 2.5, 3.0, 3.5, 4.0), refine_p: bool = True,
         maxiter: int | None = 2, maxfev: int | None = None, loss=None,
         include: Sequence[str] = ("weight", "activation"), xtol: float = 1e-2, ftol: float = 1e-4,
         bounds: tuple[float, float] = (0.05, 1.5), engine: str = "param", max_samples: int | None = None,
         threads: int | None = None, observers: dict | None = None, verbose: bool = False) -> LapqResult:
    """Loss-aware clipping of a :class:`hago.QuantizedGraph`, in place (annotations, then ``qg.invalidate()``).

    ``calib``: iterable of ``{input_name: array}`` batches, with ``label`` for the
    default cross-entropy loss (without labels the default is KL(fp32 || quantized)
    of the softmax of the first output). ``loss`` may be ``"ce"``, ``"kl"``,
    ``"mse"`` or ``fn(outputs, labels, fp32_outputs) -> float``. ``include`` picks
    the tensors whose clipping is optimised (``"weight"``, ``"activation"``); the
    others keep their annotation. ``maxiter``/``maxfev`` bound Powell (the
    reference code runs 1 or 2 iterations); ``bounds`` are the multiplier bounds
    relative to the Lp range (the upper one is raised per tensor to reach its
    min-max range). ``engine``: ``"param"`` (one QDQ model, parameters fed as
    inputs) or ``"rebuild"`` (export and a new session per evaluation).
    Deterministic: no randomness is involved.
    """
    from scipy import optimize

    from ..calibrate import activation_edges, collect_stats, finalize_derived
    from ..runtime import ort as rt

    if engine not in ("param", "rebuild"):
        raise HagoError(f"engine={engine!r}: use 'param' or 'rebuild'")
    bad = set(include) - {"weight", "activation"}
    if bad or not include:
        raise HagoError(f"include={tuple(include)!r}: use 'weight' and/or 'activation'")
    if not p_grid:
        raise HagoError("p_grid is empty: give the norms p to try, e.g. (2, 2.5, 3, 3.5, 4)")
    t_start = time.perf_counter()
    g: Graph = qg.graph
    data, labels = stack_batches(calib, g.input_names, max_samples)
    loss_name, loss_fn = make_loss(loss, labels is not None)
    ref = rt.run(rt.session(g.to_onnx(), threads=threads, source=g.source), data)
    fp32_loss = loss_fn(ref, labels, ref)

    act_names = [v.name for v, _ in activation_edges(g)]
    names: list[str] = []
    if "activation" in include:
        names += act_names
    if "weight" in include:
        names += [v.name for v, a in g.annotated() if a.kind == "weight" and not a.fixed]
    if not names:
        raise HagoError(f"{g.source}: no quantized {' or '.join(include)} tensors to optimise")
    anns = {n: g.annotation(g.value(n)) for n in names}
    t0 = time.perf_counter()
    if observers is None or any(observers.get(n) is None or observers[n].hist is None for n in act_names):
        batches = [{k: v[i:i + 256] for k, v in data.items()} for i in range(0, len(next(iter(data.values()))), 256)]
        observers = collect_stats(g, batches, act_names, histogram=True, threads=threads)
    t_stats = time.perf_counter() - t0

    # -- the evaluator ---------------------------------------------------------------------------
    if engine == "param":
        t0 = time.perf_counter()
        pm = ParamModel(g, threads=threads)
        ev = LossEvaluator(pm, data, labels, loss_fn, ref)
        base_feeds = pm.params_from_annotations()
        groups_of = {n: pm.edge_group[n] for n in names}
        t_build = time.perf_counter() - t0

        def evaluate(ranges: dict) -> float:
            feeds = dict(base_feeds)
            for n, r in ranges.items():
                feeds.update(pm.range_feeds(groups_of[n], r[0], r[1], anns[n]))
            return ev(feeds)
    else:
        t_build = 0.0
        ev_count = {"evals": 0, "seconds": 0.0}
        saved = {n: (a.rmin, a.rmax, a.scale, a.zero_point) for n, a in anns.items()}

        def evaluate(ranges: dict) -> float:
            t1 = time.perf_counter()
            for n, r in ranges.items():
                anns[n].set_range(r[0], r[1])
            finalize_derived(g)
            qg.invalidate()
            val = loss_fn(qg.run(data), labels, ref)
            ev_count["evals"] += 1
            ev_count["seconds"] += time.perf_counter() - t1
            return val

    history: list[float] = []

    def tracked(ranges: dict) -> float:
        val = evaluate(ranges)
        history.append(val)
        return val

    # -- step 1: the Lp norm -----------------------------------------------------------------------
    t0 = time.perf_counter()
    mm = minmax_ranges(g, observers, names)
    minmax_loss = tracked(mm)
    grid_losses: dict[float, float] = {}
    grid_ranges: dict[float, dict] = {}
    for p in p_grid:
        p = float(p)
        grid_ranges[p] = lp_ranges(g, observers, names, p)
        grid_losses[p] = tracked(grid_ranges[p])
        if verbose:
            print(f"lapq: p={p:g} loss {grid_losses[p]:.5f}")
    p_best = min(grid_losses, key=lambda k: (grid_losses[k], k))
    p_refined = None
    p_final, init = p_best, grid_ranges[p_best]
    init_loss = grid_losses[p_best]
    if refine_p:
        ps = np.array(sorted(grid_losses))
        pr = _fit_p(ps, np.array([grid_losses[p] for p in ps]))
        if pr is not None and all(abs(pr - p) > 1e-6 for p in ps):
            p_refined = pr
            r = lp_ranges(g, observers, names, pr)
            lr = tracked(r)
            if verbose:
                print(f"lapq: refined p={pr:.3f} loss {lr:.5f}")
            if lr < init_loss:
                p_final, init, init_loss = pr, r, lr
    t_step1 = time.perf_counter() - t0

    # -- step 2: Powell on one multiplier per tensor -------------------------------------------------
    t0 = time.perf_counter()
    lo_b, hi_b = bounds
    bnds = []
    for n in names:
        reach = _amax(mm[n]) / max(_amax(init[n]), 1e-12)
        bnds.append((lo_b, max(hi_b, reach * 1.05)))
    best = {"loss": init_loss, "x": np.ones(len(names))}

    def f(x: np.ndarray) -> float:
        x = np.clip(np.asarray(x, np.float64), [b[0] for b in bnds], [b[1] for b in bnds])
        val = tracked({n: _scaled(init[n], float(m)) for n, m in zip(names, x)})
        if val < best["loss"]:
            best["loss"], best["x"] = val, x.copy()
        return val

    options = {"xtol": xtol, "ftol": ftol, "disp": False}
    if maxiter is not None:
        options["maxiter"] = int(maxiter)
    if maxfev is not None:
        options["maxfev"] = int(maxfev)
    res = optimize.minimize(f, np.ones(len(names)), method="Powell", bounds=bnds, options=options)
    t_step2 = time.perf_counter() - t0
    x_best = best["x"]
    final = {n: _scaled(init[n], float(m)) for n, m in zip(names, x_best)}

    # -- write the annotations; check both points on the exported QDQ model -------------------------------
    def apply(ranges: dict, method: str) -> float:
        for n, r in ranges.items():
            anns[n].set_range(r[0], r[1])
            anns[n].method = method
        finalize_derived(g)
        qg.invalidate()
        return loss_fn(qg.run(data), labels, ref)

    init_qdq = apply(init, f"lp:{p_final:.3g}")
    final_qdq = apply(final, "lapq")
    reverted = False
    if final_qdq > init_qdq:
        final_qdq = apply(init, f"lp:{p_final:.3g}")
        final, x_best, reverted = init, np.ones(len(names)), True
    g.history.append(f"lapq: p={p_final:.3g}, loss {init_qdq:.4g} -> {final_qdq:.4g} ({len(history)} evaluations)")
    evals = ev.evals if engine == "param" else ev_count["evals"]
    ev_seconds = ev.seconds if engine == "param" else ev_count["seconds"]

    def _tolist(r):
        return tuple(x.tolist() if isinstance(x, np.ndarray) else float(x) for x in r)

    return LapqResult(
        p=float(p_final), p_grid=grid_losses, p_grid_best=float(p_best), p_refined=p_refined, fp32_loss=fp32_loss,
        minmax_loss=minmax_loss, init_loss=init_loss, final_loss=float(best["loss"]) if not reverted else init_loss,
        init_loss_qdq=init_qdq, final_loss_qdq=final_qdq, reverted=reverted, loss=loss_name, history=history,
        clip={n: _tolist(final[n]) for n in names}, multipliers={n: float(m) for n, m in zip(names, x_best)},
        edges=list(names), evals=evals,
        seconds={"stats": t_stats, "build": t_build, "step1": t_step1, "step2": t_step2,
                 "per_eval": ev_seconds / max(evals, 1), "total": time.perf_counter() - t_start},
        engine=engine, powell={"nit": int(getattr(res, "nit", 0)), "nfev": int(getattr(res, "nfev", 0)),
                               "message": str(getattr(res, "message", ""))})
