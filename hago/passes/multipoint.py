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

The adaptive allocation is per layer (``allocation="layer"``, each layer averages
the budget) or network-wide (``allocation="global"``: one budget on the MACs of
all split layers, per-channel output errors normalized by the layer's output
energy, optionally weighted by the network's measured sensitivity to the layer).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..algorithms.multipoint import (
    MultiPoint,
    allocate_points_global,
    multipoint,
    multipoint_adaptive,
    multipoint_output_errors,
)
from ..calibrate import _materialize
from ..errors import HagoError
from ..ir.graph import Graph
from ..runtime import ort as rt

WEIGHT_GRID_KEY = "hago.weight_grid"  # value.meta: {"scale": [C], "bits": b, "axis": a} (fixed by multipoint)
SUM_KEY = "hago.multipoint_sum"  # node.meta: an Add summing multipoint branches (stays float)


def _conv_geometry(x_shape, node: ir.Node, w_shape):
    """(pads [t, l, b, r], strides, dilations, out_h, out_w) of a 2-D convolution on an input of ``x_shape``."""
    h, wd = x_shape[2], x_shape[3]
    kh, kw = w_shape[2], w_shape[3]
    sh, sw = (list(node.attributes.get_ints("strides", [1, 1])) + [1, 1])[:2]
    dh, dw = (list(node.attributes.get_ints("dilations", [1, 1])) + [1, 1])[:2]
    pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        ph = max(0, ((h + sh - 1) // sh - 1) * sh + (kh - 1) * dh + 1 - h)
        pw = max(0, ((wd + sw - 1) // sw - 1) * sw + (kw - 1) * dw + 1 - wd)
        pads = [ph // 2, pw // 2, ph - ph // 2, pw - pw // 2]
    oh = (h + pads[0] + pads[2] - (kh - 1) * dh - 1) // sh + 1
    ow = (wd + pads[1] + pads[3] - (kw - 1) * dw - 1) // sw + 1
    return pads, (sh, sw), (dh, dw), oh, ow


def _im2col(x: np.ndarray, node: ir.Node, w_shape, max_rows: int, rs) -> np.ndarray:
    """Sampled patches [rows, Cin*kh*kw] of a 2-D convolution input, in the weight's flattening order."""
    n, c = x.shape[:2]
    kh, kw = w_shape[2], w_shape[3]
    pads, (sh, sw), (dh, dw), oh, ow = _conv_geometry(x.shape, node, w_shape)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
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


def _layer_setup(node: ir.Node, w: np.ndarray, x: np.ndarray, samples: int, rs):
    """(w2 [C, K] rows, patches [rows, K], positions per sample) for one layer's adaptive allocation."""
    op = node.op_type
    axis = 0 if (op == "Conv" or (op == "Gemm" and node.attributes.get_int("transB", 0))) else 1
    if op == "Conv":
        patches = _im2col(x, node, w.shape, samples, rs)
        _p, _s, _d, oh, ow = _conv_geometry(x.shape, node, w.shape)
        return w.reshape(w.shape[0], -1), patches, int(oh * ow)
    patches = x.reshape(-1, x.shape[-1])
    if len(patches) > samples:
        patches = patches[rs.choice(len(patches), samples, replace=False)]
    return (w if axis == 0 else w.T), patches, int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1


def _to_layout(mp2: MultiPoint, w_shape, axis: int, bits: int) -> MultiPoint:
    """A MultiPoint built on [C, K] rows back in the weight's own layout (channel axis ``axis``)."""
    if axis == 0:
        return MultiPoint(alphas=mp2.alphas, codes=mp2.codes.reshape((mp2.n,) + tuple(w_shape)), bits=bits, axis=0,
                          n_points=mp2.n_points)
    return MultiPoint(alphas=mp2.alphas, codes=np.swapaxes(mp2.codes, 1, 2), bits=bits, axis=1,
                      n_points=mp2.n_points)


def _network_rel_errors(graph: Graph, batches, layers: list) -> list[float]:
    """Relative MSE of the network outputs (vs the float model, on ``batches``) with one layer's weight replaced.

    ``layers``: ``[(weight value, float weight array)]``; each is swapped in alone, then restored.
    """
    out_names = [o.name for o in graph.graph.outputs]

    def outputs():
        sess = rt.session(graph.to_onnx(), optimize="basic", source=graph.source)
        return [np.concatenate(ys, axis=0) for ys in
                zip(*[rt.run(sess, b, out_names, i) for i, b in enumerate(batches)])]

    ref = outputs()
    energy = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in ref)
    res = []
    for wv, wq in layers:
        orig = wv.const_value
        wv.const_value = ir.tensor(np.ascontiguousarray(wq, dtype=np.float32), name=wv.name)
        try:
            ys = outputs()
        finally:
            wv.const_value = orig
        err = sum(float(np.sum(np.square(y.astype(np.float64) - r))) for y, r in zip(ys, ref))
        res.append(err / energy if energy > 0 else 0.0)
    return res


def multipoint_split(graph: Graph, calib, *, bits: int = 4, points: int | None = None, budget_avg: float = 1.5,
                     max_points: int = 3, nodes=None, samples: int = 2048, seed: int = 0, allocation: str = "layer",
                     weighting: str = "energy", sensitivity_batches: int = 2,
                     stats: dict | None = None) -> dict[str, MultiPoint]:
    """Rewrite the chosen layers as sums of low-bit layers (in place). Returns ``{node name: MultiPoint}``.

    ``points`` fixes the number of points of every channel; otherwise points are
    allocated from the channels' output errors on the calibration inputs:

    * ``allocation="layer"``: per layer, each layer's channels average ``budget_avg``
      points (greedy on the raw per-channel output MSE);
    * ``allocation="global"``: one greedy allocation over the channels of all chosen
      layers, the cost of a point being that channel's MACs per sample, so the
      MAC-weighted average number of points of the network is ``budget_avg`` (the
      same total MACs as ``points=budget_avg``). The per-channel output errors are
      made comparable across layers by ``weighting``: ``"energy"`` divides a layer's
      errors by its output energy (sum over channels of the mean squared output);
      ``"sensitivity"`` further multiplies them by the layer's measured sensitivity
      ``s_L`` = (relative MSE of the network outputs when only that layer is
      quantized with one point per channel) / (the layer's own relative output error
      then), so the summed weighted error predicts the network's relative output
      MSE (first order, layers independent). ``sensitivity_batches`` calibration
      batches are used for it (one float-model run per layer).

    ``stats`` (optional dict) receives ``"macs"`` ``{node: per-channel MACs per sample}``,
    ``"sensitivity"`` ``{node: s_L}`` (global/sensitivity) and ``"avg_points_mac"``.
    """
    if allocation not in ("layer", "global"):
        raise HagoError(f"multipoint: allocation must be 'layer' or 'global', got {allocation!r}")
    if weighting not in ("energy", "sensitivity"):
        raise HagoError(f"multipoint: weighting must be 'energy' or 'sensitivity', got {weighting!r}")
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
    result: dict[str, MultiPoint] = {}
    macs: dict[str, np.ndarray] = {}
    if points is not None:
        for node in chosen:
            w = Graph.const(node.inputs[1]).astype(np.float32)
            op = node.op_type
            axis = 0 if (op == "Conv" or (op == "Gemm" and node.attributes.get_int("transB", 0))) else 1
            result[node.name] = multipoint(w, bits=bits, n_points=points, axis=axis)
    else:
        layers = []  # (node, w, axis, mp2 rows, errors [C, max_points], energy, macs [C])
        for node in chosen:
            w = Graph.const(node.inputs[1]).astype(np.float32)
            op = node.op_type
            axis = 0 if (op == "Conv" or (op == "Gemm" and node.attributes.get_int("transB", 0))) else 1
            x = np.concatenate(xs[node.inputs[0].name], axis=0)
            w2, patches, positions = _layer_setup(node, w, x, samples, rs)
            mac = np.full(w2.shape[0], float(w2.shape[1] * positions))
            macs[node.name] = mac
            if allocation == "layer":
                mp2 = multipoint_adaptive(w2, patches, bits=bits, budget_avg=budget_avg, max_points=max_points, axis=0)
                result[node.name] = _to_layout(mp2, w.shape, axis, bits)
                continue
            mp2 = multipoint(w2, bits=bits, n_points=max_points, axis=0)
            errs = multipoint_output_errors(mp2, w2, patches)
            y = np.asarray(patches, np.float64) @ w2.astype(np.float64).T
            energy = float(np.sum(np.mean(y * y, axis=0)))
            layers.append((node, w, axis, mp2, errs, energy, mac))
        if layers:
            weights = []
            for node, w, axis, mp2, errs, energy, mac in layers:
                weights.append(1.0 / energy if energy > 0 else 0.0)
            if weighting == "sensitivity":
                swaps = [(node.inputs[1], _to_layout(mp2, w.shape, axis, bits).dequantize(1))
                         for node, w, axis, mp2, errs, energy, mac in layers]
                net = _network_rel_errors(graph, batches[:max(1, int(sensitivity_batches))], swaps)
                sens = {}
                for k, (node, w, axis, mp2, errs, energy, mac) in enumerate(layers):
                    rel1 = float(np.sum(errs[:, 0])) * weights[k]
                    s_l = net[k] / rel1 if rel1 > 0 else 0.0
                    sens[node.name] = s_l
                    weights[k] *= s_l
                if stats is not None:
                    stats["sensitivity"] = sens
            alloc = allocate_points_global([lay[4] for lay in layers], budget_avg, [lay[6] for lay in layers],
                                           weights)
            for (node, w, axis, mp2, *_rest), npc in zip(layers, alloc):
                result[node.name] = _to_layout(mp2.truncate(npc), w.shape, axis, bits)
    for node in chosen:
        _rewrite(g, node, result[node.name])
    if stats is not None:
        stats["macs"] = macs
        if macs:
            tot = sum(float(m.sum()) for m in macs.values())
            stats["avg_points_mac"] = sum(float(np.sum(macs[k] * result[k].n_points)) for k in macs) / tot
        elif points is not None:
            stats["avg_points_mac"] = float(points)
    how = (f"{points} per channel" if points else
           f"adaptive ({allocation}" + (f", {weighting}" if allocation == "global" else "") + f", average {budget_avg})")
    graph.history.append(f"multipoint_split: {len(result)} layers, {bits}-bit points, {how}")
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
