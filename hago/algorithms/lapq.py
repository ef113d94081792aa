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

**Bias correction of the weights** (``bias_correction=True``, the reference
code's ``-bcw``, which every run of its README uses): the reference's weight
wrapper (``ParameterModuleWrapperPost.bias_corr``) subtracts from the quantized
weights, per output channel, the shift of their mean, ``mean(Q(w)) - mean(w)``,
at every forward pass, so the search sees corrected weights. Those weights are
off the integer grid, which a QDQ model cannot hold, so hago
realizes the correction on the grid (:func:`mean_preserving_codes`: round to
nearest, then move the fewest codes by one step so that each channel's mean
is the float one, to ``s / 2K``) and searches with those weights (the default,
``"round"``). ``"exact"`` searches with the reference's off-grid formula
(:class:`ParamModel`: a ReduceMean / Sub on each fake-quantized weight) and
writes the on-grid form; ``"bias"`` folds the correction into the bias instead
(on MNIST, much weaker: the window sums of the input vary strongly between
positions).

Setup against the reference code (``lapq/lapq_v2.py``, README runs ``-ba 4 -bw 4
--min_method Powell -maxi 1|2 -cs 512 -bcw``): the p grid is the reference's
``np.linspace(2, 4, 10)`` and its parabola; the loss is cross-entropy with the
labels over the calibration set (the reference averages it over the batches of
its 512 calibration images); Powell runs ``maxiter`` iterations with no
evaluation cap by default, like the reference.

Deviations, documented: the reference's Powell variables are the absolute
clipping values, unbounded, with scipy's default tolerances, and it keeps the
parabola's p even when a grid point is better; hago optimises bounded
multipliers on the Lp ranges (``xtol=1e-2``) and keeps the refined p only when it
is better. The reference leaves the first and last layers unquantized and
quantizes ReLU outputs only; hago quantizes every annotated tensor, as the
baselines it is compared with do, and ``edges`` (with per-edge bit overrides in
:func:`hago.quantize`) reproduces the reference's set
(``bench/bench_lapq.py --protocol reference``). hago's asymmetric activation ranges are
scaled at both ends by the same multiplier.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CalibrationError, HagoError
from ..ir.annotation import EdgeAnnotation, broadcast_qparams, dequantize_array, range_to_qparams
from ..ir.graph import Graph

_QDQ_TYPES = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8, "int16": onnx.TensorProto.INT16,
               "uint16": onnx.TensorProto.UINT16}
_NP_TYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16}

__all__ = ["lapq", "LapqResult", "ParamModel", "LossEvaluator", "lp_ranges", "make_loss", "apply_clipping", "BiasFold",
           "input_window_sums", "weight_mean_shift", "P_GRID",
           "mean_preserving_codes", "WeightRounding", "noise_power", "relu_folded"]


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


# ---------------------------------------------------------------------------------------------
# Bias correction of the weights (the reference code's ``-bcw``)
# ---------------------------------------------------------------------------------------------

_BC_MODES = {None: None, False: None, "none": None, "off": None, True: "round", "round": "round",
             "exact": "exact", "weights": "exact", "bias": "bias"}


def _bc_mode(bias_correction) -> str | None:
    try:
        return _BC_MODES[bias_correction]
    except (KeyError, TypeError):
        raise HagoError(f"bias_correction={bias_correction!r}: use True / 'round' (the reference code's -bcw on the "
                        f"integer grid), 'exact' (its off-grid formula in the search), 'bias' (folded into the bias) "
                        f"or False") from None


def _out_axis(graph: Graph, name: str, ndim: int) -> int | None:
    """The output-channel axis of a weight (Conv: 0; Gemm: 0 with transB, else 1; MatMul: last), or None."""
    v = graph.value(name)
    uses = list(v.uses())
    if not uses:
        return None
    axes = set()
    for u in uses:
        node, idx = u.node, u.idx
        if node.op_type == "Conv" and idx == 1:
            axes.add(0)
        elif node.op_type == "Gemm" and idx == 1 and ndim == 2:
            tb = node.attributes.get("transB")
            axes.add(0 if tb is not None and tb.value else 1)
        elif node.op_type == "MatMul" and idx == 1 and ndim >= 2:
            axes.add(ndim - 1)
        else:
            return None
    return axes.pop() if len(axes) == 1 else None


def _reduce_mean(x: str, out: str, axes: list, opset: int, inits: list, prefix: str) -> onnx.NodeProto:
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.asarray(axes, np.int64), prefix + "axes"))
        return helper.make_node("ReduceMean", [x, prefix + "axes"], [out], keepdims=1)
    return helper.make_node("ReduceMean", [x], [out], axes=list(axes), keepdims=1)


def weight_mean_shift(w: np.ndarray, wq: np.ndarray, out_axis: int) -> np.ndarray:
    """Per output channel ``mean(wq) - mean(w)``: what the reference code's bias correction of the weights
    (``ParameterModuleWrapperPost.bias_corr``, ``-bcw``) subtracts from the quantized weights."""
    axes = tuple(i for i in range(w.ndim) if i != out_axis)
    return (wq.astype(np.float64).mean(axis=axes) - w.astype(np.float64).mean(axis=axes)).astype(np.float32)


