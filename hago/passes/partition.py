"""Partition by spec: which ops run in integer and which stay float (HAGO's integer-region analysis).

In topological order, a node is

* **float** if its op has no integer signature in the spec (reason reported),
  if no integer signature fits it (e.g. its weight is not constant), or if all
  its inputs come from float nodes and the op also has a float signature;
* **integer** otherwise, with the first integer signature (in spec order) that
  fits; all its quantizable input edges will be annotated;
* **fused** (integer, no quantizer on its input) when it follows a leader in a
  spec fusion group (e.g. Relu after Conv) and is that leader's only consumer.

So integer regions start at ops that only run in integer (Conv, Gemm) and spread
through ops that run either way (Relu, MaxPool, Add, Concat, Reshape), stopping
at float-only ops. Nodes in subgraphs (If/Loop/Scan bodies) stay float.
The result is stored in ``node.meta`` (``hago.region``, ``hago.signature``,
``hago.reason``) and ``graph.fallbacks``.
"""
from __future__ import annotations

import onnx_ir as ir

from ..hwspec import HardwareSpec, Signature
from ..ir.graph import REASON_KEY, REGION_KEY, SIGNATURE_KEY, Fallback, Graph

FUSED_KEY = "hago.fused"  # node.meta: True for a fusion follower (no quantizer on its input)
CONTROL_FLOW = {"If", "Loop", "Scan"}
VARIADIC = {"Concat", "Sum", "Max", "Min", "Mean"}


def desc_for_input(sig: Signature, node: ir.Node, i: int):
    """The descriptor a signature gives input ``i`` (variadic ops repeat the last one)."""
    d = sig.input(i)
    if d is None and node.op_type in VARIADIC and sig.inputs:
        d = sig.inputs[-1]
    return d


def _is_float_tensor(v: ir.Value) -> bool:
    return v.dtype in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def signature_fits(sig: Signature, node: ir.Node) -> str | None:
    """None if ``sig`` can run ``node``, else the reason it cannot."""
    n_in = len(node.inputs)
    if n_in > len(sig.inputs) and node.op_type not in VARIADIC:
        return f"signature {sig.index} describes {len(sig.inputs)} inputs, node has {n_in}"
    for i, v in enumerate(node.inputs):
        d = desc_for_input(sig, node, i)
        if v is None or d is None or d.is_float:
            continue
        if not _is_float_tensor(v):
            return f"input {i} ({v.name}) is {v.dtype}, not a float tensor to quantize"
        if d.role in ("weight", "bias") and v.const_value is None:
            return f"input {i} ({v.name}) must be a constant {d.role}"
    if node.op_type == "Clip":
        for i in (1, 2):
            if i < n_in and node.inputs[i] is not None and node.inputs[i].const_value is None:
                return "Clip bounds are not constant"
    return None


def partition(graph: Graph, spec: HardwareSpec, force_float: set[str] | frozenset[str] = frozenset()) -> Graph:
    """Mark every node of the main graph integer or float per ``spec`` (see module docstring).

    ``force_float`` names nodes that must stay float (mixed precision chosen by
    the user or the search); they are reported with that reason.
    """
    graph.fallbacks = []
    region: dict[int, str] = {}
    for node in graph.nodes():
        for k in (REGION_KEY, SIGNATURE_KEY, REASON_KEY, FUSED_KEY):
            node.meta.pop(k, None)
        op = node.op_type
        reason = None
        chosen = None
        opspec = spec.op(op) if node.domain in ("", "ai.onnx") else None
        if node.name in force_float:
            reason = "kept float by request (mixed precision)"
        elif node.meta.get("hago.multipoint_sum"):
            reason = "sums multipoint branches (dequantized accumulators, no requantization)"
        elif op in CONTROL_FLOW:
            reason = "control flow stays float (its subgraphs are not quantized)"
        elif opspec is None:
            reason = f"op {op} is not in spec {spec.name}" if not node.domain else f"custom op {node.domain}.{op}"
        elif not opspec.integer_signatures:
            reason = f"spec {spec.name} runs {op} in float only"
        else:
            producers = [v.producer() for v in node.inputs if v is not None]
            int_inputs = any(p is not None and region.get(id(p)) == "int" for p in producers)
            if not int_inputs and opspec.float_signatures:
                reason = "all inputs are float and the op can run in float"
            else:
                why = []
                for sig in opspec.integer_signatures:
                    r = signature_fits(sig, node)
                    if r is None:
                        chosen = sig
                        break
                    why.append(r)
                if chosen is None:
                    reason = "no integer signature fits: " + "; ".join(why)
        if chosen is None:
            region[id(node)] = "float"
            node.meta[REGION_KEY] = "float"
            node.meta[REASON_KEY] = reason
            graph.fallbacks.append(Fallback(node.name, op, reason))
            continue
        region[id(node)] = "int"
        node.meta[REGION_KEY] = "int"
        node.meta[SIGNATURE_KEY] = chosen
        # fusion: this node follows a leader whose only consumer it is
        x = node.inputs[0] if node.inputs else None
        p = x.producer() if x is not None else None
        if (p is not None and region.get(id(p)) == "int" and not p.meta.get(FUSED_KEY)
                and op in spec.fusion_followers(p.op_type) and len(list(x.uses())) == 1 and not x.is_graph_output()):
            node.meta[FUSED_KEY] = True
    graph.history.append(f"partition: {sum(1 for v in region.values() if v == 'int')} integer, "
                         f"{sum(1 for v in region.values() if v == 'float')} float nodes ({spec.name})")
    return graph


def bit_limits(graph: Graph, spec: HardwareSpec) -> dict[str, tuple[int, int]]:
    """HAGO's bit limit of each quantizable edge: (min, max) bits allowed by consumer and producer signatures."""
    limits: dict[str, tuple[int, int]] = {}
    for node in graph.nodes():
        sig: Signature | None = node.meta.get(SIGNATURE_KEY)
        if sig is None or node.meta.get(FUSED_KEY):
            continue
        for i, v in enumerate(node.inputs):
            d = desc_for_input(sig, node, i)
            if v is None or d is None or d.is_float or d.role == "bias":
                continue
            lo, hi = d.bits
            p = v.producer()
            psig = p.meta.get(SIGNATURE_KEY) if p is not None else None
            if psig is not None and psig.output not in ("same", "float32", "float16", "none"):
                from ..hwspec.spec import INT_DTYPES

                hi = min(hi, INT_DTYPES[psig.output][1])
            old = limits.get(v.name)
            limits[v.name] = (max(lo, old[0]), min(hi, old[1])) if old else (lo, hi)
    return limits
