"""Export an annotated graph as a QDQ ONNX model that onnxruntime (and hago's backend) runs.

Every annotated edge ``x`` gets its quantizer (see docs/DESIGN.md):

* activation: ``x -> [Clip] -> QuantizeLinear -> DequantizeLinear -> consumers``; the Clip
  narrows the container to fewer bits (e.g. 6-bit values in uint8); a dtype that
  QuantizeLinear does not take (int32) is simulated with Div/Round/Clip/Mul;
* weight: the initializer is stored quantized (int8, or int4 with ``int4_storage``)
  followed by ``DequantizeLinear`` (per-channel scale and axis where annotated);
* bias: stored as int32 with scale = input scale x weight scale.

Q/DQ nodes carry ``hago.bits`` and ``hago.kind`` in their metadata_props.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError
from .annotation import DTYPES, EdgeAnnotation, quantize_array
from .graph import Graph

_ONNX_DTYPE = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8, "int16": onnx.TensorProto.INT16,
               "uint16": onnx.TensorProto.UINT16, "int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4,
               "int32": onnx.TensorProto.INT32}
_NP_DTYPE = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32}
_Q_DTYPES = ("int8", "uint8", "int16", "uint16", "int4", "uint4")  # QuantizeLinear outputs (opset 21)


def _tensor(name: str, arr: np.ndarray, dtype: str | None = None) -> onnx.TensorProto:
    if dtype in ("int4", "uint4"):
        return helper.make_tensor(name, _ONNX_DTYPE[dtype], arr.shape, arr.astype(np.int64).ravel().tolist())
    return numpy_helper.from_array(arr, name)


def _meta(node: onnx.NodeProto, ann: EdgeAnnotation) -> onnx.NodeProto:
    for k, v in (("hago.bits", str(ann.bits)), ("hago.kind", ann.kind), ("hago.method", ann.method)):
        p = node.metadata_props.add()
        p.key, p.value = k, v
    return node


def _scale_zp(ann: EdgeAnnotation, name: str, container: str):
    if ann.scale is None:
        raise ModelError(f"edge {name!r} is annotated but not calibrated (run hago.calibrate first)")
    scale = np.asarray(ann.scale, dtype=np.float32)
    zp = np.asarray(ann.zero_point if ann.zero_point is not None else 0)
    if not ann.per_axis:
        scale, zp = scale.reshape(()), zp.reshape(())
    return scale, zp.astype(_NP_DTYPE.get(container, np.int8) if container not in ("int4", "uint4") else np.int64)


def sparq_luts(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """256-entry tables of the bSPARQ-trimmed code and of the code kept when its pair neighbour is zero."""
    from ..algorithms.sparq import bsparq, vsparq

    codes = np.arange(256, dtype=np.int64)
    wb, pl, rnd = cfg.get("window_bits", 4), cfg.get("placements", 5), cfg.get("rounding", True)
    trimmed = bsparq(codes, window_bits=wb, placements=pl, rounding=rnd).astype(np.int64)
    pairs = np.stack([codes, np.zeros_like(codes)], axis=1)
    wide = vsparq(pairs, pair_axis=1, window_bits=wb, placements=pl, rounding=rnd)[0][:, 0].astype(np.int64)
    return trimmed, wide


def _sparq_nodes(name: str, ann: EdgeAnnotation, nodes: list, inits: list, graph: Graph) -> str:
    """Bit-exact SPARQ on the uint8 codes: a 256-entry lookup (bSPARQ), and for vSPARQ a neighbour test per pair."""
    trimmed, wide = sparq_luts(ann.sparq)
    p = name + "__sparq"
    inits += [_tensor(p + "_lut", trimmed.astype(np.uint8)), _tensor(p + "_wide", wide.astype(np.uint8))]
    nodes.append(helper.make_node("Cast", [name + "__q"], [p + "_i"], to=onnx.TensorProto.INT64, name=p + "_Cast"))
    nodes.append(helper.make_node("Gather", [p + "_lut", p + "_i"], [p + "_b"], axis=0, name=p + "_Lut"))
    if ann.sparq.get("mode") != "vsparq":
        return p + "_b"
    axis = int(ann.sparq.get("pair_axis", 1))
    shape = graph.value(name).shape
    c = shape[axis] if shape is not None and len(shape) > axis else None
    if not isinstance(c, int):
        raise ModelError(f"edge {name!r}: vSPARQ pairs channels along axis {axis}, whose size must be static")
    src = name + "__q"
    if c % 2:  # an odd tail pairs with an implicit zero, as the reference kernel does
        rank = len(shape)
        pads = [0] * (2 * rank)
        pads[rank + axis] = 1
        inits.append(_tensor(p + "_pads", np.array(pads, np.int64)))
        nodes.append(helper.make_node("Pad", [src, p + "_pads"], [p + "_padded"], name=p + "_Pad"))
        src = p + "_padded"
    # neighbour of channel 2k is 2k+1 and vice versa: swap the two halves of each pair
    inits += [_tensor(p + "_s0", np.array([0], np.int64)), _tensor(p + "_s1", np.array([1], np.int64)),
              _tensor(p + "_end", np.array([2**31], np.int64)), _tensor(p + "_ax", np.array([axis], np.int64)),
              _tensor(p + "_two", np.array([2], np.int64)), _tensor(p + "_ax1", np.array([axis + 1], np.int64))]
    nodes += [helper.make_node("Slice", [src, p + "_s0", p + "_end", p + "_ax", p + "_two"], [p + "_even"], name=p + "_Even"),
              helper.make_node("Slice", [src, p + "_s1", p + "_end", p + "_ax", p + "_two"], [p + "_odd"], name=p + "_Odd"),
              helper.make_node("Unsqueeze", [p + "_even", p + "_ax1"], [p + "_eu"], name=p + "_EU"),
              helper.make_node("Unsqueeze", [p + "_odd", p + "_ax1"], [p + "_ou"], name=p + "_OU"),
              helper.make_node("Concat", [p + "_ou", p + "_eu"], [p + "_swap"], axis=axis + 1, name=p + "_Swap"),
              helper.make_node("Shape", [src], [p + "_shape"], name=p + "_Shape"),
              helper.make_node("Reshape", [p + "_swap", p + "_shape"], [p + "_nb"], name=p + "_Nb")]
    if c % 2:
        inits.append(_tensor(p + "_c", np.array([c], np.int64)))
        nodes.append(helper.make_node("Slice", [p + "_nb", p + "_s0", p + "_c", p + "_ax"], [p + "_nbc"], name=p + "_NbC"))
        nb = p + "_nbc"
    else:
        nb = p + "_nb"
    inits.append(_tensor(p + "_zero", np.array(0, np.uint8)))
    nodes += [helper.make_node("Equal", [nb, p + "_zero"], [p + "_nbzero"], name=p + "_NbZero"),
              helper.make_node("Gather", [p + "_wide", p + "_i"], [p + "_w"], axis=0, name=p + "_Wide"),
              helper.make_node("Where", [p + "_nbzero", p + "_w", p + "_b"], [p + "_v"], name=p + "_Where")]
    return p + "_v"


def to_qdq(graph: Graph, *, int4_storage: bool = False) -> onnx.ModelProto:
    """The annotated graph as a QDQ ONNX ModelProto (the float graph is not modified)."""
    model = graph.to_onnx()
    g = model.graph
    anns = {v.name: a for v, a in graph.annotated()}
    if not anns:
        return model
    inits = {t.name: t for t in g.initializer}
    new_inits: list[onnx.TensorProto] = []
    pre_nodes: list[onnx.NodeProto] = []  # weight DQs and graph-input quantizers
    after: dict[str, list[onnx.NodeProto]] = {}  # producer output name -> quantizer nodes
    rename: dict[str, str] = {}
    for name, ann in anns.items():
        container = ann.dtype
        if ann.kind in ("weight", "bias"):
            if name not in inits:
                raise ModelError(f"{graph.source}: {ann.kind} edge {name!r} is not an initializer")
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            store = container
            if ann.kind == "weight" and int4_storage and ann.bits <= 4:
                store = "int4" if ann.signed else "uint4"
            q = quantize_array(w, ann)
            scale, zp = _scale_zp(ann, name, store)
            qname, sname, zname, out = name + "__q", name + "__scale", name + "__zp", name + "__dq"
            new_inits += [_tensor(qname, q.astype(_NP_DTYPE.get(store, np.int64)) if store in _NP_DTYPE else q, store),
                          _tensor(sname, scale), _tensor(zname, zp, store)]
            attrs = {"axis": int(ann.axis)} if ann.per_axis else {}
            pre_nodes.append(_meta(helper.make_node("DequantizeLinear", [qname, sname, zname], [out], name=name + "__DQ", **attrs), ann))
            rename[name] = out
            continue
        scale, zp = _scale_zp(ann, name, container)
        sname, zname = name + "__scale", name + "__zp"
        nodes = []
        src = name
        full = ann.bits == DTYPES[ann.dtype][1] and not ann.narrow
        if container in _Q_DTYPES:
            if not full:
                lo = np.float32((ann.qmin - float(zp)) * float(scale))
                hi = np.float32((ann.qmax - float(zp)) * float(scale))
                new_inits += [_tensor(name + "__lo", np.array(lo, np.float32)), _tensor(name + "__hi", np.array(hi, np.float32))]
                nodes.append(helper.make_node("Clip", [src, name + "__lo", name + "__hi"], [name + "__clip"], name=name + "__Clip"))
                src = name + "__clip"
            new_inits += [_tensor(sname, scale), _tensor(zname, zp, container)]
            nodes.append(_meta(helper.make_node("QuantizeLinear", [src, sname, zname], [name + "__q"], name=name + "__Q"), ann))
            qout = name + "__q"
            if ann.sparq and float(zp) == 0 and container == "uint8":
                qout = _sparq_nodes(name, ann, nodes, new_inits, graph)
            nodes.append(_meta(helper.make_node("DequantizeLinear", [qout, sname, zname], [name + "__dq"], name=name + "__DQ"), ann))
        else:  # simulated quantizer for containers QuantizeLinear lacks (int32)
            zpf = np.asarray(zp, np.float32)
            new_inits += [_tensor(sname, scale), _tensor(zname, zpf),
                          _tensor(name + "__qmin", np.array(ann.qmin, np.float32)),
                          _tensor(name + "__qmax", np.array(ann.qmax, np.float32))]
            nodes += [
                helper.make_node("Div", [src, sname], [name + "__div"], name=name + "__Div"),
                helper.make_node("Round", [name + "__div"], [name + "__round"], name=name + "__Round"),
                helper.make_node("Add", [name + "__round", zname], [name + "__addzp"], name=name + "__AddZp"),
                _meta(helper.make_node("Clip", [name + "__addzp", name + "__qmin", name + "__qmax"], [name + "__q"], name=name + "__SimQ"), ann),
                helper.make_node("Sub", [name + "__q", zname], [name + "__subzp"], name=name + "__SubZp"),
                _meta(helper.make_node("Mul", [name + "__subzp", sname], [name + "__dq"], name=name + "__SimDQ"), ann),
            ]
        rename[name] = name + "__dq"
        after.setdefault(name, []).extend(nodes)

    # A Relu between two quantizers with the same parameters and zero point 0 is implied by the quantizer (it
    # clamps negatives to code 0): drop it and its output's Q/DQ, exactly, as onnxruntime's own quantizer does. So
    # is a Clip from 0 to hi when the quantizer also saturates at hi (its top code is the one hi rounds to).
    outputs = {o.name for o in g.output}
    ir_nodes = {n.name: n for n in graph.nodes() if n.op_type in ("Relu", "Clip")}
    dropped: set[int] = set()
    for k, node in enumerate(g.node):
        if node.name not in ir_nodes or node.output[0] in outputs:
            continue
        bounds = Graph.rectifier_bounds(ir_nodes[node.name])
        if bounds is None:
            continue
        hi = bounds[1]
        x, r = node.input[0], node.output[0]
        ax, ar = anns.get(x), anns.get(r)
        if ax is None or ar is None or ar.tied_to != x or ax.kind != "activation" or ax.dtype != "uint8":
            continue
        if ax.sparq or ar.sparq or ax.narrow or ax.bits != 8 or np.ndim(ax.zero_point) or ax.zero_point is None:
            continue
        if int(ax.zero_point) != 0 or x not in rename:
            continue
        if np.isfinite(hi) and np.round(np.float32(hi) / np.float32(ax.scale)) < ax.qmax:
            continue  # values between hi and the quantizer's top would pass: keep the Clip
        dropped.add(k)
        after.pop(r, None)
        rename[r] = rename[x]

    graph_inputs = {i.name for i in g.input}
    nodes_out: list[onnx.NodeProto] = list(pre_nodes)
    for n in graph_inputs:
        nodes_out.extend(after.pop(n, []))
    for k, node in enumerate(g.node):
        if k in dropped:
            continue
        for i, x in enumerate(node.input):
            if x in rename:
                node.input[i] = rename[x]
        nodes_out.append(node)
        for o in node.output:
            nodes_out.extend(after.pop(o, []))
    for n in list(after):  # quantizers of initializers used as activations
        nodes_out[:0] = after.pop(n)
    used = {x for nd in nodes_out for x in nd.input}
    keep = [t for t in g.initializer if t.name in used or t.name in {o.name for o in g.output}]
    del g.node[:]
    g.node.extend(nodes_out)
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    model.producer_name = "hago"
    return model
