"""Calibration: choose every annotated edge's range, scale and zero point.

:func:`calibrate` runs the float model on onnxruntime over the calibration
batches with the annotated activation edges as extra outputs and feeds
streaming observers: one pass gives min/max and, when a method needs one, a
histogram that grows with the data; only ``kl``/``entropy`` take a second pass
(a histogram on exactly the final range: TensorRT's KL search is chaotic in
the bin edges). Weights are calibrated from their constants, per channel where
annotated. Edges tied to another edge (outputs of MaxPool, Reshape, Relu...)
reuse its parameters; bias scales are input scale x weight scale.
"""
from __future__ import annotations

import time
from typing import Iterable

import numpy as np

from ..errors import CalibrationError
from ..ir.graph import Graph
from ..runtime import ort as rt
from .observers import EdgeObserver, needs_exact_histogram, needs_histogram, weight_range

__all__ = ["calibrate", "collect_stats", "run_observers", "finalize_derived", "relu_folds", "CalibrationReport"]


class CalibrationReport(dict):
    """What calibration did: batches, samples, seconds, per-method edge counts."""


def _materialize(data: Iterable, input_names) -> list[dict]:
    if data is None:
        raise CalibrationError("no calibration data given: pass an iterable of {input_name: array} batches")
    if isinstance(data, dict):
        data = [data]
    batches = []
    for i, b in enumerate(data):
        feeds = rt.check_batch(b, input_names, i)
        batches.append(feeds)
    if not batches:
        raise CalibrationError("the calibration data is empty")
    return batches


def collect_stats(graph: Graph, data, names, *, bins: int = 2048, histogram: bool = False, threads=None,
                  progress=None, two_pass: bool = False) -> dict[str, EdgeObserver]:
    """Run the float model over ``data`` and return an observer per edge name.

    One run per batch feeds min/max and (``histogram=True``) the histograms
    every threshold method reads. ``two_pass=True`` instead fills the histograms
    in a second run over the data on the final min/max range.
    """
    return run_observers(graph, data, names, bins=bins, histogram=histogram, threads=threads, progress=progress,
                         two_pass=two_pass)[0]


#: bytes of activations the first pass may keep so that a two-pass calibration (``kl``) does not run the model again
#: (beyond it the second pass reruns the model: memory stays bounded)
SECOND_PASS_CACHE_BYTES = 256 << 20


def run_observers(graph: Graph, data, names, *, bins: int = 2048, histogram: bool = False, threads=None,
                  progress=None, two_pass: bool = False, keep_outputs: bool | int = False):
    """:func:`collect_stats` that also returns the model outputs (``[[output arrays] per batch]``, from the
    same runs) of every batch (``keep_outputs=True``) or of the first ``keep_outputs`` batches, for a
    comparison with a quantized model. With ``two_pass``, the first pass keeps the observed activations while they
    fit in :data:`SECOND_PASS_CACHE_BYTES` and the second pass reads them instead of running the model again."""
    names = list(dict.fromkeys(names))
    batches = _materialize(data, graph.input_names)
    model = graph.to_onnx()
    outputs = [o.name for o in model.graph.output] if keep_outputs else []
    fetch = list(dict.fromkeys(names + outputs))
    model = rt.with_outputs(model, fetch)
    stream = histogram and not two_pass
    obs = {n: EdgeObserver(n, bins, histogram=stream) for n in names}
    sess = rt.session(model, threads=threads, source=graph.source)
    pos = {n: i for i, n in enumerate(fetch)}
    kept = []
    cache: list | None = [] if histogram and two_pass else None
    cached = 0
    for i, feeds in enumerate(batches):
        outs = rt.run(sess, feeds, fetch, i)
        for n in names:
            obs[n].update(outs[pos[n]])
        if outputs and (keep_outputs is True or i < keep_outputs):
            kept.append([outs[pos[n]] for n in outputs])
        if cache is not None:
            acts = [outs[pos[n]] for n in names]
            cached += sum(a.nbytes for a in acts)
            if cached <= SECOND_PASS_CACHE_BYTES:
                cache.append(acts)
            else:
                cache = None
        del outs
        if progress:
            progress(1)
    if histogram and two_pass:
        for o in obs.values():
            o.start_histogram()
        for i, feeds in enumerate(batches):
            outs = cache[i] if cache is not None else rt.run(sess, feeds, names, i)
            for n, a in zip(names, outs):
                obs[n].update_histogram(a)
            if progress:
                progress(1)
    return obs, kept


def calibrate(graph: Graph, data, *, method: str | None = None, weight_method: str | None = None,
              bins: int = 2048, threads: int | None = None, progress=None, observers: dict | None = None) -> CalibrationReport:
    """Set range, scale and zero point on every annotated edge of ``graph``.

    ``method`` overrides each activation annotation's own method; ``weight_method``
    each weight's. ``data`` is an iterable of ``{input_name: ndarray}`` batches.
    Pass ``observers`` (from :func:`collect_stats`) to reuse statistics.
    """
    t0 = time.perf_counter()
    acts = activation_edges(graph)
    if method:
        for _, a in acts:
            a.method = method
    batches = _materialize(data, graph.input_names)
    names = [v.name for v, _ in acts]
    hist = any(needs_histogram(a.method) for _, a in acts)
    two_pass = any(needs_exact_histogram(a.method) for _, a in acts)
    if observers is None or (hist and any(observers[n].hist is None for n in names)):
        observers = collect_stats(graph, batches, names, bins=bins, histogram=hist, threads=threads,
                                  progress=progress, two_pass=two_pass) if names else {}
    apply_ranges(graph, observers, weight_method=weight_method)
    report = CalibrationReport(batches=len(batches), samples=int(sum(next(iter(b.values())).shape[0] for b in batches)),
                               seconds=time.perf_counter() - t0, edges=len(acts), histogram=hist)
    graph.history.append(f"calibrate: {len(acts)} activation edges, {len(batches)} batches, {report['seconds']:.2f}s")
    return report


