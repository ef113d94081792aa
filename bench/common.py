"""Shared helpers of the benchmark scripts."""
from __future__ import annotations

import os
import platform

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        flags = ",".join(x for x in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {x} " in txt)
    except OSError:
        pass
    return f"{cpu or platform.machine()} ({os.cpu_count()} cores; {flags})"


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The onnx package's light models have constant weights; give every float initializer He-style random values
    (BatchNorm variances positive) so activations and latencies are those of a real network."""
    rs = np.random.RandomState(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    bn_params = set()
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            bn_params.update(n.input[1:5])
            scale, bias, mean, var = n.input[1:5]
            bn_params.update([("var", var), ("scale", scale)])
    var_names = {x[1] for x in bn_params if isinstance(x, tuple) and x[0] == "var"}
    scale_names = {x[1] for x in bn_params if isinstance(x, tuple) and x[0] == "scale"}
    for i, t in enumerate(m.graph.initializer):
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32 or a.ndim == 0:
            continue
        if t.name in var_names:
            a = (0.5 + rs.rand(*a.shape)).astype(np.float32)
        elif t.name in scale_names:
            a = (1.0 + 0.1 * rs.randn(*a.shape)).astype(np.float32)
        elif a.ndim >= 2:
            fan_in = int(np.prod(a.shape[1:]))
            a = (rs.randn(*a.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            a = (0.05 * rs.randn(*a.shape)).astype(np.float32)
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    return m


def light(name: str, seed: int = 0) -> onnx.ModelProto:
    return randomize_weights(onnx.load(os.path.join(LIGHT, f"light_{name}.onnx")), seed)


def image_batches(shape, n: int, seed: int, name: str):
    rs = np.random.RandomState(seed)
    return [{name: rs.rand(*shape).astype(np.float32)} for _ in range(n)]
