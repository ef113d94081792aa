"""Multipoint quantization in the graph (Liu et al., AAAI 2021): a layer as a sum of low-bit layers.

:func:`multipoint_split` approximates each chosen Conv (group 1) / Gemm / MatMul
weight per output channel by ``sum_i a_i q_i`` (low-bit integer vectors, greedy
on the residual; the number of points per channel chosen adaptively from the
channel's output error on calibration inputs under an average budget) and
rewrites the layer as ``n`` ordinary copies, one per point, whose outputs are
summed. Each copy's weight lies exactly on its own per-channel grid (scale
``a_i``), recorded on the weight edge so annotation keeps it: the QDQ export
and the integer code reproduce the codes exactly, with common low-bit
operations only ("mixed precision without mixed precision"). The summing Adds
stay in float (they add dequantized int32 accumulators, no requantization).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..algorithms.multipoint import MultiPoint, multipoint, multipoint_adaptive
from ..calibrate import _materialize
from ..errors import HagoError
from ..ir.graph import Graph
from ..runtime import ort as rt

WEIGHT_GRID_KEY = "hago.weight_grid"  # value.meta: {"scale": [C], "bits": b, "axis": a} (fixed by multipoint)
SUM_KEY = "hago.multipoint_sum"  # node.meta: an Add summing multipoint branches (stays float)


def _im2col(x: np.ndarray, node: ir.Node, w_shape, max_rows: int, rs) -> np.ndarray:
    """Sampled patches [rows, Cin*kh*kw] of a 2-D convolution input, in the weight's flattening order."""
    n, c, h, wd = x.shape
    kh, kw = w_shape[2], w_shape[3]
    sh, sw = (list(node.attributes.get_ints("strides", [1, 1])) + [1, 1])[:2]
    dh, dw = (list(node.attributes.get_ints("dilations", [1, 1])) + [1, 1])[:2]
    pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        ph = max(0, ((h + sh - 1) // sh - 1) * sh + (kh - 1) * dh + 1 - h)
        pw = max(0, ((wd + sw - 1) // sw - 1) * sw + (kw - 1) * dw + 1 - wd)
        pads = [ph // 2, pw // 2, ph - ph // 2, pw - pw // 2]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (xp.shape[2] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[3] - (kw - 1) * dw - 1) // sw + 1
    total = n * oh * ow
    idx = rs.choice(total, size=min(max_rows, total), replace=False)
    b, rem = np.divmod(idx, oh * ow)
    oy, ox = np.divmod(rem, ow)
    rows = np.empty((len(idx), c, kh, kw), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            rows[:, :, i, j] = xp[b, :, oy * sh + i * dh, ox * sw + j * dw]
    return rows.reshape(len(idx), -1)


def candidates(graph: Graph) -> list[ir.Node]:
    out = []
    for n in graph.nodes():
        if len(n.inputs) < 2 or n.inputs[1] is None or n.inputs[1].const_value is None:
            continue
        if n.op_type == "Conv" and n.attributes.get_int("group", 1) == 1 and len(n.inputs[1].shape or []) == 4:
            out.append(n)
        elif n.op_type == "Gemm" and not n.attributes.get_int("transA", 0):
            out.append(n)
        elif n.op_type == "MatMul" and len(n.inputs[1].shape or []) == 2:
            out.append(n)
    return out


def multipoint_split(graph: Graph, calib, *, bits: int = 4, points: int | None = None, budget_avg: float = 1.5,
                     max_points: int = 3, nodes=None, samples: int = 2048, seed: int = 0) -> dict[str, MultiPoint]:
    """Rewrite the chosen layers as sums of low-bit layers (in place). Returns ``{node name: MultiPoint}``.

    ``points`` fixes the number of points of every channel; otherwise points are
    allocated per channel from output errors with average ``budget_avg``.
    """
    g = graph.graph
    chosen = candidates(graph)
    if nodes is not None:
        names = set(nodes)
        chosen = [n for n in chosen if n.name in names]
        missing = names - {n.name for n in chosen}
        if missing:
            raise HagoError(f"multipoint: {sorted(missing)} are not Conv(group 1)/Gemm/MatMul nodes with constant weights")
    batches = _materialize(calib, graph.input_names)
    xs: dict[str, list] = {}
    if points is None and chosen:
        names_in = sorted({n.inputs[0].name for n in chosen})
        sess = rt.session(rt.with_outputs(graph.to_onnx(), names_in), source=graph.source)
        for i, b in enumerate(batches):
            for name, a in zip(names_in, rt.run(sess, b, names_in, i)):
                xs.setdefault(name, []).append(a)
    rs = np.random.RandomState(seed)
    result = {}
    for node in chosen:
        wv = node.inputs[1]
        w = Graph.const(wv).astype(np.float32)
        op = node.op_type
        axis = 0 if (op == "Conv" or (op == "Gemm" and node.attributes.get_int("transB", 0))) else 1
        if points is not None:
            mp = multipoint(w, bits=bits, n_points=points, axis=axis)
        else:
            x = np.concatenate(xs[node.inputs[0].name], axis=0)
            if op == "Conv":
                patches = _im2col(x, node, w.shape, samples, rs)
                w2 = w.reshape(w.shape[0], -1)
            else:
                patches = x.reshape(-1, x.shape[-1])
                if len(patches) > samples:
                    patches = patches[rs.choice(len(patches), samples, replace=False)]
                w2 = w if axis == 0 else w.T
            mp2 = multipoint_adaptive(w2, patches, bits=bits, budget_avg=budget_avg, max_points=max_points, axis=0)
            mp = MultiPoint(alphas=mp2.alphas, codes=mp2.codes.reshape((mp2.n,) + (w.shape if axis == 0 else w.T.shape)),
                            bits=bits, axis=0, n_points=mp2.n_points)
            if axis == 1:
                mp = MultiPoint(alphas=mp.alphas, codes=np.swapaxes(mp.codes, 1, 2), bits=bits, axis=1, n_points=mp.n_points)
        _rewrite(g, node, mp)
        result[node.name] = mp
    graph.history.append(f"multipoint_split: {len(result)} layers, {bits}-bit points"
                         + (f", {points} per channel" if points else f", adaptive (average {budget_avg})"))
    return result


def _rewrite(g: ir.Graph, node: ir.Node, mp: MultiPoint) -> None:
    ints, scales = mp.as_split_weights()
    out = node.outputs[0]
    base = node.inputs[1].name
    branch_outs = []
    prev = node
    for i, (q, s) in enumerate(zip(ints, scales)):
        s = np.asarray(s, dtype=np.float32)
        safe = np.where(s > 0, s, 1.0).astype(np.float32)
        shp = [1] * q.ndim
        shp[mp.axis] = -1
        wi = (q.astype(np.float32) * s.reshape(shp)).astype(np.float32)
        name = f"{base}_mp{i}"
        wv = ir.Value(name=name, shape=ir.Shape(wi.shape), type=ir.TensorType(ir.DataType.FLOAT),
                      const_value=ir.tensor(wi, name=name))
        wv.meta[WEIGHT_GRID_KEY] = {"scale": safe, "bits": mp.bits, "axis": mp.axis}
        g.register_initializer(wv)
        if i == 0:
            node.replace_input_with(1, wv)
            branch_outs.append(out)
            continue
        inputs = [node.inputs[0], wv] + ([] if len(node.inputs) < 3 else [None])
        inputs = [v for v in inputs if v is not None]
        copy = ir.Node("", node.op_type, inputs, attributes=list(node.attributes.values()), name=f"{node.name}_mp{i}",
                       num_outputs=1)
        copy.outputs[0].name = f"{out.name}_mp{i}"
        g.insert_after(prev, copy)
        prev = copy
        branch_outs.append(copy.outputs[0])
    if len(branch_outs) == 1:
        return
    # sum the branches: out_final = out + out_mp1 + ...
    final_name = out.name
    out.name = final_name + "_mp0"
    last = branch_outs[0]
    anchor = prev
    adds = []
    for i, b in enumerate(branch_outs[1:], start=1):
        add = ir.Node("", "Add", [last, b], name=f"{node.name}_mpsum{i}", num_outputs=1)
        add.meta[SUM_KEY] = True
        add.outputs[0].name = f"{final_name}_mpsum{i}"
        g.insert_after(anchor, add)
        anchor = add
        adds.append(add)
        last = add.outputs[0]
    final = adds[-1].outputs[0]
    uses = [u for u in out.uses() if u.node not in adds]
    for u in uses:
        u.node.replace_input_with(u.idx, final)
    if out.is_graph_output():
        idx = [i for i, o in enumerate(g.outputs) if o is out][0]
        g.outputs[idx] = final
    final.name = final_name
