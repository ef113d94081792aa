"""hago's graph IR: an onnx-ir model whose edges (values) carry annotations.

``hago.load`` reads an ONNX file (or ModelProto), checks it, and returns a
:class:`Graph`. Edges are onnx-ir ``Value`` objects (producer, uses, shape,
dtype); quantization decisions live on them as :class:`EdgeAnnotation` in
``value.meta["hago.ann"]``. Node-level decisions made by passes (integer or
float region, chosen signature) live in ``node.meta``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import ModelError
from .annotation import ANN_KEY, EdgeAnnotation

REGION_KEY = "hago.region"  # node.meta: "int" or "float"
SIGNATURE_KEY = "hago.signature"  # node.meta: the chosen spec signature
REASON_KEY = "hago.reason"  # node.meta: why a node stays float


@dataclasses.dataclass
class Fallback:
    """A node that stays float, and why."""

    node: str
    op_type: str
    reason: str


class Graph:
    """A model being quantized: an ``onnx_ir.Model`` plus hago's annotations."""

    def __init__(self, model: ir.Model, source: str | None = None):
        self.model = model
        self.source = source or "<model>"
        self.fallbacks: list[Fallback] = []
        self.history: list[str] = []  # passes applied, in order

    # -- structure -----------------------------------------------------------------
    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    @property
    def opset(self) -> int:
        return self.graph.opset_imports.get("", self.model.opset_imports.get("", 0))

    def nodes(self) -> list[ir.Node]:
        """Nodes of the main graph in topological order (subgraphs are not entered)."""
        return list(self.graph)

    def all_nodes(self) -> Iterator[ir.Node]:
        """Nodes of the main graph and of all subgraphs (If/Loop/Scan bodies)."""
        return ir.traversal.RecursiveGraphIterator(self.graph)

    @property
    def inputs(self) -> list[ir.Value]:
        return list(self.graph.inputs)

    @property
    def outputs(self) -> list[ir.Value]:
        return list(self.graph.outputs)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]

    @property
    def initializers(self) -> dict[str, ir.Value]:
        return dict(self.graph.initializers)

    def values(self) -> list[ir.Value]:
        """All edges of the main graph: inputs, initializers and node outputs."""
        seen: dict[int, ir.Value] = {}
        for v in list(self.graph.inputs) + list(self.graph.initializers.values()):
            seen[id(v)] = v
        for node in self.graph:
            for v in node.outputs:
                seen[id(v)] = v
        return list(seen.values())

    def value(self, name: str) -> ir.Value:
        for v in self.values():
            if v.name == name:
                return v
        raise ModelError(f"{self.source}: no edge named {name!r}")

    def node(self, name: str) -> ir.Node:
        for n in self.graph:
            if n.name == name:
                return n
        raise ModelError(f"{self.source}: no node named {name!r}")

    @staticmethod
    def const(value: ir.Value) -> np.ndarray | None:
        """The constant array of an initializer edge, or None."""
        t = value.const_value
        return None if t is None else t.numpy()

    @staticmethod
    def rectifier_bounds(node: ir.Node) -> tuple[float, float] | None:
        """``(0, hi)`` when ``node`` is a Relu (``hi`` infinite) or a Clip with constant min 0 and a constant max
        ``hi > 0`` (or none): a quantizer with zero point 0 whose range ends at or below ``hi`` computes it exactly,
        so it can be folded into the quantizer of its input. Else None."""
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Relu" and len(node.inputs) == 1:
            return 0.0, float("inf")
        if node.op_type != "Clip" or not node.inputs or len(node.inputs) > 3:
            return None
        lo_v = node.inputs[1] if len(node.inputs) > 1 else None
        hi_v = node.inputs[2] if len(node.inputs) > 2 else None
        lo = Graph.const(lo_v) if lo_v is not None else None
        hi = Graph.const(hi_v) if hi_v is not None else None
        if lo is None or lo.size != 1 or float(lo.reshape(())) != 0.0:
            return None
        if hi_v is not None and (hi is None or hi.size != 1 or not float(hi.reshape(())) > 0.0):
            return None
        return 0.0, float(hi.reshape(())) if hi is not None else float("inf")

    # -- annotations --------------------------------------------------------------
    @staticmethod
    def annotation(value: ir.Value) -> EdgeAnnotation | None:
        return value.meta.get(ANN_KEY)

    @staticmethod
    def annotate(value: ir.Value, ann: EdgeAnnotation | None) -> None:
        if ann is None:
            value.meta.pop(ANN_KEY, None)
        else:
            value.meta[ANN_KEY] = ann

    def annotated(self) -> list[tuple[ir.Value, EdgeAnnotation]]:
        return [(v, v.meta[ANN_KEY]) for v in self.values() if ANN_KEY in v.meta]

    @staticmethod
    def region(node: ir.Node) -> str | None:
        return node.meta.get(REGION_KEY)

    # -- copies, hashing, I/O -----------------------------------------------------
    def to_onnx(self) -> onnx.ModelProto:
        """The float model as an ONNX ModelProto (annotations are not included: see hago.ir.qdq)."""
        return ir.serde.serialize_model(self.model)

    def save(self, path: str) -> str:
        onnx.save(self.to_onnx(), path)
        return path

    def clone(self) -> "Graph":
        """A deep copy, annotations and node decisions included."""
        proto = self.to_onnx()
        g = Graph(ir.serde.deserialize_model(proto), self.source)
        g.fallbacks = list(self.fallbacks)
        g.history = list(self.history)
        src_vals = {v.name: v for v in self.values()}
        for v in g.values():
            old = src_vals.get(v.name)
            if old is not None:
                for k, val in old.meta.items():
                    v.meta[k] = val.copy() if isinstance(val, EdgeAnnotation) else val
        src_nodes = {n.name: n for n in self.graph}
        for n in g.graph:
            old = src_nodes.get(n.name)
            if old is not None:
                for k, val in old.meta.items():
                    n.meta[k] = val
        return g

    def hash(self) -> str:
        """A stable hash of the float model's structure and weights."""
        h = hashlib.sha256()
        proto = self.to_onnx()
        proto.graph.doc_string = ""
        h.update(proto.graph.SerializeToString(deterministic=True))
        return h.hexdigest()[:16]

    # -- printing ----------------------------------------------------------------
    def table(self, max_rows: int | None = None) -> str:
        """The graph as a table: node, op, region, inputs and outputs with annotations."""
        rows = [("node", "op", "region", "inputs", "outputs")]

        def edge(v: ir.Value | None) -> str:
            if v is None:
                return "-"
            ann = self.annotation(v)
            name = v.name or "?"
            return f"{name}[{ann.short()}]" if ann else name

        for n in self.graph:
            rows.append(
                (
                    n.name or "?",
                    n.op_type if not n.domain else f"{n.domain}.{n.op_type}",
                    self.region(n) or "",
                    ", ".join(edge(v) for v in n.inputs),
                    ", ".join(edge(v) for v in n.outputs),
                )
            )
            if max_rows and len(rows) > max_rows:
                rows.append(("...", "", "", "", ""))
                break
        widths = [min(max(len(r[i]) for r in rows), 60) for i in range(4)]

        def fmt(r):
            cells = [r[i][: widths[i]].ljust(widths[i]) for i in range(4)]
            return "  ".join(cells + [r[4]])

        return "\n".join(fmt(r) for r in rows)

    def __repr__(self) -> str:
        return f"<hago.Graph {self.source}: {len(self.graph)} nodes, opset {self.opset}, {len(self.annotated())} annotated edges>"