def activation_edges(graph: Graph):
    """Annotated activation edges whose range calibration decides (not fixed, not tied)."""
    return [(v, a) for v, a in graph.annotated() if a.kind == "activation" and not a.fixed and a.tied_to is None]


def apply_ranges(graph: Graph, observers: dict, *, method: str | None = None, weight_method: str | None = None,
                 weights: bool = True) -> None:
    """Ranges from observers (activations) and constants (weights), then derived parameters.

    ``weights=False`` leaves the weights as they are (already calibrated: only the activation method changes).
    """
    for v, a in activation_edges(graph):
        if method:
            a.method = method
        obs = observers.get(v.name)
        if obs is None:  # a constant annotated as an activation (e.g. the bias operand of an Add): its own range
            c = Graph.const(v)
            if c is None:
                raise CalibrationError(f"activation edge {v.name!r} has no calibration statistics")
            c = np.asarray(c, dtype=np.float32)
            lo, hi = (float(c.min()), float(c.max())) if c.size else (0.0, 0.0)
        else:
            lo, hi = obs.range(a.method, a)
        a.set_range(lo, hi)
    _fold_relu_ranges(graph)
    for v, a in graph.annotated():
        if weights and a.kind == "weight" and not a.fixed:
            if weight_method:
                a.method = weight_method
            w = Graph.const(v)
            if w is None:
                raise CalibrationError(f"weight edge {v.name!r} is not a constant")
            lo, hi = weight_range(w, a, a.method)
            a.set_range(lo, hi)
    finalize_derived(graph)


def relu_folds(graph: Graph, v, a) -> bool:
    """Whether the unsigned activation edge ``v`` (annotation ``a``) is read only by a Relu, or a Clip from 0 to a
    constant (Relu6, HardSwish's ``clip(x + 3, 0, 6)``), whose output reuses its quantizer (tied), and is not a graph
    output: quantized on ``[0, min(max, hi)]`` (zero point 0) such an edge gives exactly ``Q(clip(x, 0, hi))``, so
    the Relu / Clip can go (:func:`apply_ranges`, the QDQ export, LAPQ's candidates)."""
    return rectifier_hi(graph, v, a) is not None


def rectifier_hi(graph: Graph, v, a) -> float | None:
    """The upper bound of the Relu / Clip that :func:`relu_folds` folds into ``v``'s quantizer (inf for a Relu), or
    None when it does not apply."""
    if a.signed:
        return None
    uses = list(v.uses())
    if len(uses) != 1 or v.is_graph_output() or uses[0].idx != 0:
        return None
    node = uses[0].node
    bounds = Graph.rectifier_bounds(node)
    if bounds is None:
        return None
    out = node.outputs[0]
    oa = graph.annotation(out) if out is not None else None
    return bounds[1] if oa is not None and oa.tied_to == v.name else None


def _fold_relu_ranges(graph: Graph) -> None:
    """An activation that :func:`relu_folds` is quantized on the Relu's range ``[0, max]`` (a Clip's: ``[0,
    min(max, hi)]``): its zero point becomes 0, so quantization itself clamps the negatives (and saturates at hi).
    The result is exactly ``Q(relu(x))``, negative codes are not wasted, and onnxruntime's QDQ optimizer drops the
    Relu and the Q/DQ pair around it (what its own quantizer produces). Graph outputs and edges read elsewhere are
    left alone."""
    for v, a in activation_edges(graph):
        if a.rmin is None or np.ndim(a.rmin):
            continue
        hi = rectifier_hi(graph, v, a)
        if hi is None or (float(a.rmin) >= 0.0 and float(a.rmax) <= hi):
            continue
        a.set_range(0.0, min(max(float(a.rmax), 0.0), hi))


def finalize_derived(graph: Graph) -> None:
    """Fill parameters that follow from others: tied edges and bias scales."""
    by_name = {v.name: (v, a) for v, a in graph.annotated()}
    for v, a in by_name.values():
        if a.tied_to is None:
            continue
        src = a
        seen = set()
        while src.tied_to is not None and src.tied_to in by_name and src.tied_to not in seen:
            seen.add(src.tied_to)
            src = by_name[src.tied_to][1]
        if src.scale is None:
            continue
        a.rmin, a.rmax, a.scale, a.zero_point = src.rmin, src.rmax, src.scale, src.zero_point
        a.method = src.method
    for v, a in by_name.values():
        if a.kind != "bias":
            continue
        for use in v.uses():
            node = use.node
            xa = graph.annotation(node.inputs[0]) if node.inputs[0] is not None else None
            wa = graph.annotation(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            if xa is None or wa is None or xa.scale is None or wa.scale is None:
                continue
            a.scale = (np.asarray(xa.scale, np.float32) * np.asarray(wa.scale, np.float32)).astype(np.float32)
            a.axis = 0 if np.ndim(a.scale) else None
            a.zero_point = np.zeros_like(np.asarray(a.scale), dtype=np.int64) if np.ndim(a.scale) else np.int64(0)
            b = Graph.const(v)
            if b is not None:
                a.rmin, a.rmax = float(b.min()), float(b.max())
            break
