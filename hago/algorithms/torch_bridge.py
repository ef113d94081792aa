"""ONNX -> torch: run an ONNX CNN as a differentiable ``torch.nn.Module``.

Gradient-based post-training methods (AdaRound, BRECQ) need gradients through
parts of the network. :func:`to_torch` turns an ONNX model (the op set of
hago's canonicalized CNNs, see ``SUPPORTED_OPS``) into an :class:`OnnxModule`
that walks the ONNX graph in topological order with torch ops:

* every floating-point initializer read by Conv / Gemm / MatMul /
  BatchNormalization becomes an ``nn.Parameter``, addressable by its ONNX
  initializer name: ``module.params["conv1.weight"]``;
* any ONNX value (activation edge or initializer) can get a fake-quantizer,
  ``module.set_quantizer(value_name, fn)``: ``fn(tensor) -> tensor`` is
  applied where the value is produced (an initializer: each time it is read),
  so every consumer sees the quantized value; an ``nn.Module`` quantizer is
  registered as a submodule (its parameters are the module's parameters);
* any intermediate value can be read by name, ``module.run(feeds, outputs=[...])``,
  or observed with ``module.add_hook(value_name, callback)``;
* a part of the graph (a *block*: the nodes between some input values and some
  output values) runs alone: ``module.run_subgraph({value: tensor}, [output names])``
  executes only the nodes needed to compute the outputs from the given values.

torch is an optional dependency (``pip install hago[train]``, torch==2.13.0):
this module imports it only when :func:`to_torch` is called.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import HagoError, ModelError

__all__ = ["to_torch", "require_torch", "SUPPORTED_OPS", "WEIGHT_OPS", "weight_inputs"]

TORCH_VERSION = "2.13.0"

SUPPORTED_OPS = (
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "Tanh",
    "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten",
    "Reshape", "Transpose", "Concat", "Softmax", "Identity", "Dropout", "BatchNormalization",
    "Squeeze", "Unsqueeze", "Constant",
    # shape arithmetic and the transformer parts of PP-OCRv4 recognition (SVTR neck: LayerNorm as
    # ReduceMean / Pow / Sqrt, HardSwish as HardSigmoid * x)
    "Shape", "Cast", "Slice", "ReduceMean", "Pow", "Sqrt", "HardSigmoid", "HardSwish", "Gather",
)

# Ops whose constant operands are trainable parameters (the others' constants are buffers).
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
_PARAM_SLOTS = {"Conv": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "BatchNormalization": (1, 2, 3, 4)}


def require_torch():
    """Import torch, or raise a :class:`HagoError` that says how to install it."""
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise HagoError(
            "this hago feature (torch bridge, AdaRound, BRECQ) needs PyTorch, an optional extra: "
            f"pip install hago[train]  (torch=={TORCH_VERSION})") from e
    return torch


def weight_inputs(node: onnx.NodeProto, initializers: Iterable[str]) -> list[tuple[int, str]]:
    """``(input slot, initializer name)`` of a weighted node's weight operand(s).

    Conv: input 1; Gemm: input 1 (B); MatMul: whichever operand is an initializer
    (input 1 preferred). Biases are not weights here.
    """
    inits = set(initializers)
    ins = list(node.input)
    if node.op_type in ("Conv", "Gemm"):
        if len(ins) > 1 and ins[1] in inits:
            return [(1, ins[1])]
        return []
    if node.op_type == "MatMul":
        if len(ins) > 1 and ins[1] in inits:
            return [(1, ins[1])]
        if ins and ins[0] in inits:
            return [(0, ins[0])]
    return []


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


def _topo_sort(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    """Nodes in a topological order (ONNX files should already be sorted; some are not)."""
    avail = set(known) | {""}
    pending = list(graph.node)
    order: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                order.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            n = rest[0]
            missing = [i for i in n.input if i not in avail]
            raise ModelError(f"node {n.name or n.op_type!r} ({n.op_type}) reads {missing}, which no node, "
                             "graph input or initializer produces (or the graph has a cycle)")
        pending = rest
    return order


_MODULE_CLASS = None

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _float_values(model: onnx.ModelProto) -> dict[str, bool]:
    """value name -> whether it is floating point, from onnx's type inference (values it cannot type are left
    out and count as float). Activation quantizers must skip the integer values (shape arithmetic of
    reshapes in transformer blocks)."""
    g = onnx.shape_inference.infer_shapes(model).graph
    out = {t.name: t.data_type in _FLOAT_TYPES for t in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        et = vi.type.tensor_type.elem_type
        if et != TensorProto.UNDEFINED:
            out[vi.name] = et in _FLOAT_TYPES
    return out


def to_torch(model: onnx.ModelProto, *, trainable: bool = False):
    """Build an :class:`OnnxModule` from an ONNX model.

    ``trainable``: whether the weight parameters have ``requires_grad`` (default
    False: quantizers carry the trainable variables, the fp32 weights stay fixed).
    """
    require_torch()
    global _MODULE_CLASS
    if _MODULE_CLASS is None:
        _MODULE_CLASS = _define_module()
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"to_torch expects an onnx.ModelProto, got {type(model).__name__}")
    return _MODULE_CLASS(model, trainable=trainable)


def _define_module():
    import torch
    import torch.nn.functional as F
    from torch import nn

    def _pads_split(pads, k):
        pads = list(pads) if pads else [0] * (2 * k)
        return pads[:k], pads[k:]

    def _same_pads(x, kernel, strides, dilations, lower):
        begins, ends = [], []
        for i, kk in enumerate(kernel):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kk - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            begins.append(big if lower else small)
            ends.append(small if lower else big)
        return begins, ends

    def _resolve_pads(node, a, x, kernel, strides, dilations):
        k = len(kernel)
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            return _same_pads(x, kernel, strides, dilations, auto == "SAME_LOWER")
        if auto == "VALID":
            return [0] * k, [0] * k
        if auto != "NOTSET":
            raise ModelError(f"node {node.name!r} ({node.op_type}): unknown auto_pad {auto!r}")
        return _pads_split(a.get("pads"), k)

    def _torch_pad_arg(begins, ends):
        out = []
        for b, e in zip(reversed(begins), reversed(ends)):
            out += [int(b), int(e)]
        return out

    def _scalar(t):
        if t is None:
            return None
        return float(t.reshape(-1)[0].item()) if t.numel() == 1 else t

    class OnnxModule(nn.Module):
        """An ONNX graph executed with torch ops; see the module docstring."""

        def __init__(self, model: onnx.ModelProto, trainable: bool = False):
            super().__init__()
            g = model.graph
            self.model_proto = model
            self.opset = 21
            for imp in model.opset_import:
                if imp.domain in ("", "ai.onnx"):
                    self.opset = int(imp.version)
            init_arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
            self.input_names = [i.name for i in g.input if i.name not in init_arrays]
            self.output_names = [o.name for o in g.output]
            self.nodes = _topo_sort(g, set(init_arrays) | set(self.input_names))
            self._attrs = [_attrs(n) for n in self.nodes]
            for n in self.nodes:
                if n.domain not in ("", "ai.onnx"):
                    raise ModelError(f"node {n.name!r}: op {n.domain}::{n.op_type} is not supported by the torch bridge")
                if n.op_type not in SUPPORTED_OPS:
                    raise ModelError(f"node {n.name!r}: op {n.op_type} is not supported by the torch bridge "
                                     f"(supported: {', '.join(SUPPORTED_OPS)})")
            # Constant nodes become constants.
            for n, a in zip(self.nodes, self._attrs):
                if n.op_type == "Constant":
                    if "value" in a:
                        init_arrays[n.output[0]] = numpy_helper.to_array(a["value"])
                    elif "value_float" in a:
                        init_arrays[n.output[0]] = np.array(a["value_float"], np.float32)
                    elif "value_floats" in a:
                        init_arrays[n.output[0]] = np.array(a["value_floats"], np.float32)
                    elif "value_int" in a:
                        init_arrays[n.output[0]] = np.array(a["value_int"], np.int64)
                    elif "value_ints" in a:
                        init_arrays[n.output[0]] = np.array(a["value_ints"], np.int64)
                    else:
                        raise ModelError(f"Constant node {n.name!r}: unsupported value attribute {sorted(a)}")
            keep = [(n, a) for n, a in zip(self.nodes, self._attrs) if n.op_type != "Constant"]
            self.nodes = [n for n, _ in keep]
            self._attrs = [a for _, a in keep]
            param_names = set()
            for n in self.nodes:
                for slot in _PARAM_SLOTS.get(n.op_type, ()):
                    if slot < len(n.input) and n.input[slot] in init_arrays \
                            and np.issubdtype(init_arrays[n.input[slot]].dtype, np.floating):
                        param_names.add(n.input[slot])
            self._params = nn.ParameterDict()
            self._key: dict[str, str] = {}
            self._consts: dict[str, Any] = {}
            for i, (name, arr) in enumerate(init_arrays.items()):
                t = torch.from_numpy(np.array(arr, copy=True))
                if name in param_names:
                    key = f"p{i}"
                    self._params[key] = nn.Parameter(t.float(), requires_grad=trainable)
                    self._key[name] = key
                elif np.issubdtype(arr.dtype, np.floating):
                    key = f"c{i}"
                    self.register_buffer(key, t.float(), persistent=False)
                    self._key[name] = key
                else:
                    self._consts[name] = t
            self.initializer_names = list(init_arrays)
            self._producer: dict[str, int] = {}
            self._consumers: dict[str, list[int]] = {}
            for idx, n in enumerate(self.nodes):
                for o in n.output:
                    if o:
                        self._producer[o] = idx
                for i in n.input:
                    if i:
                        self._consumers.setdefault(i, []).append(idx)
            self._float = _float_values(model)
            # per-sample data: float values computed from the graph inputs through float values
            self._data = {v for v in self.input_names if self.is_float(v)}
            for n in self.nodes:
                if any(v in self._data for v in n.input if v):
                    self._data.update(o for o in n.output if o and self.is_float(o))
            self._quantizers: dict[str, Callable] = {}
            self._qmods = nn.ModuleDict()
            self._qkey: dict[str, str] = {}
            self._hooks: dict[str, list[Callable]] = {}
            self._plans: dict[tuple, list[int]] = {}
            self._nq = 0
            self._q_enabled = True

        # ---------------------------------------------------------------- names and values
        @property
        def params(self) -> dict:
            """ONNX initializer name -> ``nn.Parameter`` (Conv/Gemm/MatMul/BN weights and biases)."""
            return {name: self._params[key] for name, key in self._key.items() if key in self._params}

        def is_initializer(self, name: str) -> bool:
            return name in self._key or name in self._consts

        def initializer(self, name: str):
            """The stored (unquantized) tensor of an initializer."""
            if name in self._key:
                key = self._key[name]
                return self._params[key] if key in self._params else getattr(self, key)
            if name in self._consts:
                return self._consts[name]
            raise ModelError(f"{name!r} is not an initializer of the model")

        def set_weight(self, name: str, array) -> None:
            """Overwrite a parameter's value (e.g. with quantized weights)."""
            p = self.params.get(name)
            if p is None:
                raise ModelError(f"{name!r} is not a weight parameter of the model")
            with torch.no_grad():
                p.copy_(torch.as_tensor(np.asarray(array), dtype=p.dtype).reshape(p.shape))

        def is_float(self, value: str) -> bool:
            """Whether ``value`` holds floating-point data (False for shape arithmetic: Shape, integer
            Cast and what is computed from them), from the graph's declared and propagated element types."""
            return self._float.get(value, True)

        def is_data(self, value: str) -> bool:
            """Whether ``value`` is per-sample float data: computed from the graph inputs through float values.
            Shape arithmetic (integer, or float computed from a ``Shape``) and values computed from
            initializers alone are not: they have no sample axis."""
            return value in self._data

        def producer(self, value: str):
            """The node (onnx.NodeProto) that produces ``value``, or None (graph input, initializer)."""
            idx = self._producer.get(value)
            return None if idx is None else self.nodes[idx]

        def consumers(self, value: str) -> list:
            return [self.nodes[i] for i in self._consumers.get(value, [])]

        def value_names(self) -> list[str]:
            """All graph inputs and node outputs, in topological order."""
            out = list(self.input_names)
            for n in self.nodes:
                out += [o for o in n.output if o]
            return out

        # ---------------------------------------------------------------- quantizers and hooks
        def set_quantizer(self, name: str, fn: Callable | None) -> None:
            """Apply ``fn`` to value ``name`` wherever it is produced or read (None removes it)."""
            if name not in self._producer and name not in self.input_names and not self.is_initializer(name):
                raise ModelError(f"set_quantizer: the model has no value named {name!r}")
            if name in self._qkey:
                del self._qmods[self._qkey.pop(name)]
            self._quantizers.pop(name, None)
            if fn is None:
                return
            self._quantizers[name] = fn
            if isinstance(fn, nn.Module):
                key = f"q{self._nq}"
                self._nq += 1
                self._qmods[key] = fn
                self._qkey[name] = key

        def get_quantizer(self, name: str):
            return self._quantizers.get(name)

        @property
        def quantizers(self) -> dict:
            return dict(self._quantizers)

        def clear_quantizers(self) -> None:
            for name in list(self._quantizers):
                self.set_quantizer(name, None)

        @contextlib.contextmanager
        def quantization(self, enabled: bool):
            """Context manager: run with all quantizers on (True) or off (False, the fp32 model)."""
            old = self._q_enabled
            self._q_enabled = bool(enabled)
            try:
                yield self
            finally:
                self._q_enabled = old

        def _quantizer(self, name: str):
            return self._quantizers.get(name) if self._q_enabled else None

        def add_hook(self, name: str, callback: Callable) -> Callable:
            """Call ``callback(tensor)`` with value ``name`` (after its quantizer) whenever it is computed.

            Returns a function that removes the hook.
            """
            self._hooks.setdefault(name, []).append(callback)

            def remove():
                lst = self._hooks.get(name, [])
                if callback in lst:
                    lst.remove(callback)
            return remove

        # ---------------------------------------------------------------- execution
        def _plan(self, available: frozenset, outputs: tuple) -> list[int]:
            key = (available, outputs)
            if key in self._plans:
                return self._plans[key]
            need: set[int] = set()
            stack = [o for o in outputs]
            seen: set[str] = set()
            while stack:
                v = stack.pop()
                if v in seen or v == "" or v in available or self.is_initializer(v):
                    continue
                seen.add(v)
                idx = self._producer.get(v)
                if idx is None:
                    if v in self.input_names:
                        raise HagoError(f"computing {list(outputs)} needs graph input {v!r}, which was not given")
                    raise HagoError(f"the model has no value named {v!r}")
                if idx not in need:
                    need.add(idx)
                    stack.extend(self.nodes[idx].input)
            plan = sorted(need)
            self._plans[key] = plan
            return plan

        def _read(self, name, env, cache):
            if name == "":
                return None
            if name in env:
                return env[name]
            if name in cache:
                return cache[name]
            t = self.initializer(name)
            fn = self._quantizer(name)
            if fn is not None:
                t = fn(t)
            cache[name] = t
            return t

        def run_subgraph(self, inputs: dict, outputs: Sequence[str], *, quantize_inputs: bool = False,
                         pre_quant: bool = False) -> dict:
            """Compute ``outputs`` from the values in ``inputs`` (any value names), running only the needed nodes.

            ``quantize_inputs``: apply the quantizers set on the given values (default False: they are
            taken as they are). ``pre_quant``: return the requested outputs before their own quantizer.
            """
            outputs = tuple(outputs)
            env: dict[str, Any] = {}
            raw: dict[str, Any] = {}
            for k, v in inputs.items():
                if not isinstance(v, torch.Tensor):
                    v = torch.as_tensor(np.asarray(v))
                raw[k] = v
                fn = self._quantizer(k)
                env[k] = fn(v) if (quantize_inputs and fn is not None) else v
                for h in self._hooks.get(k, ()):
                    h(env[k])
            plan = self._plan(frozenset(inputs), outputs)
            want_raw = set(outputs) if pre_quant else set()
            cache: dict[str, Any] = {}
            for idx in plan:
                node = self.nodes[idx]
                args = [self._read(i, env, cache) for i in node.input]
                res = self._exec(node, self._attrs[idx], args)
                for name, val in zip(node.output, res):
                    if not name:
                        continue
                    if name in want_raw:
                        raw[name] = val
                    fn = self._quantizer(name)
                    if fn is not None:
                        val = fn(val)
                    env[name] = val
                    for h in self._hooks.get(name, ()):
                        h(val)
            out = {}
            for o in outputs:
                if pre_quant and o in raw:
                    out[o] = raw[o]
                elif o in env:
                    out[o] = env[o]
                else:
                    out[o] = self._read(o, env, cache)
            return out

        def run(self, feeds: dict, outputs: Sequence[str] | None = None, **kw) -> dict:
            """Run from the graph inputs (``feeds``: input name -> array/tensor); return ``{name: tensor}``."""
            missing = [n for n in self.input_names if n not in feeds]
            if missing:
                raise HagoError(f"missing graph input(s) {missing}; the model's inputs are {self.input_names}")
            feeds = {k: v for k, v in feeds.items() if k in self.input_names}
            return self.run_subgraph(feeds, outputs or self.output_names, quantize_inputs=True, **kw)

        def forward(self, *args, **kwargs):
            feeds = dict(zip(self.input_names, args))
            feeds.update(kwargs)
            res = self.run(feeds)
            outs = [res[o] for o in self.output_names]
            return outs[0] if len(outs) == 1 else tuple(outs)

        # ---------------------------------------------------------------- ops
        def _exec(self, node, a, x):
            op = node.op_type
            fn = getattr(self, "_op_" + op)
            try:
                r = fn(node, a, x)
            except HagoError:
                raise
            except Exception as e:  # torch shape errors etc. name the node
                raise ModelError(f"node {node.name!r} ({op}) failed in the torch bridge: {e}") from e
            return r if isinstance(r, (list, tuple)) else [r]

        def _op_Identity(self, node, a, x):
            return x[0]

        def _op_Dropout(self, node, a, x):
            out = [x[0]]
            if len(node.output) > 1 and node.output[1]:
                out.append(torch.ones_like(x[0], dtype=torch.bool))
            return out

        def _op_Relu(self, node, a, x):
            return torch.relu(x[0])

        def _op_Sigmoid(self, node, a, x):
            return torch.sigmoid(x[0])

        def _op_Tanh(self, node, a, x):
            return torch.tanh(x[0])

        def _op_LeakyRelu(self, node, a, x):
            return F.leaky_relu(x[0], float(a.get("alpha", 0.01)))

        def _op_Add(self, node, a, x):
            return x[0] + x[1]

        def _op_Sub(self, node, a, x):
            return x[0] - x[1]

        def _op_Mul(self, node, a, x):
            return x[0] * x[1]

        def _op_Div(self, node, a, x):
            if not x[0].is_floating_point() and not x[1].is_floating_point():
                return torch.div(x[0], x[1], rounding_mode="trunc")
            return x[0] / x[1]

        def _op_Clip(self, node, a, x):
            if self.opset < 11:
                lo, hi = a.get("min"), a.get("max")
            else:
                lo = _scalar(x[1]) if len(x) > 1 else None
                hi = _scalar(x[2]) if len(x) > 2 else None
            if lo is None and hi is None:
                return x[0]
            return torch.clamp(x[0], min=lo, max=hi)

        def _op_Conv(self, node, a, x):
            inp, w = x[0], x[1]
            b = x[2] if len(x) > 2 else None
            k = w.dim() - 2
            kernel = list(a.get("kernel_shape", w.shape[2:]))
            strides = list(a.get("strides", [1] * k))
            dil = list(a.get("dilations", [1] * k))
            group = int(a.get("group", 1))
            begins, ends = _resolve_pads(node, a, inp, kernel, strides, dil)
            if begins == ends:
                padding = begins
            else:
                inp = F.pad(inp, _torch_pad_arg(begins, ends))
                padding = [0] * k
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(k)
            if conv is None:
                raise ModelError(f"node {node.name!r}: Conv with {k} spatial dims is not supported")
            return conv(inp, w, b, stride=strides, padding=padding, dilation=dil, groups=group)

        def _op_Gemm(self, node, a, x):
            A, B = x[0], x[1]
            if a.get("transA", 0):
                A = A.transpose(0, 1)
            if a.get("transB", 0):
                B = B.transpose(0, 1)
            y = A @ B
            alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
            if alpha != 1.0:
                y = y * alpha
            if len(x) > 2 and x[2] is not None:
                c = x[2] if beta == 1.0 else x[2] * beta
                y = y + c
            return y

        def _op_MatMul(self, node, a, x):
            return torch.matmul(x[0], x[1])

        def _op_BatchNormalization(self, node, a, x):
            if a.get("training_mode", 0):
                raise ModelError(f"node {node.name!r}: BatchNormalization in training mode is not supported")
            inp, scale, bias, mean, var = x[:5]
            return F.batch_norm(inp, mean, var, scale, bias, training=False, eps=float(a.get("epsilon", 1e-5)))

        def _pool_common(self, node, a, inp):
            kernel = list(a["kernel_shape"])
            k = len(kernel)
            strides = list(a.get("strides", [1] * k))
            dil = list(a.get("dilations", [1] * k))
            begins, ends = _resolve_pads(node, a, inp, kernel, strides, dil)
            return kernel, strides, dil, begins, ends, bool(a.get("ceil_mode", 0))

        def _op_MaxPool(self, node, a, x):
            if len(node.output) > 1 and node.output[1]:
                raise ModelError(f"node {node.name!r}: MaxPool's Indices output is not supported")
            inp = x[0]
            kernel, strides, dil, begins, ends, ceil = self._pool_common(node, a, inp)
            k = len(kernel)
            pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
            native = begins == ends and all(p <= kk // 2 for p, kk in zip(begins, kernel))
            if native:
                return pool(inp, kernel, strides, begins, dil, ceil_mode=ceil)
            inp = F.pad(inp, _torch_pad_arg(begins, ends), value=float("-inf"))
            return pool(inp, kernel, strides, 0, dil, ceil_mode=ceil)

        def _op_AveragePool(self, node, a, x):
            inp = x[0]
            kernel, strides, dil, begins, ends, ceil = self._pool_common(node, a, inp)
            if any(d != 1 for d in dil):
                raise ModelError(f"node {node.name!r}: AveragePool with dilations is not supported")
            k = len(kernel)
            pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[k]
            include = bool(a.get("count_include_pad", 0))
            native = begins == ends and all(p <= kk // 2 for p, kk in zip(begins, kernel))
            if native:
                return pool(inp, kernel, strides, begins, ceil_mode=ceil, count_include_pad=include)
            padded = F.pad(inp, _torch_pad_arg(begins, ends))
            total = pool(padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
            if include:
                return total
            ones = F.pad(torch.ones_like(inp[:1, :1]), _torch_pad_arg(begins, ends))
            frac = pool(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
            return total / frac

        def _op_GlobalAveragePool(self, node, a, x):
            return x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)

        def _op_GlobalMaxPool(self, node, a, x):
            return x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)

        def _op_Flatten(self, node, a, x):
            t = x[0]
            axis = int(a.get("axis", 1))
            if axis < 0:
                axis += t.dim()
            lead = int(np.prod(t.shape[:axis])) if axis > 0 else 1
            return t.reshape(lead, -1)

        def _op_Reshape(self, node, a, x):
            t = x[0]
            shape = [int(s) for s in x[1].reshape(-1).tolist()]
            if not a.get("allowzero", 0):
                shape = [t.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return t.reshape(shape)

        def _op_Transpose(self, node, a, x):
            perm = a.get("perm")
            if perm is None:
                perm = list(reversed(range(x[0].dim())))
            return x[0].permute(*perm)

        def _op_Concat(self, node, a, x):
            return torch.cat([t for t in x if t is not None], dim=int(a["axis"]))

        def _op_Softmax(self, node, a, x):
            t = x[0]
            if self.opset >= 13:
                return torch.softmax(t, dim=int(a.get("axis", -1)))
            axis = int(a.get("axis", 1))
            if axis < 0:
                axis += t.dim()
            shape = t.shape
            flat = t.reshape(int(np.prod(shape[:axis])) if axis else 1, -1)
            return torch.softmax(flat, dim=1).reshape(shape)

        def _axes(self, a, x):
            if len(x) > 1 and x[1] is not None:
                return [int(v) for v in x[1].reshape(-1).tolist()]
            return a.get("axes")

        def _op_Squeeze(self, node, a, x):
            axes = self._axes(a, x)
            t = x[0]
            if axes is None:
                return t.squeeze()
            axes = sorted((ax + t.dim()) % t.dim() for ax in axes)
            for ax in reversed(axes):
                t = t.squeeze(ax)
            return t

        def _op_Unsqueeze(self, node, a, x):
            axes = self._axes(a, x)
            t = x[0]
            rank = t.dim() + len(axes)
            for ax in sorted((ax + rank) % rank for ax in axes):
                t = t.unsqueeze(ax)
            return t

        # -- shape arithmetic and the ops of transformer blocks -------------------------------------
        def _op_Shape(self, node, a, x):
            shape = torch.tensor(list(x[0].shape), dtype=torch.int64)
            start, end = a.get("start", 0), a.get("end")
            return shape[start:end] if end is not None else shape[start:]

        _CAST = {1: "float32", 10: "float16", 11: "float64", 6: "int32", 7: "int64", 9: "bool", 2: "uint8",
                 3: "int8", 16: "bfloat16"}

        def _op_Cast(self, node, a, x):
            to = int(a["to"])
            if to not in self._CAST:
                raise ModelError(f"node {node.name!r}: Cast to ONNX type {to} is not supported")
            return x[0].to(getattr(torch, self._CAST[to]))

        def _op_Slice(self, node, a, x):
            t = x[0]
            if self.opset < 10:
                starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
            else:
                starts = [int(v) for v in x[1].reshape(-1).tolist()]
                ends = [int(v) for v in x[2].reshape(-1).tolist()]
                axes = [int(v) for v in x[3].reshape(-1).tolist()] if len(x) > 3 and x[3] is not None else None
                steps = [int(v) for v in x[4].reshape(-1).tolist()] if len(x) > 4 and x[4] is not None else None
            axes = list(range(len(starts))) if axes is None else axes
            steps = [1] * len(starts) if steps is None else steps
            idx = [slice(None)] * t.dim()
            flips = []
            for st, en, ax, sp in zip(starts, ends, axes, steps):
                ax = ax + t.dim() if ax < 0 else ax
                n = t.shape[ax]
                st = st + n if st < 0 else st
                en = en + n if en < 0 else en
                if sp > 0:
                    idx[ax] = slice(max(0, min(st, n)), max(0, min(en, n)), sp)
                else:  # negative steps: torch has none; take the forward slice and flip it
                    st, en = min(st, n - 1), max(en, -1)
                    lo = en + 1
                    sel = torch.arange(st, lo - 1, sp) if st >= lo else torch.arange(0)
                    idx[ax] = sel
                    flips.append(ax)
            if flips:
                for ax in range(t.dim()):
                    if isinstance(idx[ax], torch.Tensor):
                        t = t.index_select(ax, idx[ax])
                        idx[ax] = slice(None)
            return t[tuple(idx)]

        def _op_Gather(self, node, a, x):
            axis = int(a.get("axis", 0))
            t, ind = x[0], x[1].long()
            axis = axis + t.dim() if axis < 0 else axis
            ind = torch.where(ind < 0, ind + t.shape[axis], ind)
            out = t.index_select(axis, ind.reshape(-1))
            return out.reshape(list(t.shape[:axis]) + list(ind.shape) + list(t.shape[axis + 1:]))

        def _op_ReduceMean(self, node, a, x):
            t = x[0]
            axes = self._axes(a, x) if self.opset >= 18 else a.get("axes")
            keep = bool(a.get("keepdims", 1))
            if not axes:
                if a.get("noop_with_empty_axes", 0):
                    return t
                axes = list(range(t.dim()))
            return t.mean(dim=tuple(int(v) for v in axes), keepdim=keep)

        def _op_Pow(self, node, a, x):
            e = x[1]
            if e.numel() == 1 and float(e.reshape(-1)[0]) == 2.0:
                return x[0] * x[0]
            return torch.pow(x[0], e.to(x[0].dtype) if x[0].is_floating_point() else e)

        def _op_Sqrt(self, node, a, x):
            return torch.sqrt(x[0])

        def _op_HardSigmoid(self, node, a, x):
            alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
            return torch.clamp(x[0] * alpha + beta, 0.0, 1.0)

        def _op_HardSwish(self, node, a, x):
            return x[0] * torch.clamp(x[0] / 6.0 + 0.5, 0.0, 1.0)

    OnnxModule.__module__ = __name__
    return OnnxModule