def input_window_sums(graph: Graph, data: dict, weights: Sequence[str] | None = None,
                      threads: int | None = None) -> dict[str, np.ndarray]:
    """For each Conv / Gemm / MatMul weight, per output channel, the calibration mean of the sum of the layer's
    input over the weight's window: ``E[conv(x, ones)]`` (Conv: over samples and output positions, padding
    included; Gemm / MatMul: the sum of the input features). A per-channel shift ``d`` of the weights then
    changes the output by ``d * E[...]`` on average, the amount :func:`apply_clipping` folds into the bias.
    Computed on the float model."""
    from ..runtime import ort as rt

    want = set(weights) if weights is not None else None
    layers = []  # (weight, node, input name)
    for node in graph.nodes():
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        wv = node.inputs[1]
        if wv.const_value is None or (want is not None and wv.name not in want) or node.inputs[0] is None:
            continue
        layers.append((wv.name, node, node.inputs[0].name))
    if not layers:
        return {}
    model = graph.to_onnx()
    have = {o.name for o in model.graph.output}
    for x in sorted({x for _, _, x in layers} - have):
        model.graph.output.append(helper.make_empty_tensor_value_info(x))
    sess = rt.session(model, threads=threads, source=graph.source)
    outs = [o.name for o in sess.get_outputs()]
    n = len(next(iter(data.values())))
    sums: dict[str, np.ndarray] = {}
    count = 0
    for i in range(0, n, 256):
        feeds = {k: v[i:i + 256] for k, v in data.items() if k in graph.input_names}
        res = dict(zip(outs, sess.run(None, feeds)))
        m = len(next(iter(feeds.values())))
        for wname, node, x in layers:
            w = Graph.const(node.inputs[1])
            xv = res[x].astype(np.float32)
            if node.op_type == "Conv":
                part = _conv_window_sum(node, xv, w.shape)
            elif node.op_type == "Gemm":
                ta = node.attributes.get("transA")
                xs = xv.T if ta is not None and ta.value else xv
                tb = node.attributes.get("transB")
                cout = w.shape[0] if tb is not None and tb.value else w.shape[1]
                part = np.full(cout, xs.sum(axis=1).mean(), np.float64)
            else:  # MatMul: x [..., K] @ w [K, N]
                part = np.full(w.shape[-1], xv.sum(axis=-1).mean(), np.float64)
            sums[wname] = sums.get(wname, 0.0) + part * m
        count += m
    return {k: (v / count).astype(np.float32) for k, v in sums.items()}


