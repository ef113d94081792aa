"""hago: hardware-aware post-training quantization compiler.

The public API (a stable contract):

    graph = hago.load("model.onnx")                 # hago.ir.Graph
    spec = hago.load_spec("hwspecs/x86_avx2.json")  # hago.hwspec.HardwareSpec
    qg = hago.quantize(graph, spec, calib_data)     # hago.QuantizedGraph
    art = hago.compile(qg, spec)                    # compiled TVM artifact
    stats = hago.measure(art, inputs)               # latency statistics
    result = hago.search(graph, spec, calib_data)   # bits/scales search
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    CalibrationError,
    CompileError,
    DeviceError,
    HagoError,
    ModelError,
    SearchError,
    SpecError,
)

# Heavy modules (onnx, onnxruntime, TVM) load on first use so that `import hago`
# and the CLI start fast.
_LAZY = {
    "load": ("hago.ir", "load"),
    "Graph": ("hago.ir", "Graph"),
    "load_spec": ("hago.hwspec", "load_spec"),
    "HardwareSpec": ("hago.hwspec", "HardwareSpec"),
    "quantize": ("hago.pipeline", "quantize"),
    "QuantizedGraph": ("hago.pipeline", "QuantizedGraph"),
    # hago.search is a callable package: hago.search(graph, spec, calib, ...) runs hago.search.driver.search
    "search": ("hago.search", "search"),
}
_SUBMODULES = {"ir", "hwspec", "passes", "calibrate", "algorithms", "search", "backend", "runtime", "cli", "examples"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        if name == "search":
            return importlib.import_module("hago.search")
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"hago.{name}")
    raise AttributeError(f"module 'hago' has no attribute {name!r}")


def compile(qgraph, spec_or_target, **kwargs):  # noqa: A001 - public name is a contract
    """Compile a (quantized or float) graph with TVM for the spec's target.

    See :func:`hago.backend.compile.compile`.
    """
    from .backend.compile import compile as _compile

    if isinstance(spec_or_target, str):  # a shipped spec name or a spec file
        from .hwspec import load_spec as _load_spec

        spec_or_target = _load_spec(spec_or_target)
    return _compile(qgraph, spec_or_target, **kwargs)


def measure(artifact, inputs=None, **kwargs):
    """Measure the latency of a compiled artifact (local or over TVM RPC).

    See :func:`hago.backend.measure.measure`.
    """
    from .backend.measure import measure as _measure

    return _measure(artifact, inputs, **kwargs)


def load_result(path):
    """Load a saved search result. See :func:`hago.search.driver.load_result`."""
    from .search.driver import load_result as _load_result

    return _load_result(path)
