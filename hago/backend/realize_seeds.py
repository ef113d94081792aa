"""Lowerings of :mod:`hago.backend.realize` for hago's number representations that are not plain Q/DQ pairs.

* **SPARQ** (``hago.ir.qdq._sparq_nodes``): the uint8 codes of a QuantizeLinear go through
  ``Cast -> Gather(lut)`` (bSPARQ: a 256-entry uint8 -> uint8 table) and, for vSPARQ, a pair-neighbour test
  ``Where(Equal(neighbour, 0), Gather(wide), Gather(lut))`` where the neighbour tensor is the codes with the two
  channels of every pair swapped (an odd tail pairs with an implicit zero), before the DequantizeLinear.
  Realized on the uint8 codes: ``take(lut, q)``, ``take(wide, q)``, the neighbour as one ``take`` of the codes
  along the pair axis with a constant index vector (``k ^ 1``; the odd tail reads an appended zero),
  ``equal`` and ``where``: integer/bool ops only, bit-exact by construction (the tables are the model's own), and
  the trimmed codes stay a quantized tensor that feeds the integer conv/matmul.
* **Row-wise low-bit embedding tables** (``hago.passes.embedding.decode_rows``): ``Gather(packed uint8 [R, D/2],
  ids)`` with the per-row ``Gather(scale fp16 [R], ids)``/``Gather(bias fp16 [R], ids)``, nibble unpacking
  (BitwiseAnd/BitShift/Unsqueeze/Concat/Reshape/Slice) and ``Cast(codes) * scale + bias``. Realized as
  ``take`` on the packed uint8 table (and on the fp16 scale/bias rows), ``right_shift``/``bitwise_and``, ``stack``,
  ``reshape``, ``astype`` and ``multiply``/``add`` in float32: the same float32 operations as the ONNX graph, so the
  rows match onnxruntime exactly (for fp16 scales the product ``code * scale`` is exact in float32, so a fused
  multiply-add cannot change it either).

Both matchers are structural and then *verified numerically*: the ONNX subgraph they replace is evaluated with
onnx's reference evaluator on a probe input of the real shape and compared with what the lowering computes; a
mismatch (an unexpected variant of the pattern) leaves the nodes to the generic lowering.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .realize import _Const, _FloatV, _IntV, _QV, _attrs, _dtype, _nodes_of, _shape

_DEFAULT = ("", "ai.onnx")
# ops that only move or reshape data: the pair-neighbour chain of vSPARQ is made of these
_MOVE_OPS = frozenset({"Slice", "Unsqueeze", "Squeeze", "Concat", "Shape", "Reshape", "Pad", "Transpose", "Identity",
                       "Flatten"})
# ops of the dequantizing gather of a packed embedding table
_DECODE_OPS = frozenset({"BitwiseAnd", "BitShift", "Unsqueeze", "Squeeze", "Concat", "Shape", "Slice", "Reshape",
                         "Cast", "Identity", "Mul", "Add"})


# --------------------------------------------------------------------------------------------------------------
# helpers


def _producers(lw) -> dict:
    prod = getattr(lw, "_seed_producers", None)
    if prod is None:
        prod = {o: n for n in lw.model.graph.node for o in n.output if o}
        lw._seed_producers = prod
    return prod


def _positions(lw) -> dict:
    pos = getattr(lw, "_seed_positions", None)
    if pos is None:
        pos = {id(n): i for i, n in enumerate(lw.model.graph.node)}
        lw._seed_positions = pos
    return pos


def _node_name(n) -> str:
    return n.name or f"{n.op_type}({','.join(n.output)})"


def _const_of(lw, name):
    v = lw.values.get(name)
    return np.asarray(v.array) if isinstance(v, _Const) else None


def _evaluate(lw, nodes, inputs: dict, outputs: list):
    """Run `nodes` (ONNX NodeProtos) with onnx's reference evaluator: `inputs` {name: array}, constants from the
    lowering's values. Returns the list of `outputs`, or None when the evaluator fails."""
    from onnx.reference import ReferenceEvaluator

    produced = {o for n in nodes for o in n.output}
    inits, seen = [], set(inputs)
    for n in nodes:
        for i in n.input:
            if not i or i in seen or i in produced:
                continue
            seen.add(i)
            c = _const_of(lw, i)
            if c is None:
                return None
            inits.append(numpy_helper.from_array(c, i))
    vis = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
           for k, v in inputs.items()]
    g = helper.make_graph(list(nodes), "probe", vis, [helper.make_empty_tensor_value_info(o) for o in outputs],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", lw.opset)])
    try:
        return [np.asarray(r) for r in ReferenceEvaluator(m).run(None, dict(inputs))]
    except Exception:  # noqa: BLE001 - any failure means: not the pattern we know
        return None


def _only_used_inside(lw, nodes, allowed_out: set) -> bool:
    """Every output of `nodes` outside `allowed_out` is consumed only by `nodes` and is no graph output."""
    ids = {id(n) for n in nodes}
    for n in nodes:
        for o in n.output:
            if not o or o in allowed_out:
                continue
            if o in lw._graph_outputs:
                return False
            if any(id(u) not in ids for u in lw._consumers.get(o, [])):
                return False
    return True


def _not_lowered(lw, nodes) -> bool:
    return all(o not in lw.values for n in nodes for o in n.output if o)


# --------------------------------------------------------------------------------------------------------------
# SPARQ


def _pair_swap(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` with the two elements of every pair along `axis` swapped; an odd tail reads 0."""
    c = a.shape[axis]
    pad_shape = list(a.shape)
    pad_shape[axis] = 1
    padded = np.concatenate([a, np.zeros(pad_shape, a.dtype)], axis=axis)
    return np.take(padded, _swap_index(c), axis=axis)


def _swap_index(c: int) -> np.ndarray:
    k = np.arange(c) ^ 1
    return np.where(k < c, k, c).astype(np.int32)


def match_sparq(lw, cast):
    """The SPARQ trim that starts at `cast` (``Cast`` of uint8 codes), as a dict, or None."""
    if cast.domain not in _DEFAULT or len(cast.input) != 1:
        return None
    src = cast.input[0]
    x = lw.values.get(src)
    if isinstance(x, _QV) and x.int_tensor:
        dt = x.dtype
    elif isinstance(x, _IntV):
        dt = _dtype(x.expr)
    else:
        return None
    if dt != "uint8" or _attrs(cast).get("to") not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
        return None
    idx = cast.output[0]
    luts = {}
    for g in lw._consumers.get(idx, []):
        if g.op_type != "Gather" or g.domain not in _DEFAULT or len(g.input) != 2 or g.input[1] != idx:
            return None
        if int(_attrs(g).get("axis", 0)) != 0:
            return None
        arr = _const_of(lw, g.input[0])
        if arr is None or arr.ndim != 1 or arr.dtype != np.uint8 or arr.size < 256:
            return None
        luts[g.output[0]] = (g, arr)
    if not luts or len(luts) > 2 or not _not_lowered(lw, [g for g, _ in luts.values()]):
        return None
    xshape = _shape(x.expr)
    m = {"cast": cast, "src": src, "x": x, "luts": luts, "shape": xshape}
    if len(luts) == 1:
        m["mode"] = "bsparq"
        m["chain"] = []
        return m
    # vSPARQ: Where(Equal(neighbour, 0), Gather(wide), Gather(lut))
    outs = list(luts)
    wheres = {id(u): u for o in outs for u in lw._consumers.get(o, []) if u.op_type == "Where"}
    wheres = [w for w in wheres.values() if len(w.input) == 3 and set(w.input[1:]) == set(outs)
              and w.input[1] != w.input[2]]
    if len(wheres) != 1:
        return None
    where = wheres[0]
    prod = _producers(lw)
    eq = prod.get(where.input[0])
    if eq is None or eq.op_type != "Equal" or eq.domain not in _DEFAULT or len(eq.input) != 2:
        return None
    zero = None
    for j in (0, 1):
        c = _const_of(lw, eq.input[j])
        if c is not None and c.size == 1:
            zero, nb = c, eq.input[1 - j]
    if zero is None or int(np.ravel(zero)[0]) != 0:
        return None
    # the neighbour: data movement of the codes only
    chain, stack, seen = [], [nb], set()
    while stack:
        t = stack.pop()
        if t in seen or not t or t == src or isinstance(lw.values.get(t), _Const):
            continue
        seen.add(t)
        n = prod.get(t)
        if n is None or n.op_type not in _MOVE_OPS or n.domain not in _DEFAULT:
            return None
        if id(n) not in {id(c) for c in chain}:
            chain.append(n)
        stack.extend(n.input)
    if not chain or not _not_lowered(lw, chain + [eq, where]):
        return None
    pos = _positions(lw)
    chain.sort(key=lambda n: pos[id(n)])
    if not _only_used_inside(lw, chain, {nb}):
        return None
    n_el = int(np.prod(xshape))
    probe = (np.arange(n_el, dtype=np.int64) + 1).reshape(xshape)
    res = _evaluate(lw, chain, {src: probe}, [nb])
    if res is None or res[0].shape != tuple(xshape):
        return None
    axis = next((a for a in range(len(xshape)) if np.array_equal(res[0], _pair_swap(probe, a))), None)
    if axis is None:
        return None
    m.update(mode="vsparq", chain=chain, where=where, equal=eq, nb=nb, axis=axis,
             wide=where.input[1], trimmed=where.input[2])
    return m


def lower_sparq(lw, m):
    R = lw.R
    cast, x, xshape = m["cast"], m["x"], m["shape"]
    xe = x.expr
    chain_nodes = [g for g, _ in m["luts"].values()] + m["chain"]
    if m["mode"] == "vsparq":
        chain_nodes += [m["equal"], m["where"]]
    nodes = _nodes_of(x) | {_node_name(n) for n in chain_nodes + [cast]}
    quantized = isinstance(x, _QV)

    def qv(expr, table):
        if not quantized:
            return _IntV(expr)
        vals = table[x.qmin: x.qmax + 1]
        return _QV(expr, x.scale, x.zp, "uint8", int(vals.min()), int(vals.max()), nodes, int_tensor=True)

    to = "int32" if _attrs(cast).get("to") == onnx.TensorProto.INT32 else "int64"
    lw.values[cast.output[0]] = _IntV(lw.cast(xe, to))
    xi = lw.cast(xe, "int32")
    tables = {}
    for out, (_g, arr) in m["luts"].items():
        lut = arr[:256]
        tables[out] = lut
        e = lw.emit(R.take(lw.const(lut, "uint8"), xi, axis=0, mode="clip"))
        lw.values[out] = qv(e, lut)
    if m["mode"] == "bsparq":
        detail = "bSPARQ: uint8 -> uint8 lookup table (take) on the codes"
    else:
        axis = m["axis"]
        c = xshape[axis]
        src = xe
        if c % 2:
            pad_shape = list(xshape)
            pad_shape[axis] = 1
            src = lw.emit(R.concat([xe, lw.const(np.zeros(pad_shape, np.uint8), "uint8")], axis=axis))
        nb = lw.emit(R.take(src, lw.const(_swap_index(c), "int32"), axis=axis, mode="clip"))
        lw.values[m["nb"]] = _IntV(nb)
        cond = lw.emit(R.equal(nb, lw.const(np.uint8(0), "uint8")))
        lw.values[m["equal"].output[0]] = _IntV(cond)
        w, t = lw.values[m["wide"]], lw.values[m["trimmed"]]
        v = lw.emit(R.where(cond, w.expr, t.expr))
        both = np.concatenate([tables[m["wide"]][x.qmin: x.qmax + 1], tables[m["trimmed"]][x.qmin: x.qmax + 1]]) \
            if quantized else np.zeros(1, np.uint8)
        out = m["where"].output[0]
        if quantized:
            lw.values[out] = _QV(v, x.scale, x.zp, "uint8", int(both.min()), int(both.max()), nodes, int_tensor=True)
        else:
            lw.values[out] = _IntV(v)
        detail = (f"vSPARQ on the uint8 codes: pair neighbour along axis {axis} (take"
                  f"{', odd tail paired with 0' if c % 2 else ''}), where(neighbour == 0, wide lookup, bSPARQ lookup)")
    lw.record(cast, "integer", detail, nodes)
    for n in chain_nodes:
        lw._skip.add(id(n))
        lw.record(n, "integer", f"part of the SPARQ trim at {_node_name(cast)!r}", nodes)


# --------------------------------------------------------------------------------------------------------------
# row-wise low-bit embedding tables


def _unpack(packed_rows: np.ndarray, bits: int, dim: int) -> np.ndarray:
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed_rows >> np.uint8(k * bits)) & mask for k in range(per)]
    out = np.stack(parts, axis=-1).reshape(packed_rows.shape[:-1] + (packed_rows.shape[-1] * per,))
    return out[..., :dim]


def match_embedding(lw, gather):
    """The dequantizing gather of a packed table that `gather` belongs to, as a dict, or None."""
    if gather.domain not in _DEFAULT or len(gather.input) != 2 or int(_attrs(gather).get("axis", 0)) != 0:
        return None
    ids_name = gather.input[1]
    ids = lw.values.get(ids_name)
    if not isinstance(ids, _IntV) or _dtype(ids.expr) not in ("int32", "int64"):
        return None
    group = [g for g in lw._consumers.get(ids_name, []) if g.op_type == "Gather" and g.domain in _DEFAULT
             and len(g.input) == 2 and g.input[1] == ids_name and int(_attrs(g).get("axis", 0)) == 0
             and _const_of(lw, g.input[0]) is not None and g.output[0] not in lw.values]
    if not any(g is gather for g in group):
        return None
    pos = _positions(lw)
    for packed_g in group:
        table = _const_of(lw, packed_g.input[0])
        if table.ndim != 2 or table.dtype != np.uint8:
            continue
        m = _match_table(lw, packed_g, table, group, ids, pos)
        if m is not None and any(g is gather for g in m["gathers"]):
            return m
    return None


def _match_table(lw, packed_g, table, group, ids, pos):
    n_rows = table.shape[0]
    sibs = [g for g in group if g is not packed_g and _const_of(lw, g.input[0]).ndim == 1
            and _const_of(lw, g.input[0]).dtype.kind == "f" and _const_of(lw, g.input[0]).size == n_rows]
    if len(sibs) < 2:
        return None
    members = [packed_g] + sibs
    avail = {g.output[0] for g in members}
    start = min(pos[id(g)] for g in members)
    cand, final = [], None
    mul_outs = set()
    for n in lw.model.graph.node[start:]:
        if any(n is g for g in members) or n.op_type not in _DECODE_OPS or n.domain not in _DEFAULT:
            continue
        ins = [i for i in n.input if i]
        if not ins or not all(i in avail or _const_of(lw, i) is not None for i in ins):
            continue
        if not any(i in avail for i in ins) or any(o in lw.values for o in n.output if o):
            continue
        if n.op_type == "Add" and any(i in mul_outs for i in ins):
            cand.append(n)
            final = n
            break
        cand.append(n)
        avail.update(o for o in n.output if o)
        if n.op_type == "Mul":
            mul_outs.add(n.output[0])
    if final is None:
        return None
    # keep the backward cone of the final Add
    prod = {o: n for n in members + cand for o in n.output if o}
    cone, stack = {}, [final.output[0]]
    while stack:
        t = stack.pop()
        n = prod.get(t)
        if n is None or id(n) in cone:
            continue
        cone[id(n)] = n
        stack.extend(i for i in n.input if i)
    if id(packed_g) not in cone:
        return None
    used = [n for n in members + cand if id(n) in cone]
    used_sibs = [g for g in sibs if id(g) in cone]
    if len(used_sibs) != 2:
        return None
    body = sorted(used, key=lambda n: pos[id(n)])
    out = final.output[0]
    if not _only_used_inside(lw, body, {out}):
        return None
    # numeric check on a probe of the real ids shape: which sibling is the scale, which the bias, and the code width
    ishape = _shape(ids.expr)
    n_el = int(np.prod(ishape))
    probe = ((np.arange(n_el, dtype=np.int64) * 7919) % n_rows).reshape(ishape).astype(_dtype(ids.expr))
    res = _evaluate(lw, body, {packed_g.input[1]: probe}, [out])
    if res is None:
        return None
    y = res[0]
    if y.dtype != np.float32 or y.shape[:-1] != tuple(ishape):
        return None
    dim = y.shape[-1]
    nb = table.shape[1]
    rows = table[probe]
    for bits in (4, 2, 1, 8):
        per = 8 // bits
        if not nb * per - per < dim <= nb * per:
            continue
        codes = _unpack(rows, bits, dim).astype(np.float32)
        for s_g, b_g in ((used_sibs[0], used_sibs[1]), (used_sibs[1], used_sibs[0])):
            s = _const_of(lw, s_g.input[0])[probe].astype(np.float32)[..., None]
            b = _const_of(lw, b_g.input[0])[probe].astype(np.float32)[..., None]
            ref = (codes * s).astype(np.float32) + b
            if np.array_equal(ref.view(np.uint32), y.view(np.uint32)):
                return {"packed": packed_g, "scale": s_g, "bias": b_g, "bits": bits, "dim": dim, "ids": ids,
                        "body": body, "out": out, "gathers": [packed_g, s_g, b_g], "table": table}
    return None


def lower_embedding(lw, m):
    R = lw.R
    ids = m["ids"].expr
    table, bits, dim = m["table"], m["bits"], m["dim"]
    per = 8 // bits
    ishape = list(_shape(ids))
    rows = lw.emit(R.take(lw.const(table, "uint8"), ids, axis=0, mode="wrap"))
    mask = lw.const(np.uint8((1 << bits) - 1), "uint8")
    parts = []
    for k in range(per):
        p = rows if k == 0 else lw.emit(R.right_shift(rows, lw.const(np.uint8(k * bits), "uint8")))
        if k < per - 1:
            p = lw.emit(R.bitwise_and(p, mask))
        parts.append(p)
    codes = parts[0] if per == 1 else lw.emit(R.stack(parts, axis=len(ishape) + 1))
    width = table.shape[1] * per
    codes = lw.emit(R.reshape(codes, ishape + [width]))
    if width != dim:
        codes = lw.emit(R.strided_slice(codes, axes=[len(ishape)], begin=[0], end=[dim]))
    codes_f = lw.cast(codes, "float32")

    def per_row(g):
        arr = _const_of(lw, g.input[0])
        dt = str(arr.dtype)
        v = lw.emit(R.take(lw.const(arr, dt), ids, axis=0, mode="wrap"))
        v = lw.cast(v, "float32")
        return lw.emit(R.expand_dims(v, axis=len(ishape)))

    s, b = per_row(m["scale"]), per_row(m["bias"])
    y = lw.emit(R.add(lw.emit(R.multiply(codes_f, s)), b))
    lw.values[m["out"]] = _FloatV(y)
    p = m["packed"]
    sdt = str(_const_of(lw, m["scale"].input[0]).dtype)
    lw.record(p, "border", f"{bits}-bit row-wise embedding table: take on the packed uint8 table "
              f"[{table.shape[0]}, {table.shape[1]}], unpack ({per} codes per byte), dequantize with per-row "
              f"{sdt} scale/bias in float32", ())
    for n in m["body"]:
        lw._skip.add(id(n))
        if n is p:
            continue
        lw.record(n, "folded", f"part of the dequantizing gather at {_node_name(p)!r}")
