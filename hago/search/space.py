"""The search space: per-edge bits, per-node float fallback, calibration methods, signatures, granularity,
SPARQ and multipoint.

A :class:`Config` is one point. Every field lists only deviations from the
default, so the all-default config is ``Config()`` and a config's key (its hash)
does not change when new kinds of choices are added:

* ``bits``: edges whose bits are below the spec's maximum (HAGO's bit choice);
* ``float_nodes``: nodes kept in float (mixed precision);
* ``method``: the activation threshold method of every edge not listed in
  ``methods``;
* ``methods``: per-edge threshold methods (activations: the space's methods;
  weights: ``minmax`` or ``mse``, ``minmax`` by default);
* ``per_tensor``: weight edges quantized per tensor where the spec allows both
  granularities (per channel by default);
* ``signatures``: nodes run with another of the spec's integer signatures
  than the first that fits (HAGO's descriptor selection), by signature index;
* ``sparq``: activation edges entering a Conv/Gemm/MatMul trimmed with SPARQ
  (``"bsparq:<placements>"`` or ``"vsparq:<placements>"``) where the spec
  declares SPARQ; such an edge keeps 8 bits;
* ``multipoint``: Conv/Gemm/MatMul nodes whose weights are split into low-bit
  multipoint layers (``2`` points per channel or ``"adaptive"``) where the
  spec allows low-bit weights.

:func:`build_space` derives the choices from the spec (HAGO's bit limits) on
the all-integer partition of the graph.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from ..hwspec import HardwareSpec
from ..ir.graph import SIGNATURE_KEY, Graph
from ..passes.annotate import AnnotateOptions, annotate
from ..passes.partition import FUSED_KEY, bit_limits, desc_for_input, partition, signature_fits

METHODS = ("minmax", "percentile:99.99", "mse", "kl")
WEIGHT_METHODS = ("minmax", "mse")
SPARQ_OPS = ("Conv", "Gemm", "MatMul")
MULTIPOINT_BITS = 4  # each multipoint point is a 4-bit layer (Liu et al.'s W4 setting)
MULTIPOINT_CHOICES = (2, "adaptive")
MULTIPOINT_BUDGET = 1.5  # average points per channel of the adaptive allocation
MULTIPOINT_MAX = 3


def _pairs(d) -> tuple:
    return tuple(sorted((str(k), v) for k, v in dict(d or {}).items()))


@dataclasses.dataclass(frozen=True)
class EdgeChoice:
    name: str
    kind: str  # activation | weight
    choices: tuple[int, ...]  # high to low (HAGO order)

    @property
    def max(self) -> int:
        return self.choices[0]


@dataclasses.dataclass(frozen=True)
class Config:
    """One candidate: only the deviations from the default of each kind of choice (see the module docstring)."""

    bits: tuple[tuple[str, int], ...] = ()
    float_nodes: frozenset = frozenset()
    method: str = "mse"
    methods: tuple[tuple[str, str], ...] = ()
    per_tensor: frozenset = frozenset()
    signatures: tuple[tuple[str, int], ...] = ()
    sparq: tuple[tuple[str, str], ...] = ()
    multipoint: tuple[tuple[str, object], ...] = ()

    @staticmethod
    def make(bits: dict | None = None, float_nodes=(), method: str = "mse", space: "SearchSpace | None" = None, *,
             methods: dict | None = None, per_tensor=(), signatures: dict | None = None, sparq: dict | None = None,
             multipoint: dict | None = None) -> "Config":
        bits = {k: int(v) for k, v in dict(bits or {}).items()}
        float_nodes = frozenset(float_nodes)
        methods = {k: str(v) for k, v in dict(methods or {}).items()}
        per_tensor = frozenset(per_tensor)
        signatures = {k: int(v) for k, v in dict(signatures or {}).items()}
        sparq = {k: str(v) for k, v in dict(sparq or {}).items() if v}
        multipoint = {k: _mp_value(v) for k, v in dict(multipoint or {}).items() if v}
        if space is not None:  # keep only valid deviations from the defaults
            bits = {k: v for k, v in bits.items() if k in space.edge_index and v != space.edge(k).max}
            methods = {k: v for k, v in methods.items()
                       if k in space.edge_methods and v in space.edge_methods[k] and v != space.default_method(k, method)}
            per_tensor = frozenset(e for e in per_tensor if e in space.granularity)
            signatures = {k: v for k, v in signatures.items()
                          if k in space.signatures and k not in float_nodes and v in space.signatures[k][1:]}
            sparq = {k: v for k, v in sparq.items() if k in space.sparq_edges and v in space.sparq_edges[k]}
            for k in sparq:  # a SPARQ edge keeps its 8-bit codes
                bits.pop(k, None)
            multipoint = {k: v for k, v in multipoint.items()
                          if k in space.multipoint_nodes and k not in float_nodes and v in space.multipoint_nodes[k]}
            gone = {space.multipoint_weight[k] for k in multipoint}  # split weights: their grid is the multipoint's
            bits = {k: v for k, v in bits.items() if k not in gone}
            methods = {k: v for k, v in methods.items() if k not in gone}
            per_tensor = frozenset(e for e in per_tensor if e not in gone)
        return Config(tuple(sorted(bits.items())), float_nodes, method, _pairs(methods), per_tensor,
                      _pairs(signatures), _pairs(sparq), _pairs(multipoint))

    def with_(self, space: "SearchSpace | None" = None, **changes) -> "Config":
        """A copy with some fields replaced (dicts for the per-edge/per-node fields), normalized against ``space``."""
        d = {"bits": self.bits_dict(), "float_nodes": self.float_nodes, "method": self.method,
             "methods": dict(self.methods), "per_tensor": self.per_tensor, "signatures": dict(self.signatures),
             "sparq": dict(self.sparq), "multipoint": dict(self.multipoint)}
        d.update(changes)
        return Config.make(d.pop("bits"), d.pop("float_nodes"), d.pop("method"), space, **d)

    def without_sparq(self) -> "Config":
        return dataclasses.replace(self, sparq=())

    def bits_dict(self) -> dict[str, int]:
        return dict(self.bits)

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        # new kinds of choices are written only when used: keys of configs (and logs) from before them do not change
        d = {"bits": dict(self.bits), "float_nodes": sorted(self.float_nodes), "method": self.method}
        for k in ("methods", "signatures", "sparq", "multipoint"):
            if getattr(self, k):
                d[k] = dict(getattr(self, k))
        if self.per_tensor:
            d["per_tensor"] = sorted(self.per_tensor)
        return d

    @staticmethod
    def from_dict(d: dict) -> "Config":
        return Config(tuple(sorted((k, int(v)) for k, v in d.get("bits", {}).items())),
                      frozenset(d.get("float_nodes", ())), d.get("method", "mse"),
                      _pairs({k: str(v) for k, v in d.get("methods", {}).items()}),
                      frozenset(d.get("per_tensor", ())),
                      _pairs({k: int(v) for k, v in d.get("signatures", {}).items()}),
                      _pairs({k: str(v) for k, v in d.get("sparq", {}).items()}),
                      _pairs({k: _mp_value(v) for k, v in d.get("multipoint", {}).items()}))

    def describe(self) -> str:
        parts = [f"method {self.method}", f"{len(self.float_nodes)} float nodes", f"{len(self.bits)} edges below max bits"]
        for k, what in (("methods", "per-edge methods"), ("per_tensor", "per-tensor weights"),
                        ("signatures", "other signatures"), ("sparq", "SPARQ edges"), ("multipoint", "multipoint nodes")):
            if getattr(self, k):
                parts.append(f"{len(getattr(self, k))} {what}")
        return ", ".join(parts)


def _mp_value(v):
    return "adaptive" if v == "adaptive" else int(v)


def sparq_mode(choice: str) -> tuple[str, int]:
    """``"vsparq:5"`` -> ``("vsparq", 5)``."""
    mode, _, pl = choice.partition(":")
    return mode, int(pl) if pl else 5


@dataclasses.dataclass
class SearchSpace:
    spec: HardwareSpec
    edges: list[EdgeChoice]  # in HAGO's edge order (topological)
    nodes: list[str]  # integer nodes that may fall back to float
    node_ops: dict[str, str]
    methods: tuple[str, ...] = METHODS
    edge_methods: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # edge -> methods, default first
    edge_kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    granularity: list[str] = dataclasses.field(default_factory=list)  # weight edges that may be per tensor
    signatures: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # node -> indices, default first
    signature_bits: dict = dataclasses.field(default_factory=dict)  # (node, index) -> {edge: max bits}
    sparq_edges: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # edge -> SPARQ choices
    sparq_consumers: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # edge -> multiplier nodes
    sparq_axis: dict[str, int] = dataclasses.field(default_factory=dict)  # edge -> vSPARQ pair (channel) axis
    multipoint_nodes: dict[str, tuple] = dataclasses.field(default_factory=dict)  # node -> (2, "adaptive")
    multipoint_weight: dict[str, str] = dataclasses.field(default_factory=dict)  # node -> weight edge
    multipoint_bits: int = MULTIPOINT_BITS

    def __post_init__(self):
        self.edge_index = {e.name: i for i, e in enumerate(self.edges)}

    def edge(self, name: str) -> EdgeChoice:
        return self.edges[self.edge_index[name]]

    def default_method(self, edge: str, method: str) -> str:
        return WEIGHT_METHODS[0] if self.edge_kinds.get(edge) == "weight" else method

    def total_bits(self, cfg: Config) -> int:
        b = cfg.bits_dict()
        return sum(b.get(e.name, e.max) for e in self.edges)

    def effective_bits(self, cfg: Config) -> float:
        """HAGO's objective (sum of edge bits) with the new choices priced in: a SPARQ edge counts its window
        bits, a multipoint weight its bits times its points, another signature its own bit limits."""
        b = cfg.bits_dict()
        cap: dict[str, int] = {}
        for node, idx in cfg.signatures:
            for e, hi in self.signature_bits.get((node, idx), {}).items():
                cap[e] = min(cap.get(e, hi), hi)
        sparq = dict(cfg.sparq)
        wb = (self.spec.sparq or {}).get("window_bits", 4)
        mpw = {self.multipoint_weight[n]: v for n, v in cfg.multipoint if n in self.multipoint_weight}
        total = 0.0
        for e in self.edges:
            bits = min(b.get(e.name, e.max), cap.get(e.name, e.max))
            if e.name in sparq:
                bits = wb
            if e.name in mpw:
                pts = MULTIPOINT_BUDGET if mpw[e.name] == "adaptive" else float(mpw[e.name])
                bits = self.multipoint_bits * pts
            total += bits
        return total

    def extras(self) -> dict[str, int]:
        """How many edges/nodes carry each kind of choice beyond bits and float fallback."""
        return {"edge_methods": len(self.edge_methods), "granularity": len(self.granularity),
                "signatures": len(self.signatures), "sparq": len(self.sparq_edges),
                "multipoint": len(self.multipoint_nodes)}

    def size(self) -> float:
        n = 1.0
        for e in self.edges:
            n *= len(e.choices)
        for ms in self.edge_methods.values():
            n *= len(ms)
        n *= 2.0 ** len(self.granularity)
        for s in self.signatures.values():
            n *= len(s)
        for s in self.sparq_edges.values():
            n *= len(s) + 1
        for s in self.multipoint_nodes.values():
            n *= len(s) + 1
        return n * 2 ** len(self.nodes) * len(self.methods)

    def describe(self) -> str:
        ex = ", ".join(f"{v} {k}" for k, v in self.extras().items() if v)
        return (f"{len(self.edges)} edges (bits), {len(self.nodes)} nodes (int/float), {len(self.methods)} methods"
                + (f"; per-edge/node choices: {ex}" if ex else "")
                + f"; ~10^{len(str(int(min(self.size(), 1e300)))) - 1} points")

    def to_dict(self) -> dict:
        return {"edges": len(self.edges), "nodes": len(self.nodes), "methods": list(self.methods), **self.extras()}


def _sparq_choices(spec: HardwareSpec) -> tuple[str, ...]:
    """SPARQ choices a spec's ``sparq`` section allows: bSPARQ with the declared placements or fewer (a subset of
    the shifter's positions), and vSPARQ (with the declared placements) when the hardware pairs activations."""
    s = spec.sparq
    if not s:
        return ()
    from ..algorithms.sparq import placement_shifts
    from ..errors import SpecError

    wb, pl = int(s.get("window_bits", 4)), int(s.get("placements", 5))
    out = []
    for n in sorted({pl, 3, 2}, reverse=True):
        if n > pl:
            continue
        try:
            placement_shifts(wb, n)
        except SpecError:
            continue
        out.append(f"bsparq:{n}")
    if s.get("pairs", True):
        out.append(f"vsparq:{pl}")
    return tuple(out)


