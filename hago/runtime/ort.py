"""onnxruntime execution: sessions, batched runs, intermediate-value capture.

Used for calibration (run the float model with chosen edges as extra outputs)
and for accuracy (run the QDQ model). ``optimize=False`` disables onnxruntime's
graph rewrites so a QDQ model is executed as the exact float simulation of the
integer arithmetic (DequantizeLinear(QuantizeLinear(x)) computed literally).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from ..errors import CalibrationError, ModelError

_LOGGER_SET = False


def _quiet():
    global _LOGGER_SET
    if not _LOGGER_SET:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        _LOGGER_SET = True


def session(model, *, threads: int | None = None, optimize: bool | str = True, source: str = "<model>"):
    """An onnxruntime CPU session for a ModelProto, bytes or path.

    ``optimize``: True (all of onnxruntime's rewrites, e.g. QDQ -> QLinearConv
    fusion), ``"basic"`` (constant folding only: the exact float simulation of
    a QDQ model, fast) or False (no rewrites).
    """
    import onnxruntime as ort

    _quiet()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimize == "basic":  # constant folding only (DQ of weights folds exactly); no QDQ fusion
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, onnx.ModelProto):
        payload = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        payload = bytes(model)
    else:
        payload = os.fspath(model)
    try:
        return ort.InferenceSession(payload, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"{source}: onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}") from None


def check_batch(batch: dict, input_names: Sequence[str], index: int) -> dict:
    """Validate one calibration/eval batch: all inputs present, finite values."""
    if not isinstance(batch, dict):
        raise CalibrationError(f"batch {index}: expected a dict {{input_name: array}}, got {type(batch).__name__}")
    missing = [n for n in input_names if n not in batch]
    if missing:
        raise CalibrationError(f"batch {index}: missing input(s) {missing}; the model's inputs are {list(input_names)}, "
                               f"the batch has {sorted(batch)}")
    feeds = {}
    for n in input_names:
        a = np.asarray(batch[n])
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise CalibrationError(f"batch {index}: input {n!r} has {int(bad.sum())} NaN/Inf value(s), first at index {where}")
            if a.dtype != np.float32:
                a = a.astype(np.float32)
        feeds[n] = a
    return feeds


def run(sess, feeds: dict, outputs: Sequence[str] | None = None, index: int = 0) -> list[np.ndarray]:
    try:
        return sess.run(list(outputs) if outputs else None, feeds)
    except Exception as e:
        shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in feeds.items()}
        exp = {i.name: (i.shape, i.type) for i in sess.get_inputs()}
        raise CalibrationError(f"batch {index}: onnxruntime failed on inputs {shapes} (model expects {exp}): "
                               f"{str(e).splitlines()[0][:300]}") from None


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the given intermediate values."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
            have.add(n)
    return m


def iterate(model, data: Iterable[dict], fn: Callable[[int, dict, list[np.ndarray]], None], *,
            outputs: Sequence[str] | None = None, threads: int | None = None, optimize: bool = True,
            source: str = "<model>") -> int:
    """Run ``model`` on every batch and call ``fn(index, feeds, outputs)``; returns the batch count."""
    sess = session(model, threads=threads, optimize=optimize, source=source)
    names = [i.name for i in sess.get_inputs()]
    n = 0
    for i, batch in enumerate(data):
        feeds = check_batch(batch, names, i)
        fn(i, batch, run(sess, feeds, outputs, i))
        n += 1
    return n


def random_feeds(sess) -> dict:
    """Inputs for timing a session: uniform [0, 1) floats (seed 0) and zero integers, symbolic dims bound to 1."""
    tmap = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    rs = np.random.RandomState(0)
    return {i.name: rs.rand(*[d if isinstance(d, int) else 1 for d in i.shape]).astype(tmap.get(i.type, np.float32))
            for i in sess.get_inputs()}


def profile_nodes(model, feeds: dict | None = None, *, threads: int = 1, runs: int = 10) -> list[dict]:
    """Where the time goes in onnxruntime: per-node kernel time (ms per run, averaged over ``runs`` profiled runs
    after one warm-up), from onnxruntime's own profiler, sorted by time. Each row: ``{"node", "op", "ms"}``.
    ``feeds``: ``{input name: array}`` (random ones of the right shapes when None)."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory(prefix="hago-prof-") as d:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(d, "ort")
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        if feeds is None:
            feeds = random_feeds(sess)
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        sess.run(None, feeds)
        for _ in range(max(1, runs)):
            sess.run(None, feeds)
        path = sess.end_profiling()
        with open(path) as f:
            events = json.load(f)
    per: dict[str, dict] = {}
    run_events = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    warm_end = run_events[0]["ts"] + run_events[0]["dur"] if run_events else -1  # the warm-up run is left out
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e.get("ts", 0) <= warm_end:
            continue
        name = e["name"][: -len("_kernel_time")]
        row = per.setdefault(name, {"node": name, "op": e.get("args", {}).get("op_name", "?"), "us": 0.0})
        row["us"] += float(e.get("dur", 0))
    n = max(1, runs) if run_events else max(1, runs) + 1
    rows = [{"node": r["node"], "op": r["op"], "ms": r["us"] / 1e3 / n} for r in per.values()]
    return sorted(rows, key=lambda r: -r["ms"])