def _read_proto(path_or_proto, source: str) -> onnx.ModelProto:
    if isinstance(path_or_proto, onnx.ModelProto):
        return path_or_proto
    if isinstance(path_or_proto, (bytes, bytearray)):
        try:
            return onnx.load_model_from_string(bytes(path_or_proto))
        except Exception as e:  # protobuf DecodeError and friends
            raise ModelError(f"{source}: not a valid ONNX model ({type(e).__name__}: {e})") from None
    path = os.fspath(path_or_proto)
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, expected an .onnx file")
    try:
        return onnx.load(path)
    except Exception as e:
        raise ModelError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e)[:200]})") from None


def load(path_or_proto, *, canonicalize: bool = True, opset: int = 21) -> Graph:
    """Load an ONNX model (path, bytes or ModelProto) into a :class:`Graph`.

    With ``canonicalize=True`` (the default) the canonicalization passes run:
    opset upgrade, shape inference, constant folding, BatchNorm folding and
    Identity/Dropout removal (see :mod:`hago.ir.canonicalize`).
    """
    source = os.fspath(path_or_proto) if isinstance(path_or_proto, (str, os.PathLike)) else "<model>"
    proto = _read_proto(path_or_proto, source)
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelError(f"{source}: the model has no graph nodes")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        msg = str(e).strip().splitlines()
        # outputs declared without a shape are common in exported models and harmless: shape inference fills them
        if not (msg and "Field 'shape' of 'type' is required but missing" in msg[0]):
            raise ModelError(f"{source}: invalid ONNX model: {msg[0] if msg else e}") from None
    except ValueError:
        pass  # > 2 GB protos cannot be checked in memory; the importer still validates structure
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise ModelError(f"{source}: cannot import the model ({type(e).__name__}: {e})") from None
    g = Graph(model, source)
    if canonicalize:
        from .canonicalize import canonicalize as _canon

        g = _canon(g, opset=opset)
    return g


def iter_batches(data: Iterable) -> Iterator[dict]:
    """Normalize calibration/eval data to an iterator of ``{name: ndarray}`` dicts."""
    if isinstance(data, dict):
        yield data
        return
    yield from data