def sparq_pair_axis(v) -> int:
    """vSPARQ pairs neighbouring input channels of the multiplier: axis 1 for Conv/Gemm inputs, the last for MatMul."""
    shape = v.shape
    rank = len(shape) if shape is not None else 0
    if any(u.node.op_type in ("Conv", "Gemm") and u.idx == 0 for u in v.uses()):
        return 1
    return max(rank - 1, 1)


def _multipoint_candidate(node) -> bool:
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return False
    if node.op_type == "Conv":
        return node.attributes.get_int("group", 1) == 1 and len(node.inputs[1].shape or []) == 4
    if node.op_type == "Gemm":
        return not node.attributes.get_int("transA", 0)
    return node.op_type == "MatMul" and len(node.inputs[1].shape or []) == 2


def build_space(graph: Graph, spec: HardwareSpec, *, min_bits: int = 4, methods=METHODS, weight_min_bits: int | None = None,
                per_channel: bool = True, nonnegative=None, extras: bool = True) -> SearchSpace:
    """Choices per edge (spec limits, not below ``min_bits``, HAGO's 4 by default) and per node.

    ``nonnegative``: names of activation edges whose calibration values are all >= 0 (SPARQ needs zero point 0);
    None: do not check. ``extras=False`` gives HAGO's space only (bits, float fallback, one method).
    """
    g = graph.clone()
    partition(g, spec)
    annotate(g, spec, AnnotateOptions(per_channel=per_channel))
    limits = bit_limits(g, spec)
    edges = []
    edge_methods, edge_kinds, granularity = {}, {}, []
    sparq_edges, sparq_consumers, sparq_axis = {}, {}, {}
    sparq_choices = _sparq_choices(spec) if extras else ()
    for v, a in g.annotated():
        if a.kind == "bias" or a.fixed:
            continue
        lo, hi = limits.get(v.name, (a.bits, a.bits))
        floor = weight_min_bits if (a.kind == "weight" and weight_min_bits) else min_bits
        lo = max(lo, floor) if hi >= floor else hi
        edges.append(EdgeChoice(v.name, a.kind, tuple(range(hi, lo - 1, -1))))
        edge_kinds[v.name] = a.kind
        if not extras:
            continue
        if a.kind == "activation" and a.tied_to is None and len(methods) > 1:
            edge_methods[v.name] = tuple(methods)
        elif a.kind == "weight":
            edge_methods[v.name] = WEIGHT_METHODS
            if a.axis is not None:  # per channel, and the spec allows per tensor too?
                descs = [desc_for_input(u.node.meta[SIGNATURE_KEY], u.node, u.idx) for u in v.uses()
                         if u.node.meta.get(SIGNATURE_KEY) is not None]
                if descs and all(d is not None and "per_tensor" in d.granularity for d in descs):
                    granularity.append(v.name)
        if (sparq_choices and a.kind == "activation" and a.dtype == "uint8" and hi == 8
                and (nonnegative is None or v.name in nonnegative)):
            cons = [u.node for u in v.uses() if u.node.op_type in SPARQ_OPS and u.idx == 0
                    and g.region(u.node) == "int"]
            if cons:
                ch = sparq_choices
                shape = v.shape
                axis = sparq_pair_axis(v)
                if shape is None or len(shape) <= axis or not isinstance(shape[axis], int):
                    ch = tuple(c for c in ch if not c.startswith("vsparq"))  # pairs need a static channel count
                if ch:
                    sparq_edges[v.name] = ch
                    sparq_consumers[v.name] = [c.name for c in cons]
                    sparq_axis[v.name] = axis
    nodes = [n.name for n in g.nodes() if g.region(n) == "int" and not n.meta.get(FUSED_KEY)]
    signatures, signature_bits, mp_nodes, mp_weight = {}, {}, {}, {}
    if extras:
        for n in g.nodes():
            if n.name not in nodes:
                continue
            sig = n.meta.get(SIGNATURE_KEY)
            opspec = spec.op(n.op_type)
            fits = [s for s in (opspec.integer_signatures if opspec else []) if signature_fits(s, n) is None]
            if len(fits) > 1:
                order = [sig.index] + [s.index for s in fits if s.index != sig.index]
                signatures[n.name] = tuple(order)
                for s in fits:
                    caps = {}
                    for i, v in enumerate(n.inputs):
                        d = desc_for_input(s, n, i)
                        if v is not None and d is not None and not d.is_float and d.role != "bias":
                            caps[v.name] = d.bits[1]
                    signature_bits[(n.name, s.index)] = caps
            if _multipoint_candidate(n) and sig is not None:
                d = desc_for_input(sig, n, 1)
                wv = n.inputs[1]
                ann = g.annotation(wv)
                if d is not None and d.role == "weight" and d.min_bits <= MULTIPOINT_BITS <= d.max_bits \
                        and ann is not None and not ann.fixed:
                    mp_nodes[n.name] = MULTIPOINT_CHOICES
                    mp_weight[n.name] = wv.name
    return SearchSpace(spec, edges, nodes, {n.name: n.op_type for n in g.nodes()}, tuple(methods),
                       edge_methods=edge_methods, edge_kinds=edge_kinds, granularity=granularity,
                       signatures=signatures, signature_bits=signature_bits, sparq_edges=sparq_edges,
                       sparq_consumers=sparq_consumers, sparq_axis=sparq_axis, multipoint_nodes=mp_nodes,
                       multipoint_weight=mp_weight)
