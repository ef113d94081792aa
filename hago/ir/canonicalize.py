"""Canonicalization passes: make any real-world ONNX graph regular before quantization.

Each pass is a function ``Graph -> Graph`` (it may modify in place and returns
the graph). :func:`canonicalize` runs them in order:

1. :func:`upgrade_opset` to a modern opset (21: int4/uint4 Q/DQ exist);
2. :func:`fix_names` so every node and edge has a unique name;
3. :func:`fold_constants` (Constant/ConstantOfShape nodes, shape-computing
   chains on static shapes, any node whose inputs are all constant);
4. :func:`simplify_ops` (two-input Sum -> Add, Div by a constant -> Mul by its reciprocal) and :func:`fold_batchnorm` into the preceding Conv / Gemm / ConvTranspose;
5. :func:`remove_identities` (Identity, inference-mode Dropout);
6. :func:`infer_shapes`.

What a pass cannot handle (unknown op, control flow) is left as is: later
passes treat it as float, never crash on it.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as irp

from ..errors import ModelError
from .graph import Graph

# Constant folding never materializes tensors larger than this (elements).
FOLD_SIZE_LIMIT = 1 << 24


def upgrade_opset(g: Graph, opset: int = 21) -> Graph:
    """Convert the default-domain opset to ``opset`` when it is older."""
    if g.opset >= opset:
        return g
    proto = g.to_onnx()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = onnx.version_converter.convert_version(proto, opset)
    except Exception as e:  # the converter lacks adapters for some ops: keep the old opset
        g.history.append(f"upgrade_opset: kept opset {g.opset} ({type(e).__name__}: {str(e)[:120]})")
        return g
    new = Graph(ir.serde.deserialize_model(converted), g.source)
    new.fallbacks, new.history = g.fallbacks, g.history + [f"upgrade_opset: {g.opset} -> {opset}"]
    return new


def fix_names(g: Graph) -> Graph:
    """Unique names for all nodes and edges; initializers are no longer listed as graph inputs (IR < 4)."""
    if g.opset >= 21 and g.model.ir_version < 10:
        g.model.ir_version = 10  # opset 21 needs IR version 10
    irp.RemoveInitializersFromInputsPass()(g.model)
    irp.NameFixPass()(g.model)
    g.history.append("fix_names")
    return g


def infer_shapes(g: Graph) -> Graph:
    try:
        irp.ShapeInferencePass(strict_mode=False)(g.model)
        g.history.append("infer_shapes")
    except Exception as e:  # shape inference is best effort on exotic graphs
        g.history.append(f"infer_shapes: skipped ({type(e).__name__}: {str(e)[:120]})")
    return g


def _const_array(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = v.const_value
    if t is None:
        return None
    try:
        return t.numpy()
    except Exception:
        return None


def _static_shape(v: ir.Value) -> list[int] | None:
    if v.shape is None:
        return None
    dims = []
    for d in v.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return dims


def _evaluate_node(node: ir.Node, arrays: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    del proto.input[:]
    proto.input.extend(names)
    outs = [f"out{i}" for i in range(len(node.outputs))]
    del proto.output[:]
    proto.output.extend(outs)
    graph = onnx.helper.make_graph(
        [proto],
        "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in zip(names, arrays) if a is not None],
        [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in outs],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    sess = ReferenceEvaluator(model)
    feeds = {n: a for n, a in zip(names, arrays) if a is not None}
    return [np.asarray(r) for r in sess.run(None, feeds)]


_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan", "QuantizeLinear", "DequantizeLinear"}


def fold_constants(g: Graph) -> Graph:
    """Replace every node whose inputs are all known by initializers.

    Also folds ``Shape`` (and ``Size``) of edges whose shape is static, so
    shape-computing chains (Shape -> Gather -> Concat -> Reshape) collapse.
    """
    graph = g.graph
    folded = 0
    opset = g.opset or 21
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
            continue
        if any(o.is_graph_output() for o in node.outputs):
            continue
        results: list[np.ndarray] | None = None
        if node.op_type == "Constant":
            t = node.attributes.get("value")
            if t is not None and t.type == ir.AttributeType.TENSOR:
                results = [t.value.numpy()]
            else:
                try:
                    results = _evaluate_node(node, [], opset)
                except Exception:
                    results = None
        elif node.op_type in ("Shape", "Size") and node.inputs and node.inputs[0] is not None:
            shape = _static_shape(node.inputs[0])
            if shape is not None:
                if node.op_type == "Size":
                    results = [np.array(int(np.prod(shape)), dtype=np.int64)]
                else:
                    start = node.attributes.get_int("start", 0)
                    end = node.attributes.get_int("end", len(shape))
                    results = [np.array(shape[slice(start, end)], dtype=np.int64)]
        else:
            arrays = [_const_array(v) if v is not None else None for v in node.inputs]
            if not node.inputs or any(v is not None and a is None for v, a in zip(node.inputs, arrays)):
                continue
            try:
                results = _evaluate_node(node, arrays, opset)
            except Exception:
                continue
        if results is None or any(r.size > FOLD_SIZE_LIMIT for r in results):
            continue
        for out, arr in zip(node.outputs, results):
            new = ir.Value(name=out.name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                           const_value=ir.tensor(arr, name=out.name))
            out.name = out.name + "__folded"
            ir.convenience.replace_all_uses_with(out, new)
            graph.register_initializer(new)
        graph.remove(node, safe=True)
        folded += 1
    irp.RemoveUnusedNodesPass()(g.model)
    g.history.append(f"fold_constants: {folded} nodes")
    return g


def _single_consumer(v: ir.Value) -> ir.Node | None:
    uses = list(v.uses())
    if len(uses) != 1 or v.is_graph_output():
        return None
    return uses[0].node


def fold_batchnorm(g: Graph) -> Graph:
    """Fold ``BatchNormalization`` into a preceding Conv / ConvTranspose / Gemm with constant weights."""
    graph = g.graph
    folded = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or len(bn.inputs) < 5:
            continue
        if len([o for o in bn.outputs if o is not None and (o.uses() or o.is_graph_output())]) > 1:
            continue  # training-mode outputs in use
        x = bn.inputs[0]
        prod = x.producer() if x is not None else None
        if prod is None or prod.op_type not in ("Conv", "Gemm", "ConvTranspose") or _single_consumer(x) is not bn:
            continue
        params = [_const_array(v) for v in bn.inputs[1:5]]
        w = _const_array(prod.inputs[1])
        if w is None or any(p is None for p in params):
            continue
        if prod.op_type == "Gemm" and (prod.attributes.get_int("transA", 0) or prod.attributes.get_float("alpha", 1.0) != 1.0):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = bn.attributes.get_float("epsilon", 1e-5)
        factor = gamma / np.sqrt(var + eps)
        b = _const_array(prod.inputs[2]) if len(prod.inputs) > 2 and prod.inputs[2] is not None else None
        b = np.zeros_like(mean) if b is None else b.astype(np.float64)
        if prod.op_type == "Gemm" and prod.attributes.get_float("beta", 1.0) != 1.0:
            b = b * prod.attributes.get_float("beta", 1.0)
        w64 = w.astype(np.float64)
        if prod.op_type == "Conv":
            w64 = w64 * factor.reshape(-1, *([1] * (w.ndim - 1)))
        elif prod.op_type == "ConvTranspose":
            group = prod.attributes.get_int("group", 1)
            cin, cout_g = w.shape[0], w.shape[1]
            w64 = (w64.reshape(group, cin // group, cout_g, *w.shape[2:])
                   * factor.reshape(group, 1, cout_g, *([1] * (w.ndim - 2)))).reshape(w.shape)
        else:  # Gemm: y = x @ W^T (transB=1) or x @ W
            if prod.attributes.get_int("transB", 0):
                w64 = w64 * factor[:, None]
            else:
                w64 = w64 * factor[None, :]
        new_b = (b - mean) * factor + beta
        wname = prod.inputs[1].name
        new_w = ir.Value(name=wname + "_bnfold", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.from_numpy(w.dtype)),
                         const_value=ir.tensor(w64.astype(w.dtype), name=wname + "_bnfold"))
        new_bias = ir.Value(name=bn.name + "_bias", shape=ir.Shape(new_b.shape), type=ir.TensorType(ir.DataType.FLOAT),
                            const_value=ir.tensor(new_b.astype(np.float32), name=bn.name + "_bias"))
        graph.register_initializer(new_w)
        graph.register_initializer(new_bias)
        prod.replace_input_with(1, new_w)
        if len(prod.inputs) > 2:
            prod.replace_input_with(2, new_bias)
        else:
            prod.resize_inputs(3)
            prod.replace_input_with(2, new_bias)
        if prod.op_type == "Gemm" and "beta" in prod.attributes:
            prod.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        y = bn.outputs[0]
        prod_out = prod.outputs[0]
        if y.is_graph_output():
            # keep the graph output's name on the folded producer
            idx = [i for i, o in enumerate(graph.outputs) if o is y][0]
            name = y.name
            y.name = name + "__bn"
            prod_out.name = name
            graph.outputs[idx] = prod_out
        ir.convenience.replace_all_uses_with(y, prod_out)
        graph.remove(bn, safe=True)
        folded += 1
    irp.RemoveUnusedNodesPass()(g.model)
    _drop_unused_initializers(g)
    g.history.append(f"fold_batchnorm: {folded}")
    return g


def _drop_unused_initializers(g: Graph) -> None:
    graph = g.graph
    inputs = {id(v) for v in graph.inputs}
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output() and id(v) not in inputs:
            del graph.initializers[name]


def remove_identities(g: Graph) -> Graph:
    """Remove Identity nodes and inference-mode Dropout (whose mask output is unused)."""
    graph = g.graph
    removed = 0
    for node in list(graph):
        if node.op_type == "Dropout" and node.domain in ("", "ai.onnx"):
            if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
                continue
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                tm = _const_array(node.inputs[2])
                if tm is None or bool(tm):
                    continue  # training mode on: keep
            node.op_type = "Identity"
            node.resize_inputs(1)
            node.attributes.clear() if hasattr(node.attributes, "clear") else None
            if len(node.outputs) > 1:
                node.resize_outputs(1)
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None:
            continue
        if y.is_graph_output():
            if x.is_graph_input() or x.is_graph_output() or x.is_initializer():
                continue  # an output that is directly an input: keep the Identity
            idx = [i for i, o in enumerate(graph.outputs) if o is y][0]
            name = y.name
            y.name = name + "__id"
            x.name = name
            graph.outputs[idx] = x
        ir.convenience.replace_all_uses_with(y, x)
        graph.remove(node, safe=True)
        removed += 1
    g.history.append(f"remove_identities: {removed}")
    return g


def simplify_ops(g: Graph) -> Graph:
    """Rewrite ops into their common equivalents: a two-input Sum becomes Add; a float Div by a constant without
    zeros becomes a Mul by its reciprocal (``x * clip(x + 3, 0, 6) / 6``, the HardSwish of PP-OCR and MobileNetV3,
    then runs in integer like its Mul instead of breaking the integer region; the result differs from the quotient
    by at most an ulp or two)."""
    n = 0
    for node in list(g.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Sum" and len(node.inputs) == 2:
            node.op_type = "Add"
            n += 1
        elif node.op_type == "Sum" and len(node.inputs) == 1:
            node.op_type = "Identity"
        elif node.op_type == "Div" and len(node.inputs) == 2 and _div_to_mul(g, node):
            n += 1
    g.history.append(f"simplify_ops: {n}")
    return g


def _div_to_mul(g: Graph, node: ir.Node) -> bool:
    """``Div(x, c)`` -> ``Mul(x, 1 / c)`` for a floating constant ``c`` without zeros (in place)."""
    c = _const_array(node.inputs[1])
    if c is None or node.inputs[0] is None or _const_array(node.inputs[0]) is not None:
        return False
    if c.dtype.kind != "f" or c.size > 1 << 16 or not np.all(np.isfinite(c)) or np.any(c == 0):
        return False
    recip = (np.ones((), c.dtype) / c).astype(c.dtype)
    name = f"{node.inputs[1].name}__reciprocal"
    existing = g.graph.initializers.get(name)
    if existing is None:
        existing = ir.val(name, const_value=ir.tensor(recip, name=name))
        g.graph.register_initializer(existing)
    node.op_type = "Mul"
    node.replace_input_with(1, existing)
    return True


def canonicalize(g: Graph, opset: int = 21) -> Graph:
    """Run all canonicalization passes (see the module docstring)."""
    try:
        g = upgrade_opset(g, opset)
        g = fix_names(g)
        g = infer_shapes(g)
        g = fold_constants(g)
        g = simplify_ops(g)
        g = remove_identities(g)
        g = fold_batchnorm(g)
        g = infer_shapes(g)
        irp.TopologicalSortPass()(g.model)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{g.source}: canonicalization failed ({type(e).__name__}: {e})") from e
    return g
