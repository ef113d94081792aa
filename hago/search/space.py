"""The search space: per-edge bits, per-node float fallback, calibration method.

A :class:`Config` is one point: bits that differ from the spec's maximum, the
nodes kept in float (mixed precision) and the activation threshold method.
:func:`build_space` derives the choices from the spec (HAGO's bit limits) on
the all-integer partition of the graph.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from ..hwspec import HardwareSpec
from ..ir.graph import Graph
from ..passes.annotate import AnnotateOptions, annotate
from ..passes.partition import FUSED_KEY, bit_limits, partition

METHODS = ("minmax", "percentile:99.99", "mse", "kl")


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
    """One candidate: bits per edge (only those below the maximum), float nodes, threshold method."""

    bits: tuple[tuple[str, int], ...] = ()
    float_nodes: frozenset = frozenset()
    method: str = "mse"

    @staticmethod
    def make(bits: dict | None = None, float_nodes=(), method: str = "mse", space: "SearchSpace | None" = None) -> "Config":
        bits = dict(bits or {})
        if space is not None:  # keep only deviations from the maximum
            bits = {k: v for k, v in bits.items() if k in space.edge_index and v != space.edge(k).max}
        return Config(tuple(sorted(bits.items())), frozenset(float_nodes), method)

    def bits_dict(self) -> dict[str, int]:
        return dict(self.bits)

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"bits": dict(self.bits), "float_nodes": sorted(self.float_nodes), "method": self.method}

    @staticmethod
    def from_dict(d: dict) -> "Config":
        return Config(tuple(sorted((k, int(v)) for k, v in d.get("bits", {}).items())),
                      frozenset(d.get("float_nodes", ())), d.get("method", "mse"))


@dataclasses.dataclass
class SearchSpace:
    spec: HardwareSpec
    edges: list[EdgeChoice]  # in HAGO's edge order (topological)
    nodes: list[str]  # integer nodes that may fall back to float
    node_ops: dict[str, str]
    methods: tuple[str, ...] = METHODS

    def __post_init__(self):
        self.edge_index = {e.name: i for i, e in enumerate(self.edges)}

    def edge(self, name: str) -> EdgeChoice:
        return self.edges[self.edge_index[name]]

    def total_bits(self, cfg: Config) -> int:
        b = cfg.bits_dict()
        return sum(b.get(e.name, e.max) for e in self.edges)

    def size(self) -> float:
        n = 1.0
        for e in self.edges:
            n *= len(e.choices)
        return n * 2 ** len(self.nodes) * len(self.methods)

    def describe(self) -> str:
        return (f"{len(self.edges)} edges (bits), {len(self.nodes)} nodes (int/float), {len(self.methods)} methods; "
                f"~10^{len(str(int(min(self.size(), 1e300)))) - 1} points")


def build_space(graph: Graph, spec: HardwareSpec, *, min_bits: int = 4, methods=METHODS, weight_min_bits: int | None = None) -> SearchSpace:
    """Choices per edge (spec limits, not below ``min_bits``, HAGO's 4 by default) and per node."""
    g = graph.clone()
    partition(g, spec)
    annotate(g, spec, AnnotateOptions())
    limits = bit_limits(g, spec)
    edges = []
    for v, a in g.annotated():
        if a.kind == "bias" or a.fixed:
            continue
        lo, hi = limits.get(v.name, (a.bits, a.bits))
        floor = weight_min_bits if (a.kind == "weight" and weight_min_bits) else min_bits
        lo = max(lo, floor) if hi >= floor else hi
        edges.append(EdgeChoice(v.name, a.kind, tuple(range(hi, lo - 1, -1))))
    nodes = [n.name for n in g.nodes() if g.region(n) == "int" and not n.meta.get(FUSED_KEY)]
    return SearchSpace(spec, edges, nodes, {n.name: n.op_type for n in g.nodes()}, tuple(methods))
