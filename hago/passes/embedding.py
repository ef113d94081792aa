"""Row-wise 4-bit embedding tables in the graph (Guan et al., 2019).

:func:`quantize_embeddings` finds ``Gather(table, ids)`` on a large 2-D float
initializer (an embedding lookup), quantizes the table row-wise with
:mod:`hago.algorithms.embedding` (greedy range search or a codebook) and
replaces the lookup by a **dequantizing gather** made of standard ONNX ops, so
onnxruntime (and TVM's ONNX importer) run it and only the looked-up rows are
decoded:

    Gather(packed uint8 [R, D/2], ids) -> BitwiseAnd 15 / BitShift 4 -> interleave -> Cast
      * Gather(scale fp16 [R], ids) + Gather(bias fp16 [R], ids)

``MatMul(x, table)`` with a large constant table is stored the same way and
decoded once at load time (dequantize-on-load: onnxruntime folds it at session
creation), which keeps the model file small.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..algorithms.embedding import PackedTable, quantize_rowwise
from ..errors import HagoError
from ..ir.graph import Graph


def _const(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                 const_value=ir.tensor(arr, name=name))
    graph.register_initializer(v)
    return v


def _node(graph: ir.Graph, before: ir.Node, op: str, inputs, name: str, **attrs) -> ir.Value:
    n = ir.Node("", op, inputs, attributes=[_attr(k, v) for k, v in attrs.items()], name=name, num_outputs=1)
    n.outputs[0].name = name + "_out"
    graph.insert_before(before, n)
    return n.outputs[0]


def _attr(k, v):
    if isinstance(v, str):
        return ir.AttrString(k, v)
    if isinstance(v, (list, tuple)):
        return ir.AttrInt64s(k, list(v))
    return ir.AttrInt64(k, int(v))


def decode_rows(graph: ir.Graph, before: ir.Node, pt: PackedTable, prefix: str, ids: ir.Value | None) -> ir.Value:
    """Emit the dequantizing gather (``ids`` given) or the whole-table decode (``ids`` None)."""
    if pt.bits != 4:
        raise HagoError(f"{prefix}: the graph form supports 4-bit tables (got {pt.bits} bits)")
    packed = _const(graph, prefix + "_packed", pt.packed)
    scale = _const(graph, prefix + "_scale", pt.scale.astype(np.float16))
    bias = _const(graph, prefix + "_bias", pt.bias.astype(np.float16))
    if ids is not None:
        rows = _node(graph, before, "Gather", [packed, ids], prefix + "_rows", axis=0)
        s = _node(graph, before, "Gather", [scale, ids], prefix + "_srows", axis=0)
        b = _node(graph, before, "Gather", [bias, ids], prefix + "_brows", axis=0)
    else:
        rows, s, b = packed, scale, bias
    lo = _node(graph, before, "BitwiseAnd", [rows, _const(graph, prefix + "_mask", np.array(15, np.uint8))], prefix + "_lo")
    hi = _node(graph, before, "BitShift", [rows, _const(graph, prefix + "_four", np.array(4, np.uint8))], prefix + "_hi",
               direction="RIGHT")
    axes = _const(graph, prefix + "_lastaxis", np.array([-1], np.int64))
    lo_u = _node(graph, before, "Unsqueeze", [lo, axes], prefix + "_lo_u")
    hi_u = _node(graph, before, "Unsqueeze", [hi, axes], prefix + "_hi_u")
    both = _node(graph, before, "Concat", [lo_u, hi_u], prefix + "_both", axis=-1)
    # [..., nbytes, 2] -> [..., nbytes*2]: keep the leading dims, merge the last two
    shape = _node(graph, before, "Shape", [rows], prefix + "_shape")
    lead = _node(graph, before, "Slice", [shape, _const(graph, prefix + "_z", np.array([0], np.int64)),
                                          _const(graph, prefix + "_m1", np.array([-1], np.int64))], prefix + "_lead")
    newshape = _node(graph, before, "Concat", [lead, _const(graph, prefix + "_w", np.array([pt.packed.shape[1] * 2], np.int64))],
                     prefix + "_newshape", axis=0)
    codes = _node(graph, before, "Reshape", [both, newshape], prefix + "_codes")
    if pt.packed.shape[1] * 2 != pt.dim:
        codes = _node(graph, before, "Slice", [codes, _const(graph, prefix + "_s0", np.array([0], np.int64)),
                                               _const(graph, prefix + "_sd", np.array([pt.dim], np.int64)), axes], prefix + "_trim")
    codes_f = _node(graph, before, "Cast", [codes], prefix + "_codes_f", to=int(ir.DataType.FLOAT))
    s_f = _node(graph, before, "Cast", [s], prefix + "_scale_f", to=int(ir.DataType.FLOAT))
    b_f = _node(graph, before, "Cast", [b], prefix + "_bias_f", to=int(ir.DataType.FLOAT))
    s_u = _node(graph, before, "Unsqueeze", [s_f, axes], prefix + "_scale_u")
    b_u = _node(graph, before, "Unsqueeze", [b_f, axes], prefix + "_bias_u")
    scaled = _node(graph, before, "Mul", [codes_f, s_u], prefix + "_scaled")
    return _node(graph, before, "Add", [scaled, b_u], prefix + "_rows_f")


def quantize_embeddings(graph: Graph, *, bits: int = 4, method: str = "greedy", min_rows: int = 1024,
                        tables: dict | None = None) -> dict:
    """Replace large embedding lookups (and MatMuls on large constant tables) by 4-bit packed forms.

    Returns ``{initializer name: PackedTable}`` for the tables it quantized;
    pass ``tables`` to reuse already quantized tables.
    """
    g = graph.graph
    done: dict[str, PackedTable] = dict(tables or {})
    for node in list(g):
        if node.op_type not in ("Gather", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        ti = 0 if node.op_type == "Gather" else 1
        if node.op_type == "Gather" and node.attributes.get_int("axis", 0) != 0:
            continue
        t = node.inputs[ti]
        arr = Graph.const(t) if t is not None else None
        if arr is None or arr.ndim != 2 or arr.dtype != np.float32 or arr.shape[0] < min_rows:
            continue
        if node.op_type == "MatMul":  # rows of the table are the K input features' weight vectors
            pass
        pt = done.get(t.name)
        if pt is None:
            pt = quantize_rowwise(arr, bits=bits, method=method)
            done[t.name] = pt
        prefix = (node.name or t.name) + "_q4"
        if node.op_type == "Gather":
            out = decode_rows(g, node, pt, prefix, node.inputs[1])
            ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
            if node.outputs[0].is_graph_output():
                out.name = node.outputs[0].name
            g.remove(node, safe=True)
        else:
            table = decode_rows(g, node, pt, prefix, None)
            node.replace_input_with(ti, table)
    for name in list(done):
        v = g.initializers.get(name)
        if v is not None and not v.uses():
            del g.initializers[name]
    graph.history.append(f"quantize_embeddings: {len(done)} table(s), {bits}-bit row-wise ({method})")
    return done
