"""``hago.quantize``: the one-call INT8 (or lower) post-training quantization of a graph.

    qg = hago.quantize(graph, spec, calib_data)
    qg.save("model.qdq.onnx"); qg.evaluate(test_data, metric)

Pipeline: clone the graph -> partition by spec -> annotate edges -> calibrate
(streaming statistics on onnxruntime) -> :class:`QuantizedGraph`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np
import onnx

from .errors import HagoError
from .hwspec import HardwareSpec, load_spec
from .ir import Graph, load
from .ir.graph import REASON_KEY, SIGNATURE_KEY
from .ir.qdq import to_qdq
from .calibrate.auto import AUTO_METHODS  # noqa: F401  (re-exported)
from .runtime import ort as rt


class QuantizedGraph:
    """An annotated, calibrated graph: runs on onnxruntime, saves as QDQ ONNX, compiles with TVM."""

    def __init__(self, graph: Graph, spec: HardwareSpec, options: dict, calibration: dict | None = None):
        self.graph = graph
        self.spec = spec
        self.options = options
        self.calibration = calibration or {}
        self._qdq: onnx.ModelProto | None = None
        self._sess = None

    # -- export -------------------------------------------------------------------
    def to_qdq(self) -> onnx.ModelProto:
        if self._qdq is None:
            self._qdq = to_qdq(self.graph, int4_storage=self.options.get("int4_storage", False))
        return self._qdq

    def invalidate(self) -> None:
        """Call after changing annotations in place (drops the cached QDQ model and session)."""
        self._qdq, self._sess = None, None

    def save(self, path: str) -> str:
        onnx.save(self.to_qdq(), path)
        return path

    # -- execution ------------------------------------------------------------------
    def session(self, threads: int | None = None):
        if self._sess is None:
            self._sess = rt.session(self.to_qdq(), threads=threads, optimize="basic", source=self.graph.source)
        return self._sess

    def run(self, feeds: dict) -> list[np.ndarray]:
        sess = self.session()
        names = [i.name for i in sess.get_inputs()]
        return rt.run(sess, rt.check_batch(feeds, names, 0))

    def predict(self, data: Iterable[dict]) -> list[list[np.ndarray]]:
        return [self.run(b) for b in data]

    def evaluate(self, data: Iterable[dict], metric: Callable | None = None) -> float:
        """Mean of ``metric(outputs, batch)`` over batches (default: top-1 accuracy against ``batch['label']``)."""
        return evaluate(self.run, data, metric)

    # -- reporting ---------------------------------------------------------------------
    def summary(self) -> str:
        return summary(self.graph, self.spec, self.calibration)

    def bits(self) -> dict[str, int]:
        return {v.name: a.bits for v, a in self.graph.annotated()}

    def __repr__(self) -> str:
        return f"<hago.QuantizedGraph {self.graph.source} for {self.spec.name}: {len(self.graph.annotated())} quantized edges>"


def top1(outputs: list[np.ndarray], batch: dict) -> float:
    """Fraction of samples whose argmax over the first output equals ``batch['label']``."""
    if "label" not in batch:
        raise HagoError("the default metric (top-1) needs a 'label' array in each evaluation batch")
    return float(np.mean(np.argmax(outputs[0].reshape(outputs[0].shape[0], -1), axis=1) == np.asarray(batch["label"])))


def evaluate(run: Callable[[dict], list[np.ndarray]], data: Iterable[dict], metric: Callable | None = None) -> float:
    metric = metric or top1
    total, n = 0.0, 0
    for b in data:
        feeds = {k: v for k, v in b.items() if k != "label"}
        size = next(iter(feeds.values())).shape[0]
        total += metric(run(feeds), b) * size
        n += size
    if n == 0:
        raise HagoError("the evaluation data is empty")
    return total / n


def float_runner(graph: Graph, threads: int | None = None) -> Callable[[dict], list[np.ndarray]]:
    """A function running the float graph on onnxruntime."""
    sess = rt.session(graph.to_onnx(), threads=threads, source=graph.source)
    names = [i.name for i in sess.get_inputs()]
    return lambda feeds: rt.run(sess, rt.check_batch(feeds, names, 0))


def quantize(graph, spec, calib_data, *, weight_bits: int | None = None, activation_bits: int | None = None,
             per_channel: bool = True, method: str = "auto", weight_method: str = "minmax",
             symmetric_activations: bool | None = None, overrides: dict | None = None,
             float_nodes=(), sparq: str | None = "spec", int4_storage: bool = False, threads: int | None = None,
             progress=None) -> QuantizedGraph:
    """Quantize ``graph`` for ``spec`` using ``calib_data`` (iterable of ``{input_name: ndarray}``).

    ``graph`` may be a :class:`hago.Graph`, a path or a ModelProto; ``spec`` a
    :class:`HardwareSpec`, a path or a shipped spec name. ``method`` picks the
    activation thresholds: ``minmax``, ``avg_range``, ``percentile[:p]``,
    ``kl``, ``mse``, ``lp:<p>`` or ``auto`` (percentile:99.99 unless another
    method's network outputs are significantly closer to fp32 on the calibration
    data: :mod:`hago.calibrate.auto`). ``float_nodes`` names nodes
    kept in float (mixed precision). ``sparq`` (``"bsparq"``, ``"vsparq"``, None;
    by default what the spec's ``sparq`` section declares) trims the 8-bit codes
    of activations entering Conv/Gemm/MatMul to 4-bit windows, bit-exactly
    (SPARQ, Shomron et al. 2021). Bits default to the spec's maximum and are clamped to what the
    spec allows for each edge (reported in :meth:`QuantizedGraph.summary`).
    """
    from .calibrate import calibrate
    from .passes.annotate import AnnotateOptions, annotate
    from .passes.partition import partition

    g = graph.clone() if isinstance(graph, Graph) else load(graph)
    spec = load_spec(spec)
    opts = AnnotateOptions(weight_bits=weight_bits, activation_bits=activation_bits, per_channel=per_channel,
                           symmetric_activations=symmetric_activations,
                           activation_method="minmax" if method == "auto" else method,
                           weight_method=weight_method, overrides=dict(overrides or {}))
    unknown = set(float_nodes) - {n.name for n in g.nodes()}
    if unknown:
        raise HagoError(f"float_nodes: no node named {sorted(unknown)} in {g.source}")
    partition(g, spec, force_float=frozenset(float_nodes))
    annotate(g, spec, opts)
    report = calibrate(g, calib_data, method=method if method != "auto" else None, threads=threads,
                       progress=progress) if method != "auto" else _calibrate_auto(g, calib_data, threads, progress)
    mark_sparq(g, spec, sparq)
    options = dataclasses.asdict(opts) | {"method": method, "int4_storage": int4_storage,
                                          "float_nodes": sorted(float_nodes)}
    return QuantizedGraph(g, spec, options, report)


SPARQ_OPS = ("Conv", "Gemm", "MatMul")


def mark_sparq(g: Graph, spec: HardwareSpec, mode: str | None = "spec") -> int:
    """Put SPARQ trimming on the calibrated uint8 activation edges with zero point 0 (non-negative, e.g. after
    ReLU) that feed multipliers (Conv/Gemm/MatMul)."""
    if mode == "spec":
        if not spec.sparq:
            return 0
        mode = "vsparq" if spec.sparq.get("pairs", True) else "bsparq"
    if not mode:
        return 0
    if mode not in ("bsparq", "vsparq"):
        raise HagoError(f"sparq={mode!r}: use 'bsparq', 'vsparq' or None")
    cfg = {"mode": mode, "window_bits": (spec.sparq or {}).get("window_bits", 4),
           "placements": (spec.sparq or {}).get("placements", 5), "pair_axis": 1}
    n = 0
    for v, a in g.annotated():
        if a.kind == "activation" and a.dtype == "uint8" and a.bits == 8 and a.zero_point is not None \
                and int(a.zero_point) == 0 and any(
                u.node.op_type in SPARQ_OPS and u.idx == 0 for u in v.uses()):
            a.sparq = dict(cfg)
            n += 1
    g.history.append(f"sparq: {mode} on {n} edges")
    return n


def _calibrate_auto(g: Graph, calib_data, threads, progress):
    """Try each method of AUTO_METHODS; keep percentile:99.99 unless another's outputs are significantly closer to fp32
    (:mod:`hago.calibrate.auto`)."""
    from .calibrate.auto import calibrate_auto

    return calibrate_auto(g, calib_data, threads=threads, progress=progress)


def _auto_reason(cal: dict) -> str:
    """Why auto kept its method: the reference, or how many standard errors closer to fp32 the pick was."""
    ref, m = cal.get("reference"), cal["method"]
    if not ref:
        return ""
    if m == ref:
        return f": no candidate significantly closer to fp32 than {ref}"
    return f": {cal.get('z', {}).get(m, float('nan')):.1f} standard errors closer to fp32 than {ref}"


def summary(graph: Graph, spec: HardwareSpec, calibration: dict | None = None) -> str:
    """Human-readable table: integer/float ops, per-edge bits, calibration methods, fallbacks."""
    nodes = graph.nodes()
    n_int = sum(1 for n in nodes if graph.region(n) == "int")
    lines = [f"hago: {graph.source} for {spec.name}: {n_int} of {len(nodes)} ops in integer"]
    by_op: dict[str, list[int]] = {}
    for n in nodes:
        c = by_op.setdefault(n.op_type, [0, 0])
        c[0 if graph.region(n) == "int" else 1] += 1
    lines.append(f"  {'op':<22}{'integer':>8}{'float':>7}")
    for op, (i, f) in sorted(by_op.items()):
        lines.append(f"  {op:<22}{i:>8}{f:>7}")
    anns = graph.annotated()
    lines.append(f"  quantized edges: {len(anns)}")
    lines.append(f"  {'edge':<40}{'kind':<11}{'type':<8}{'bits':>5}  {'granularity':<12}{'method':<16}")
    for v, a in anns:
        gran = f"axis {a.axis}" if a.per_axis else "tensor"
        lines.append(f"  {v.name[:39]:<40}{a.kind:<11}{a.dtype:<8}{a.bits:>5}  {gran:<12}{a.method:<16}")
    if graph.fallbacks:
        lines.append(f"  float fallbacks ({len(graph.fallbacks)}):")
        for fb in graph.fallbacks:
            lines.append(f"    {fb.node} ({fb.op_type}): {fb.reason}")
    for note in getattr(graph, "notes", []):
        lines.append(f"  note: {note}")
    if calibration:
        lines.append(f"  calibration: {calibration.get('batches')} batches, {calibration.get('samples')} samples, "
                     f"{calibration.get('seconds', 0):.2f} s"
                     + (f", method {calibration['method']} (auto{_auto_reason(calibration)})"
                        if "candidates" in calibration else ""))
    return "\n".join(lines)