def _conv_window_sum(node, x: np.ndarray, wshape) -> np.ndarray:
    """Mean over samples and output positions of ``conv(x, ones)`` per output channel."""
    import onnxruntime as ort

    attrs = {k: a.value for k, a in node.attributes.items()}
    cout = int(wshape[0])
    ones = np.ones(wshape, np.float32)
    kw = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in attrs.items()
          if k in ("strides", "pads", "dilations", "group", "auto_pad", "kernel_shape")}
    conv = helper.make_node("Conv", ["x", "w"], ["y"], **kw)
    g = helper.make_graph([conv], "s", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(ones, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    y = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return y.reshape(y.shape[0], cout, -1).mean(axis=(0, 2)).astype(np.float64)


@dataclasses.dataclass
class BiasFold:
    """The exported form of the weights' bias correction: for each corrected weight, its layer's bias is
    ``b0 - shift * E[window sum]`` with ``shift`` the per-channel mean shift of the weight under its current
    annotation (:func:`weight_mean_shift`) and ``E[window sum]`` from :func:`input_window_sums`. ``b0`` is the
    original bias, kept so that the fold can be redone for other clippings (and undone: :meth:`restore`)."""

    entries: list  # (weight name, bias name, out axis, expected window sums, original bias)
    skipped: list  # weights without a foldable bias (no bias input, or a bias shared with other nodes)

    @classmethod
    def build(cls, graph: Graph, weights: Sequence[str], input_sums: dict) -> "BiasFold":
        entries, skipped = [], []
        for wname in weights:
            v = graph.value(wname)
            w = Graph.const(v)
            oc = _out_axis(graph, wname, w.ndim) if w is not None else None
            uses = list(v.uses())
            node = uses[0].node if uses else None
            has_bias = node is not None and node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2
            bias = node.inputs[2] if has_bias else None
            if (oc is None or wname not in input_sums or bias is None or bias.const_value is None
                    or len(list(bias.uses())) != 1 or len(uses) != 1):
                skipped.append(wname)
                continue
            b0 = Graph.const(bias).astype(np.float32).copy()
            entries.append((wname, bias.name, oc, np.asarray(input_sums[wname], np.float32), b0))
        return cls(entries, skipped)

    def shifts(self, graph: Graph) -> dict[str, np.ndarray]:
        from ..ir.annotation import fake_quantize

        out = {}
        for wname, _, oc, _, _ in self.entries:
            v = graph.value(wname)
            w = Graph.const(v)
            out[wname] = weight_mean_shift(w, fake_quantize(w, graph.annotation(v)), oc)
        return out

    def apply(self, graph: Graph) -> None:
        from onnx_ir import tensor

        sh = self.shifts(graph)
        for wname, bname, _, es, b0 in self.entries:
            bv = graph.value(bname)
            bv.const_value = tensor((b0 - sh[wname] * es).astype(np.float32), name=bname)

    def restore(self, graph: Graph) -> None:
        from onnx_ir import tensor

        for _, bname, _, _, b0 in self.entries:
            graph.value(bname).const_value = tensor(b0.copy(), name=bname)


def mean_preserving_codes(w: np.ndarray, ann: EdgeAnnotation, out_axis: int) -> np.ndarray:
    """Integer codes of ``w`` under ``ann`` whose per-output-channel mean equals the float mean as closely as
    the grid allows: round to nearest, then move the fewest codes one step (those whose rounding error grows
    least, never past the integer bounds) until each channel's code sum is the nearest integer to its float
    sum ``sum(w / s + zp)``. The on-grid form of the reference code's weight bias correction (``-bcw``): the
    channel mean shift it subtracts is left below ``s / (2 K)`` (``K`` weights per channel), instead of a
    constant offset off the grid."""
    from ..ir.annotation import quantize_array

    w = np.asarray(w, np.float32)
    q = quantize_array(w, ann)
    scale, zp = broadcast_qparams(ann, w.ndim, np.float64, np.float64)
    u = w.astype(np.float64) / scale + zp  # real-valued codes
    um = np.moveaxis(u, out_axis, 0).reshape(w.shape[out_axis], -1)
    qm = np.moveaxis(q, out_axis, 0).reshape(w.shape[out_axis], -1).copy()
    d = np.rint(um.sum(axis=1) - qm.sum(axis=1)).astype(np.int64)  # steps to add per channel
    for c in np.nonzero(d)[0]:
        n = int(d[c])
        step = 1 if n > 0 else -1
        room = qm[c] < ann.qmax if step > 0 else qm[c] > ann.qmin
        idx = np.nonzero(room)[0]
        if idx.size == 0:
            continue
        err = um[c, idx] - qm[c, idx]
        cost = np.abs(err - step) - np.abs(err)  # growth of the rounding error
        pick = idx[np.argsort(cost, kind="stable")[:min(abs(n), idx.size)]]
        qm[c, pick] += step
    moved = np.moveaxis(q, out_axis, 0).shape
    return np.moveaxis(qm.reshape(moved), 0, out_axis)


@dataclasses.dataclass
class WeightRounding:
    """The exported form of the weights' bias correction with ``fold="round"``: each corrected weight is
    written back on its integer grid with :func:`mean_preserving_codes` (as AdaRound / BRECQ write theirs);
    the original float weights are kept so that it can be redone for other clippings (and undone)."""

    entries: list  # (weight name, out axis, original float weight)

    @classmethod
    def build(cls, graph: Graph, weights: Sequence[str]) -> "WeightRounding":
        entries = []
        for wname in weights:
            v = graph.value(wname)
            w = Graph.const(v)
            oc = _out_axis(graph, wname, w.ndim) if w is not None else None
            if oc is not None:
                entries.append((wname, oc, w.astype(np.float32).copy()))
        return cls(entries)

    def values(self, graph: Graph, anns: dict | None = None) -> dict[str, np.ndarray]:
        """On-grid float weights under the current (or the given) annotations."""
        out = {}
        for wname, oc, w0 in self.entries:
            a = (anns or {}).get(wname) or graph.annotation(graph.value(wname))
            out[wname] = dequantize_array(mean_preserving_codes(w0, a, oc), a)
        return out

    def apply(self, graph: Graph) -> None:
        from onnx_ir import tensor

        for wname, w in self.values(graph).items():
            graph.value(wname).const_value = tensor(w, name=wname)

    def restore(self, graph: Graph) -> None:
        from onnx_ir import tensor

        for wname, _, w0 in self.entries:
            graph.value(wname).const_value = tensor(w0.copy(), name=wname)

    @property
    def names(self) -> list[str]:
        return [e[0] for e in self.entries]


def apply_clipping(qg, clip: dict, *, method: str = "lapq", fold: BiasFold | None = None) -> None:
    """Write clipping ranges ``{edge: (rmin, rmax)}`` into the annotations of ``qg`` (then the derived
    parameters), and with ``fold`` redo the bias correction for the new weight quantizers."""
    from ..calibrate import finalize_derived

    g: Graph = qg.graph
    for n, r in clip.items():
        a = g.annotation(g.value(n))
        lo, hi = r
        if isinstance(lo, (list, tuple)):
            lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        a.set_range(lo, hi)
        a.method = method
    finalize_derived(g)
    if fold is not None:
        fold.apply(g)
    qg.invalidate()


class ParamModel:
    """The annotated graph as a fake-quantized ONNX model whose quantization parameters are inputs.

    For every parameter group ``g`` the model takes ``g__scale``, ``g__zp``
    (in the container's type), ``g__lo``, ``g__hi`` (the real bounds of the
    annotation's integer range, ``(qmin - zp) * scale``...), and with ``mix=True``
    also ``g__t``: the quantized edge becomes ``x + t * (fq(x) - x)`` (``t = 0``
    float, ``t = 1`` quantized, other values for finite differences along the
    quantization noise; an ``If`` on ``t`` skips the quantizer's arithmetic where ``t = 0``). Biases of Conv/Gemm are fake-quantized with scale
    ``s_x * s_w`` as :func:`hago.ir.qdq.to_qdq` stores them. The arithmetic
    is QuantizeLinear/DequantizeLinear followed by the bounds of the narrower
    integer range (the values of to_qdq's ``Clip -> Q -> DQ``), so with the
    annotations' own parameters the outputs equal the QDQ model's. Containers
    QuantizeLinear lacks (int32) use Div/Round/Add/Max/Min/Sub/Mul, with
    ``lo``/``hi`` the integer bounds.

    ``bias_correction`` (LAPQ's ``-bcw``, see :func:`weight_mean_shift`):
    ``"exact"`` subtracts from every fake-quantized weight, per output
    channel, the shift of its mean, ``mean(Q(w)) - mean(w)``, as the reference
    code does (a float simulation: the corrected weights are off the integer
    grid); ``"round"`` feeds the weights as inputs, computed on the grid by
    :func:`mean_preserving_codes` (what hago writes back); ``"bias"`` instead
    folds that shift into the layer's bias,
    ``b - shift * E[window sum of the input]`` with the expected window sums
    of ``input_sums`` (:func:`input_window_sums`), before the bias is
    quantized: what hago exports (:func:`apply_clipping`).
    """

    def __init__(self, graph: Graph, *, mix: bool = False, threads: int | None = None,
                 bias_correction: str | bool | None = None, input_sums: dict | None = None):
        from ..runtime import ort as rt

        self.graph = graph
        self.mix = mix
        mode = _bc_mode(bias_correction)
        if mode == "bias" and input_sums is None:
            raise HagoError("bias_correction='bias' needs input_sums (see hago.algorithms.lapq.input_window_sums)")
        self.bias_correction = mode
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
        self.opset = graph.opset
        self.weight_shift: dict[str, tuple[str, int]] = {}  # weight -> (graph value of its mean shift, out axis)
        self.fed: dict[str, tuple[int, np.ndarray]] = {}  # "round": weight -> (out axis, float weight)
        self._wcache: dict = {}

        zero_name = "hago__zero"
        if mix:
            new_inits.append(numpy_helper.from_array(np.asarray(0.0, np.float32), zero_name))

        def fq(x: str, grp: _Group, out: str, nodes: list, bshape=None) -> None:
            g_ = grp.name
            s, z, lo, hi = f"{g_}__scale", f"{g_}__zp", f"{g_}__lo", f"{g_}__hi"
            p = out + "__"
            res = p + "fq" if mix else out
            start = len(nodes)
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
                # x + t * (Q(x) - x), computed only where t != 0: an If on t skips the quantizer (and its noise)
                # of every layer that is float in this evaluation (all but one while sensitivities are measured)
                inner = nodes[start:]
                del nodes[start:]
                inner += [helper.make_node("Sub", [res, x], [p + "noise"]),
                          helper.make_node("Mul", [p + "noise", f"{g_}__t"], [p + "tn"]),
                          helper.make_node("Add", [x, p + "tn"], [p + "mixed"])]
                vi = [helper.make_tensor_value_info(p + "mixed", onnx.TensorProto.FLOAT, None)]
                off = helper.make_graph([helper.make_node("Identity", [x], [p + "same"])], p + "off", [],
                                        [helper.make_tensor_value_info(p + "same", onnx.TensorProto.FLOAT, None)])
                on = helper.make_graph(inner, p + "on", [], vi)
                nodes += [helper.make_node("Equal", [f"{g_}__t", zero_name], [p + "is0"]),
                          helper.make_node("If", [p + "is0"], [out], then_branch=off, else_branch=on)]

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
                oc = _out_axis(graph, n, w.ndim) if mode else None
                if oc is None:
                    fq(n, self.groups[n], n + "__pq", pre, bshape)
                elif mode == "round":  # on-grid values computed outside (mean_preserving_codes), fed as an input
                    if mix:
                        raise HagoError("bias_correction='round' does not combine with mix=True")
                    inputs.append(helper.make_tensor_value_info(n + "__wq", onnx.TensorProto.FLOAT, list(w.shape)))
                    pre.append(helper.make_node("Identity", [n + "__wq"], [n + "__pq"]))
                    self.fed[n] = (oc, w.astype(np.float32))
                else:
                    # the fake-quantized weight and the shift of its per-output-channel mean
                    fq(n, self.groups[n], n + "__pqraw", pre, bshape)
                    axes = [i for i in range(w.ndim) if i != oc]
                    p = n + "__bc_"
                    mean_w = w.astype(np.float64).mean(axis=tuple(axes), keepdims=True).astype(np.float32)
                    new_inits.append(numpy_helper.from_array(mean_w, p + "mean"))
                    pre.append(_reduce_mean(n + "__pqraw", p + "qmean", axes, self.opset, new_inits, p))
                    pre.append(helper.make_node("Sub", [p + "qmean", p + "mean"], [p + "shift"]))
                    self.weight_shift[n] = (p + "shift", oc)
                    if mode == "exact":
                        pre.append(helper.make_node("Sub", [n + "__pqraw", p + "shift"], [n + "__pq"]))
                    else:
                        pre.append(helper.make_node("Identity", [n + "__pqraw"], [n + "__pq"]))
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
                    b_in = b
                    if mode == "bias" and ws in self.weight_shift and ws in input_sums:
                        # b - shift * E[window sum of the input], then quantized like any bias
                        shift, oc = self.weight_shift[ws]
                        es = np.asarray(input_sums[ws], np.float32)
                        new_inits += [numpy_helper.from_array(es, p + "es"),
                                      numpy_helper.from_array(np.asarray([-1], np.int64), p + "flat")]
                        pre += [helper.make_node("Reshape", [shift, p + "flat"], [p + "shift1"]),
                                helper.make_node("Mul", [p + "shift1", p + "es"], [p + "corr"]),
                                helper.make_node("Sub", [b, p + "corr"], [p + "bcorr"])]
                        b_in = p + "bcorr"
                    pre += [helper.make_node("Mul", [f"{gx}__scale", f"{gw}__scale"], [p + "s"]),
                            helper.make_node("Div", [b_in, p + "s"], [p + "div"]),
                            helper.make_node("Round", [p + "div"], [p + "rnd"]),
                            helper.make_node("Mul", [p + "rnd", p + "s"], [res])]
                    if mix:  # the bias follows its weight's mix
                        pre += [helper.make_node("Sub", [res, b_in], [p + "noise"]),
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
        if gname in self.fed:
            out[gname + "__wq"] = self._on_grid(gname, p["scale"], p["zp"], ann)
        return out

    def _on_grid(self, gname: str, scale, zp, ann: EdgeAnnotation) -> np.ndarray:
        key = (gname, np.asarray(scale).tobytes(), np.asarray(zp).tobytes())
        hit = self._wcache.get(key)
        if hit is None:
            oc, w = self.fed[gname]
            a = ann.copy(scale=np.asarray(scale, np.float32).reshape(np.shape(ann.scale) if ann.per_axis else ()),
                         zero_point=np.asarray(zp, np.int64).reshape(np.shape(ann.scale) if ann.per_axis else ()))
            hit = dequantize_array(mean_preserving_codes(w, a, oc), a)
            if len(self._wcache) > 256:
                self._wcache.clear()
            self._wcache[key] = hit
        return hit

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
    bias_correction: str | None = None  # None, "round", "exact" or "bias" (see lapq)
    init_clip: dict = dataclasses.field(default_factory=dict)  # the Lp init's ranges (step 1)
    folded: list = dataclasses.field(default_factory=list)  # weights whose correction was written (round / bias fold)
    powell_edges: list = dataclasses.field(default_factory=list)  # the tensors Powell optimised
    powell_loss: float | None = None  # the lowest loss Powell found (search engine), kept or reverted
    param_model: object = dataclasses.field(default=None, repr=False)  # the ParamModel of the search (engine="param")
    sim_feeds: dict | None = dataclasses.field(default=None, repr=False)  # its feeds for the written result

    def simulate(self, feeds: dict) -> list[np.ndarray]:
        """Outputs of the search's own simulation (with ``bias_correction="exact"``: the reference code's exact
        weight correction, off the integer grid) at the written clipping; ``feeds``: ``{input_name: array}``."""
        if self.param_model is None or self.sim_feeds is None:
            raise HagoError("simulate needs engine='param'")
        return self.param_model.run(feeds, self.sim_feeds)

    def summary(self) -> str:
        grid = ", ".join(f"p={p:g}: {l:.4f}" for p, l in self.p_grid.items())
        return (f"LAPQ ({self.loss} loss, {len(self.edges)} tensors): fp32 {self.fp32_loss:.4f}, min-max "
                f"{self.minmax_loss:.4f}; Lp grid {grid}; p = {self.p:g}; init {self.init_loss_qdq:.4f} -> "
                f"Powell {self.final_loss_qdq:.4f} ({self.evals} evaluations, {self.seconds['total']:.1f} s)"
                + (f"; bias correction {self.bias_correction} (simulated {self.init_loss:.4f} -> {self.final_loss:.4f})"
                   if self.bias_correction else "")
                + (" [reverted to the Lp init]" if self.reverted else ""))


def noise_power(graph: Graph, observers: dict | None, name: str, r: tuple) -> float:
    """Relative quantization noise power ``E[(Q(x) - x)^2] / E[x^2]`` of an edge clipped to ``r``: weights
    on the constant, activations on their calibration histogram."""
    from ..ir.annotation import fake_quantize

    v = graph.value(name)
    a = graph.annotation(v).copy()
    lo, hi = r
    a.set_range(np.asarray(lo, np.float64) if isinstance(lo, (list, np.ndarray)) else lo,
                np.asarray(hi, np.float64) if isinstance(hi, (list, np.ndarray)) else hi)
    if a.kind == "weight":
        w = Graph.const(v).astype(np.float64)
        e = fake_quantize(w.astype(np.float32), a).astype(np.float64) - w
        return float(np.sum(e * e) / max(np.sum(w * w), 1e-30))
    ob = observers.get(name) if observers else None
    if ob is None or ob.hist is None:
        return 0.0
    h, edges = np.asarray(ob.hist, np.float64), np.asarray(ob.edges, np.float64)
    c = (edges[:-1] + edges[1:]) / 2
    e = fake_quantize(c.astype(np.float32), a).astype(np.float64) - c
    return float(np.sum(h * e * e) / max(np.sum(h * c * c), 1e-30))


def relu_folded(graph: Graph) -> set[str]:
    """Unsigned per-tensor activation edges whose only consumer is a Relu that reuses their quantizer: their
    range is ``[0, max]`` (zero point 0: the quantizer itself clamps the negatives, exactly ``Q(relu(x))``), as
    :func:`hago.calibrate.apply_ranges` sets them and the QDQ export then drops the Relu."""
    from ..calibrate import relu_folds

    return {v.name for v, a in graph.annotated()
            if a.kind == "activation" and not a.fixed and a.tied_to is None and not a.per_axis
            and relu_folds(graph, v, a)}


def _relu_range(ob, a: EdgeAnnotation, method: str) -> tuple:
    """``(0, hi)`` of a Relu-folded edge: the method on the non-negative part of its histogram (negatives are
    clamped to 0 exactly at any clipping, so they do not move the optimum)."""
    from ..calibrate.observers import lp_range

    if method == "minmax":
        return 0.0, max(float(ob.max), 0.0)
    p = float(method.split(":", 1)[1])
    hist, edges = ob.hist, ob.edges
    if hist is None:
        return 0.0, max(float(ob.range(method, a)[1]), 0.0)
    centers = 0.5 * (np.asarray(edges[:-1], np.float64) + np.asarray(edges[1:], np.float64))
    keep = centers >= 0
    if not np.any(keep & (np.asarray(hist) > 0)):
        return 0.0, max(float(ob.max), 0.0)
    _, hi = lp_range(np.asarray(hist)[keep], centers[keep], a, p)
    return 0.0, float(min(max(hi, 0.0), max(float(ob.max), 0.0)))


def lp_ranges(graph: Graph, observers: dict, edges: Sequence[str], p: float,
              folded: set | None = None) -> dict[str, tuple]:
    """Lp-optimal ``(rmin, rmax)`` of each named edge (activations from observers, weights from constants);
    the edges of ``folded`` (:func:`relu_folded`) get ``(0, hi)`` from the non-negative part."""
    from ..calibrate.observers import weight_range

    out = {}
    for name in edges:
        v = graph.value(name)
        a = graph.annotation(v)
        if a.kind == "activation":
            if folded and name in folded:
                out[name] = _relu_range(observers[name], a, f"lp:{p}")
            else:
                out[name] = observers[name].range(f"lp:{p}", a)
        else:
            w = Graph.const(v)
            if w is None:
                raise CalibrationError(f"weight edge {name!r} is not a constant")
            out[name] = weight_range(w, a, f"lp:{p}")
    return out


def minmax_ranges(graph: Graph, observers: dict, edges: Sequence[str], folded: set | None = None) -> dict[str, tuple]:
    from ..calibrate.observers import weight_range

    out = {}
    for name in edges:
        v = graph.value(name)
        a = graph.annotation(v)
        if a.kind != "activation":
            out[name] = weight_range(Graph.const(v), a, "minmax")
        elif folded and name in folded:
            out[name] = _relu_range(observers[name], a, "minmax")
        else:
            out[name] = observers[name].range("minmax", a)
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


P_GRID = tuple(float(p) for p in np.linspace(2.0, 4.0, 10))  # the reference code's grid, np.linspace(2, 4, 10)


def lapq(qg, calib: Iterable[dict], *, p_grid: Sequence[float] = P_GRID, refine_p: bool = True,
         maxiter: int | None = 2, maxfev: int | None = None, loss=None,
         include: Sequence[str] = ("weight", "activation"), xtol: float = 1e-2, ftol: float = 1e-4,
         bounds: tuple[float, float] = (0.05, 1.5), engine: str = "param", max_samples: int | None = None,
         bias_correction: bool | str = True, edges: Sequence[str] | None = None,
         powell_edges: int | Sequence[str] | None = None, threads: int | None = None,
         observers: dict | None = None, verbose: bool = False) -> LapqResult:
    """Loss-aware clipping of a :class:`hago.QuantizedGraph`, in place (annotations, then ``qg.invalidate()``).

    ``calib``: iterable of ``{input_name: array}`` batches, with ``label`` for the
    default cross-entropy loss (without labels the default is KL(fp32 || quantized)
    of the softmax of the first output). ``loss`` may be ``"ce"``, ``"kl"``,
    ``"mse"`` or ``fn(outputs, labels, fp32_outputs) -> float``. ``include`` picks
    the tensors whose clipping is optimised (``"weight"``, ``"activation"``);
    ``edges`` restricts them further to the named edges; the others keep their
    annotation. ``powell_edges`` restricts step 2 only (the p search still
    sets every tensor): the named edges, or an int ``K``, the ``K`` tensors
    with the largest relative quantization noise power at the Lp init
    (:func:`noise_power`); the others keep their Lp clipping. A budget device
    for large models, where one Powell sweep over every tensor is too long.
    ``maxiter``/``maxfev`` bound Powell (the reference code runs 1 or 2
    iterations, no evaluation cap); ``bounds`` are the multiplier bounds relative to the Lp
    range (the upper one is raised per tensor to reach its min-max range).
    ``engine``: ``"param"`` (one QDQ model, parameters fed as inputs) or
    ``"rebuild"`` (export and a new session per evaluation).

    ``bias_correction`` (default True, as the reference code's published runs,
    ``-bcw``): every quantized Conv / Gemm / MatMul weight is corrected, per
    output channel, by the shift of its mean, ``Q(w) - (mean(Q(w)) - mean(w))``
    (the reference's ``ParameterModuleWrapperPost.bias_corr``).

    * ``True`` / ``"round"`` (default): the correction on the integer grid, which
      a QDQ model can hold: :func:`mean_preserving_codes` rounds each channel so
      that its mean stays the float one (to ``s / 2K``, ``K`` weights per
      channel); the search (p grid and Powell) sees those weights and the float
      graph's weights are replaced by them in the written result
      (:class:`WeightRounding`).
    * ``"exact"`` (alias ``"weights"``): the search sees exactly the reference
      code's off-grid weights (``result.final_loss``, ``result.simulate``); the
      written result is then realized on the grid as with ``"round"``
      (``result.final_loss_qdq``). On the MNIST models and PP-OCRv4 the gap
      between the two makes ``"round"`` reach lower exported losses
      (docs/BENCHMARKS.md), hence the default.
    * ``"bias"``: the correction folded into each layer's bias instead,
      ``b - shift * E[window sum of the input]`` (:class:`BiasFold`), in the
      search and the export.

    The float graph's weights (or biases) change with the written result;
    ``qg.lapq_fold.restore(qg.graph)`` puts the originals back.
    Deterministic: no randomness is involved.
    """
    from scipy import optimize

    from ..calibrate import activation_edges, collect_stats
    from ..runtime import ort as rt

    if engine not in ("param", "rebuild"):
        raise HagoError(f"engine={engine!r}: use 'param' or 'rebuild'")
    bad = set(include) - {"weight", "activation"}
    if bad or not include:
        raise HagoError(f"include={tuple(include)!r}: use 'weight' and/or 'activation'")
    if not p_grid:
        raise HagoError("p_grid is empty: give the norms p to try, e.g. (2, 2.5, 3, 3.5, 4)")
    mode = _bc_mode(bias_correction)
    t_start = time.perf_counter()
    g: Graph = qg.graph
    old_fold = getattr(qg, "lapq_fold", None)
    if old_fold is not None:  # a previous LAPQ run folded its correction into the biases: start from the originals
        old_fold.restore(g)
        qg.lapq_fold = None
        qg.invalidate()
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
    if edges is not None:
        unknown = set(edges) - set(names)
        if unknown:
            raise HagoError(f"edges {sorted(unknown)[:5]} are not quantized {' or '.join(include)} tensors "
                            f"of {g.source}")
        keep = set(edges)
        names = [n for n in names if n in keep]
    if not names:
        raise HagoError(f"{g.source}: no quantized {' or '.join(include)} tensors to optimise")
    anns = {n: g.annotation(g.value(n)) for n in names}
    t0 = time.perf_counter()
    if observers is None or any(observers.get(n) is None or observers[n].hist is None for n in act_names if n in anns):
        batches = [{k: v[i:i + 256] for k, v in data.items()} for i in range(0, len(next(iter(data.values()))), 256)]
        observers = collect_stats(g, batches, [n for n in act_names if n in anns], histogram=True, threads=threads)
    fold = None
    sums: dict = {}
    all_weights = [v.name for v, a in g.annotated() if a.kind == "weight"]
    if mode == "bias":
        sums = input_window_sums(g, data, all_weights, threads=threads)
        fold = BiasFold.build(g, all_weights, sums)
    elif mode:  # "exact" (searched in the simulation) and "round" are both written on the grid
        fold = WeightRounding.build(g, all_weights)
    t_stats = time.perf_counter() - t0

    # -- the evaluator ---------------------------------------------------------------------------
    pm = None
    if engine == "param":
        t0 = time.perf_counter()
        pm = ParamModel(g, threads=threads, bias_correction=mode, input_sums=sums)
        ev = LossEvaluator(pm, data, labels, loss_fn, ref)
        base_feeds = pm.params_from_annotations()
        groups_of = {n: pm.edge_group[n] for n in names}
        t_build = time.perf_counter() - t0

        def feeds_of(ranges: dict) -> dict:
            feeds = dict(base_feeds)
            for n, r in ranges.items():
                feeds.update(pm.range_feeds(groups_of[n], r[0], r[1], anns[n]))
            return feeds

        def evaluate(ranges: dict) -> float:
            return ev(feeds_of(ranges))
    else:
        t_build = 0.0
        ev_count = {"evals": 0, "seconds": 0.0}

        def evaluate(ranges: dict) -> float:
            t1 = time.perf_counter()
            apply_clipping(qg, ranges, method=anns[next(iter(anns))].method, fold=fold)
            val = loss_fn(qg.run(data), labels, ref)
            if fold is not None:  # the next ranges are computed from the original weights
                fold.restore(g)
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
    folded_relu = relu_folded(g)
    mm = minmax_ranges(g, observers, names, folded_relu)
    minmax_loss = tracked(mm)
    grid_losses: dict[float, float] = {}
    grid_ranges: dict[float, dict] = {}
    for p in p_grid:
        p = float(p)
        grid_ranges[p] = lp_ranges(g, observers, names, p, folded_relu)
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
            r = lp_ranges(g, observers, names, pr, folded_relu)
            lr = tracked(r)
            if verbose:
                print(f"lapq: refined p={pr:.3f} loss {lr:.5f}")
            if lr < init_loss:
                p_final, init, init_loss = pr, r, lr
    t_step1 = time.perf_counter() - t0

    # -- step 2: Powell on one multiplier per tensor -------------------------------------------------
    t0 = time.perf_counter()
    if powell_edges is None:
        pnames = list(names)
    elif isinstance(powell_edges, (int, np.integer)):
        noise = {n: noise_power(g, observers, n, init[n]) for n in names}
        pnames = sorted(names, key=lambda n: -noise[n])[:int(powell_edges)]
        pnames = [n for n in names if n in set(pnames)]  # network order
    else:
        unknown = set(powell_edges) - set(names)
        if unknown:
            raise HagoError(f"powell_edges {sorted(unknown)[:5]} are not among the optimised tensors")
        pnames = [n for n in names if n in set(powell_edges)]
    lo_b, hi_b = bounds
    bnds = []
    for n in pnames:
        reach = _amax(mm[n]) / max(_amax(init[n]), 1e-12)
        bnds.append((lo_b, max(hi_b, reach * 1.05)))
    best = {"loss": init_loss, "x": np.ones(len(pnames))}

    def point(x) -> dict:
        out = dict(init)
        out.update({n: _scaled(init[n], float(m)) for n, m in zip(pnames, x)})
        return out

    def f(x: np.ndarray) -> float:
        x = np.clip(np.asarray(x, np.float64), [b[0] for b in bnds], [b[1] for b in bnds])
        val = tracked(point(x))
        if val < best["loss"]:
            best["loss"], best["x"] = val, x.copy()
        return val

    options = {"xtol": xtol, "ftol": ftol, "disp": False}
    if maxiter is not None:
        options["maxiter"] = int(maxiter)
    if maxfev is not None:
        options["maxfev"] = int(maxfev)
    res = optimize.minimize(f, np.ones(len(pnames)), method="Powell", bounds=bnds, options=options)
    t_step2 = time.perf_counter() - t0
    x_best = best["x"]
    final = point(x_best)
    mult = dict.fromkeys(names, 1.0)
    mult.update({n: float(m) for n, m in zip(pnames, x_best)})
    sim_feeds = feeds_of(final) if pm is not None else None

    # -- write the annotations; check both points on the exported QDQ model -------------------------------
    def apply(ranges: dict, method: str) -> float:
        apply_clipping(qg, ranges, method=method, fold=fold)
        return loss_fn(qg.run(data), labels, ref)

    init_qdq = apply(init, f"lp:{p_final:.3g}")
    final_qdq = apply(final, "lapq")
    reverted = False
    if final_qdq > init_qdq:
        final_qdq = apply(init, f"lp:{p_final:.3g}")
        final, reverted = init, True
        mult = dict.fromkeys(names, 1.0)
        sim_feeds = feeds_of(init) if pm is not None else None
    qg.lapq_fold = fold
    g.history.append(f"lapq: p={p_final:.3g}, loss {init_qdq:.4g} -> {final_qdq:.4g} ({len(history)} evaluations"
                     + (f", bias correction {mode}" if mode else "") + ")")
    evals = ev.evals if engine == "param" else ev_count["evals"]
    ev_seconds = ev.seconds if engine == "param" else ev_count["seconds"]

    def _tolist(r):
        return tuple(x.tolist() if isinstance(x, np.ndarray) else float(x) for x in r)

    return LapqResult(
        p=float(p_final), p_grid=grid_losses, p_grid_best=float(p_best), p_refined=p_refined, fp32_loss=fp32_loss,
        minmax_loss=minmax_loss, init_loss=init_loss, final_loss=float(best["loss"]) if not reverted else init_loss,
        init_loss_qdq=init_qdq, final_loss_qdq=final_qdq, reverted=reverted, loss=loss_name, history=history,
        clip={n: _tolist(final[n]) for n in names}, multipliers=mult,
        edges=list(names), evals=evals,
        seconds={"stats": t_stats, "build": t_build, "step1": t_step1, "step2": t_step2,
                 "per_eval": ev_seconds / max(evals, 1), "total": time.perf_counter() - t_start},
        engine=engine, powell={"nit": int(getattr(res, "nit", 0)), "nfev": int(getattr(res, "nfev", 0)),
                               "message": str(getattr(res, "message", ""))},
        bias_correction=mode, init_clip={n: _tolist(init[n]) for n in names},
        folded=[e[0] for e in fold.entries] if fold else [], param_model=pm, sim_feeds=sim_feeds,
        powell_edges=list(pnames), powell_loss=float(best["loss"]))
