"""Build the quantized graph of a Config quickly, and measure its accuracy on onnxruntime.

Statistics of every float activation edge are collected once (one min/max
pass and one histogram pass); a Config then costs a clone, a partition, an
annotation and a QDQ export, with no new calibration run. :func:`prepare`
applies a config's structural choices (multipoint split, float fallbacks,
signatures, per-edge bits/methods/granularity); :func:`apply_sparq` its SPARQ
trimming once the ranges are known.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..calibrate import _materialize, apply_ranges, collect_stats
from ..errors import HagoError
from ..hwspec import HardwareSpec
from ..ir.graph import SIGNATURE_KEY, Graph
from ..passes.annotate import AnnotateOptions, annotate
from ..passes.partition import FUSED_KEY, partition, signature_fits
from ..pipeline import QuantizedGraph, evaluate, float_runner, top1
from ..runtime import ort as rt
from .space import MULTIPOINT_BITS, MULTIPOINT_BUDGET, MULTIPOINT_MAX, Config, sparq_mode, sparq_pair_axis


# ------------------------------------------------------------------------------------------------
# applying a config's choices to a graph


def multipoint_weights(node, bits: int, n_points):
    """The multipoint weight of ``node`` with ``n_points`` (an int, or one per output channel): the greedy points
    of :func:`hago.algorithms.multipoint.multipoint`, truncated per channel (the adaptive allocation), exactly
    what :func:`hago.passes.multipoint.multipoint_split` builds."""
    from ..algorithms.multipoint import multipoint

    w = Graph.const(node.inputs[1]).astype(np.float32)
    op = node.op_type
    axis = 0 if (op == "Conv" or (op == "Gemm" and node.attributes.get_int("transB", 0))) else 1
    npc = np.broadcast_to(np.asarray(n_points, dtype=np.int64), (w.shape[axis],))
    mp = multipoint(w, bits=bits, n_points=int(npc.max()), axis=axis)
    if int(npc.min()) < int(npc.max()):
        mp = mp.truncate(npc)
    return mp


def apply_multipoint(g: Graph, mps: dict) -> None:
    """Rewrite ``{node name: MultiPoint}`` as sums of low-bit layers (before partition)."""
    from ..passes.multipoint import _rewrite

    for name, mp in mps.items():
        _rewrite(g.graph, g.node(name), mp)
    if mps:
        g.history.append(f"search multipoint: {len(mps)} layers")


def apply_signatures(g: Graph, spec: HardwareSpec, signatures: dict) -> None:
    """Run the named integer nodes with another integer signature of their op (HAGO's descriptor choice)."""
    notes = []
    for node in g.nodes():
        idx = signatures.get(node.name)
        if idx is None and "_mp" in node.name:  # a multipoint copy runs like its layer
            base, _, k = node.name.rpartition("_mp")
            idx = signatures.get(base) if k.isdigit() else None
        if idx is None:
            continue
        opspec = spec.op(node.op_type)
        sig = opspec.signatures[idx] if opspec is not None and 0 <= idx < len(opspec.signatures) else None
        if g.region(node) != "int" or node.meta.get(FUSED_KEY):
            notes.append(f"{node.name}: signature {idx} asked, but the node is not an integer leader")
        elif sig is None or not sig.is_integer or signature_fits(sig, node) is not None:
            notes.append(f"{node.name}: {node.op_type} signature {idx} does not fit; keeping the default")
        else:
            node.meta[SIGNATURE_KEY] = sig
    g.notes = getattr(g, "notes", []) + notes


def overrides(cfg: Config) -> dict:
    """Per-edge annotation overrides of a config: bits, threshold method, per-tensor weights, 8 bits under SPARQ."""
    ov: dict[str, dict] = {}
    for e, b in cfg.bits:
        ov.setdefault(e, {})["bits"] = b
    for e, m in cfg.methods:
        ov.setdefault(e, {})["method"] = m
    for e in cfg.per_tensor:
        ov.setdefault(e, {})["axis"] = None
    for e, _ in cfg.sparq:
        ov.setdefault(e, {})["bits"] = 8
    return ov


def prepare(graph: Graph, spec: HardwareSpec, cfg: Config, *, per_channel: bool = True, multipoint: dict | None = None,
            weight_method: str = "minmax") -> Graph:
    """A clone of ``graph`` with ``cfg``'s structure and annotations (not calibrated).

    ``multipoint``: ``{node: MultiPoint}`` for the config's multipoint nodes (see :func:`multipoint_weights`).
    """
    g = graph.clone()
    mps = {n: mp for n, mp in (multipoint or {}).items() if n not in cfg.float_nodes}
    apply_multipoint(g, mps)
    partition(g, spec, force_float=cfg.float_nodes)
    apply_signatures(g, spec, dict(cfg.signatures))
    # a multipoint weight's grid is fixed by annotate (its original edge is gone, so its overrides do not apply)
    annotate(g, spec, AnnotateOptions(per_channel=per_channel, activation_method=cfg.method, weight_method=weight_method,
                                      overrides=overrides(cfg)))
    return g


def apply_sparq(g: Graph, spec: HardwareSpec, cfg: Config) -> dict[str, dict]:
    """Put the config's SPARQ trimming on its (calibrated) edges: uint8, 8 bits, zero point 0 only."""
    done, notes = {}, []
    wb = int((spec.sparq or {}).get("window_bits", 4))
    want = dict(cfg.sparq)
    for v, a in g.annotated():
        if v.name not in want:
            continue
        mode, pl = sparq_mode(want[v.name])
        zp = np.asarray(a.zero_point) if a.zero_point is not None else None
        if a.kind != "activation" or a.dtype != "uint8" or a.bits != 8 or zp is None or zp.size != 1 or int(zp) != 0:
            notes.append(f"{v.name}: {want[v.name]} asked, but the edge is not an 8-bit uint8 activation with zero point 0")
            continue
        a.sparq = {"mode": mode, "window_bits": wb, "placements": pl, "pair_axis": sparq_pair_axis(v)}
        done[v.name] = dict(a.sparq)
    g.notes = getattr(g, "notes", []) + notes
    if done:
        g.history.append(f"search sparq: {len(done)} edges")
    return done


def agreement(outputs, batch) -> float:
    """Top-1 agreement with the float model (``batch['_ref']`` holds the float outputs)."""
    ref = batch["_ref"]
    a = outputs[0].reshape(outputs[0].shape[0], -1).argmax(1)
    b = ref.reshape(ref.shape[0], -1).argmax(1)
    return float(np.mean(a == b))


class Evaluator:
    def __init__(self, graph: Graph, spec: HardwareSpec, calib, eval_data=None, metric: Callable | None = None, *,
                 per_channel: bool = True, threads: int | None = None):
        self.graph, self.spec, self.per_channel, self.threads = graph, spec, per_channel, threads
        self.calib = _materialize(calib, graph.input_names)
        self.eval = [dict(b) for b in (eval_data if eval_data is not None else self.calib)]
        if not self.eval:
            raise HagoError("the evaluation data is empty")
        run_fp = float_runner(graph, threads)
        if metric is None:
            if all("label" in b for b in self.eval):
                metric = top1
            else:  # no labels: top-1 agreement with the float model
                for b in self.eval:
                    b["_ref"] = run_fp({k: v for k, v in b.items() if not k.startswith("_") and k != "label"})[0]
                metric = agreement
        self.metric = metric
        names = [v.name for v in graph.values() if v.producer() is not None or v.is_graph_input()]
        names = [n for n in names if self._is_float(graph.value(n))]
        self.observers = collect_stats(graph, self.calib, names, histogram=True, threads=threads)
        self.fp32_accuracy = self._evaluate(run_fp)
        self._mp_plans: dict = {}
        self._mp_cache: dict = {}
        self._samples: dict = {}

    @staticmethod
    def _is_float(v) -> bool:
        import onnx_ir as ir

        return v.dtype in (ir.DataType.FLOAT, None) and v.const_value is None

    def nonnegative(self) -> set[str]:
        """Activation edges whose calibration values are all >= 0 (zero point 0: where SPARQ applies)."""
        return {n for n, o in self.observers.items() if o.batches and o.min >= 0.0}

    def multipoint_plan(self, node: str, choice) -> dict:
        """``{"bits", "n_points"}`` of a multipoint choice (``2`` or ``"adaptive"``); the adaptive allocation is
        computed once from the calibration inputs (:func:`hago.passes.multipoint.multipoint_split`)."""
        key = (node, choice)
        if key not in self._mp_plans:
            if choice == "adaptive":
                from ..passes.multipoint import multipoint_split

                res = multipoint_split(self.graph.clone(), self.calib, bits=MULTIPOINT_BITS, budget_avg=MULTIPOINT_BUDGET,
                                       max_points=MULTIPOINT_MAX, nodes=[node])
                npts = [int(x) for x in res[node].n_points]
            else:
                npts = int(choice)
            self._mp_plans[key] = {"bits": MULTIPOINT_BITS, "n_points": npts}
        return self._mp_plans[key]

    def multipoints(self, cfg: Config) -> dict:
        out = {}
        for node, choice in cfg.multipoint:
            if node in cfg.float_nodes:
                continue
            key = (node, choice)
            if key not in self._mp_cache:
                plan = self.multipoint_plan(node, choice)
                self._mp_cache[key] = multipoint_weights(self.graph.node(node), plan["bits"], plan["n_points"])
            out[node] = self._mp_cache[key]
        return out

    def _activation_samples(self, edges) -> None:
        for e in edges:
            if e not in self._samples and e in self.calib[0]:  # a graph input
                self._samples[e] = np.asarray(self.calib[0][e], np.float32)[:8]
        need = [e for e in edges if e not in self._samples]
        if need:
            sess = rt.session(rt.with_outputs(self.graph.to_onnx(), need), threads=self.threads, source=self.graph.source)
            for e, a in zip(need, rt.run(sess, self.calib[0], need, 0)):
                self._samples[e] = np.asarray(a, np.float32)[:8]

    def _f8(self, e: str, scale, zp, axis: int) -> float:
        from ..algorithms.sparq import vsparq

        q = np.clip(np.rint(self._samples[e] / np.float32(scale)) + int(zp), 0, 255).astype(np.int64)
        return float(vsparq(q, pair_axis=axis)[1]["frac_8bit_pairs"])

    def frac_8bit_pairs(self, g: Graph, edges: dict[str, dict]) -> dict[str, float]:
        """Fraction of activation pairs that take vSPARQ's 8-bit path (one code of the pair is zero), from the
        float activations of the first calibration batch quantized with each edge's parameters."""
        self._activation_samples(list(edges))
        out = {}
        for e, cfg in edges.items():
            a = g.annotation(g.value(e))
            out[e] = self._f8(e, a.scale, a.zero_point, cfg.get("pair_axis", 1))
        return out

    def default_frac_8bit_pairs(self, axes: dict[str, int]) -> dict[str, float]:
        """:meth:`frac_8bit_pairs` with 8-bit min/max parameters (before any trial has built the edge)."""
        self._activation_samples(list(axes))
        return {e: self._f8(e, max(float(self.observers[e].max), 1e-12) / 255.0, 0, ax) for e, ax in axes.items()}

    def build(self, cfg: Config) -> QuantizedGraph:
        g = prepare(self.graph, self.spec, cfg, per_channel=self.per_channel, multipoint=self.multipoints(cfg))
        apply_ranges(g, self.observers)
        sparq = apply_sparq(g, self.spec, cfg)
        f8 = self.frac_8bit_pairs(g, sparq) if sparq else {}
        for e, d in sparq.items():
            d["frac_8bit_pairs"] = f8.get(e, 0.0)
        opts = {"method": cfg.method, "float_nodes": sorted(cfg.float_nodes), "config": cfg.to_dict(), "sparq": sparq,
                "multipoint": {n: self.multipoint_plan(n, c) for n, c in cfg.multipoint if n not in cfg.float_nodes}}
        return QuantizedGraph(g, self.spec, opts)

    def _evaluate(self, run) -> float:
        data = [{k: v for k, v in b.items() if k != "_ref"} | ({"_ref": b["_ref"]} if "_ref" in b else {}) for b in self.eval]

        def run_inputs(feeds):
            return run({k: v for k, v in feeds.items() if not k.startswith("_") and k != "label"})

        return evaluate(run_inputs, data, self.metric)

    def accuracy(self, qg: QuantizedGraph) -> float:
        sess = rt.session(qg.to_qdq(), threads=self.threads, optimize="basic", source=self.graph.source)
        names = [i.name for i in sess.get_inputs()]
        return self._evaluate(lambda feeds: rt.run(sess, rt.check_batch(feeds, names, 0)))

    def output_error(self, qg: QuantizedGraph, batches: int = 2) -> float:
        """Mean normalized squared error of the outputs vs fp32 on a few calibration batches (inverse SQNR)."""
        sess = rt.session(qg.to_qdq(), threads=self.threads, optimize="basic")
        ref = rt.session(self.graph.to_onnx(), threads=self.threads)
        err = 0.0
        for i, b in enumerate(self.calib[:batches]):
            for r, o in zip(rt.run(ref, b), rt.run(sess, b)):
                err += float(np.mean((r - o) ** 2) / (np.var(r) + 1e-12))
        return err / min(batches, len(self.calib))
