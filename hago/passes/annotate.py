"""Annotate: put an EdgeAnnotation on every edge that enters an integer op.

For each integer node (see :mod:`hago.passes.partition`) and each input whose
descriptor in the chosen signature is an integer type, the edge gets an
annotation: role (activation, weight, bias), container dtype, bits (the
descriptor's maximum, or the requested bits clamped to the edge's bit limit),
symmetry, per-channel axis for weights, and the calibration method. An edge
read by several integer ops gets one annotation that satisfies all of them
(the narrowest bits).
"""
from __future__ import annotations

import dataclasses

import numpy as np

import onnx_ir as ir

from ..errors import HagoError
from ..hwspec import HardwareSpec
from ..ir.annotation import EdgeAnnotation
from ..ir.graph import SIGNATURE_KEY, Graph
from .partition import FUSED_KEY, bit_limits, desc_for_input


@dataclasses.dataclass
class AnnotateOptions:
    """What the user may choose within the spec's limits."""

    weight_bits: int | None = None  # None: the spec's maximum
    activation_bits: int | None = None
    per_channel: bool = True  # per-channel weights where the spec allows
    symmetric_activations: bool | None = None  # None: the spec's choice (asymmetric if it allows both)
    activation_method: str = "minmax"
    weight_method: str = "minmax"
    overrides: dict = dataclasses.field(default_factory=dict)  # edge name -> {bits, method, ...}


def weight_axis(node: ir.Node, ndim: int) -> int:
    """The output-channel axis of a node's weight (input 1)."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul":
        return ndim - 1
    return 0


def annotate(graph: Graph, spec: HardwareSpec, options: AnnotateOptions | None = None) -> Graph:
    """Annotate the input edges of integer nodes (run :func:`partition` first)."""
    opts = options or AnnotateOptions()
    limits = bit_limits(graph, spec)
    for v in graph.values():
        graph.annotate(v, None)
    notes: list[str] = []
    for node in graph.nodes():
        sig = node.meta.get(SIGNATURE_KEY)
        if sig is None or node.meta.get(FUSED_KEY):
            continue
        for i, v in enumerate(node.inputs):
            d = desc_for_input(sig, node, i)
            if v is None or d is None or d.is_float:
                continue
            if d.role == "bias":
                ann = EdgeAnnotation(kind="bias", dtype="int32", bits=32, symmetric=True, method="derived",
                                     note="scale = input scale x weight scale")
            else:
                lo, hi = limits.get(v.name, d.bits)
                want = opts.weight_bits if d.role == "weight" else opts.activation_bits
                bits = hi if want is None else want
                if bits > hi or bits < lo:
                    clamped = min(max(bits, lo), hi)
                    notes.append(f"{v.name}: {bits} bits asked, spec {spec.name} allows {lo}-{hi} for "
                                 f"{node.op_type} {d.role}s; using {clamped}")
                    bits = clamped
                if d.role == "weight":
                    symmetric = True if d.symmetric is None else d.symmetric
                    const = v.const_value
                    ndim = len(const.shape) if const is not None else 0
                    axis = weight_axis(node, ndim) if (opts.per_channel and d.per_channel and ndim >= 2) else None
                    method = opts.weight_method
                else:
                    symmetric = d.symmetric if d.symmetric is not None else bool(opts.symmetric_activations)
                    axis = None
                    method = opts.activation_method
                ann = EdgeAnnotation(kind=d.role, dtype=d.dtype, bits=bits, symmetric=symmetric, axis=axis, method=method)
            over = opts.overrides.get(v.name)
            if over:
                try:
                    ann = ann.copy(**over)
                except (TypeError, ValueError) as e:
                    raise HagoError(f"override for edge {v.name!r}: {e}") from None
                if ann.kind != "bias":
                    lo, hi = limits.get(v.name, d.bits)
                    if not lo <= ann.bits <= hi:  # the spec's limits hold for overrides too (e.g. AVX2 saturation)
                        notes.append(f"{v.name}: override asks {ann.bits} bits, spec {spec.name} allows {lo}-{hi}; "
                                     f"using {min(max(ann.bits, lo), hi)}")
                        ann = ann.copy(bits=min(max(ann.bits, lo), hi))
            grid = v.meta.get("hago.weight_grid") if ann.kind == "weight" else None
            if grid is not None:  # multipoint: the weight is on a fixed per-channel grid
                ann = ann.copy(bits=grid["bits"], axis=grid["axis"], symmetric=True, narrow=True, fixed=True,
                               method="multipoint")
                ann.scale = np.asarray(grid["scale"], np.float32)
                ann.zero_point = np.zeros(len(ann.scale), np.int64)
            old = graph.annotation(v)
            if old is not None:
                if old.dtype != ann.dtype or old.kind != ann.kind:
                    notes.append(f"{v.name}: consumers disagree ({old.dtype} {old.kind} vs {ann.dtype} {ann.kind}); "
                                 f"keeping {old.dtype}")
                    continue
                ann = old.copy(bits=min(old.bits, ann.bits))
            graph.annotate(v, ann)
    _fixed_and_tied(graph, spec)
    graph.history.append(f"annotate: {len(graph.annotated())} edges")
    graph.notes = getattr(graph, "notes", []) + notes
    return graph


def _fixed_and_tied(graph: Graph, spec: HardwareSpec) -> None:
    """Fixed output ranges (Sigmoid/Softmax) and outputs that reuse their input's scale."""
    for v, ann in graph.annotated():
        p = v.producer()
        if p is None or ann.kind != "activation":
            continue
        if p.op_type in spec.fixed_ranges:
            lo, hi = spec.fixed_ranges[p.op_type]
            ann.fixed = True
            ann.method = "fixed"
            ann.set_range(lo, hi)
            continue
        if p.op_type in spec.same_scale_ops and p.inputs and p.inputs[0] is not None:
            src = graph.annotation(p.inputs[0])
            if src is not None and src.dtype == ann.dtype and src.bits == ann.bits and src.kind == "activation":
                ann.tied_to = p.inputs[0].name
