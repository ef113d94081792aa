"""Latency of compiled artifacts (TVM, local or over RPC) and of onnxruntime sessions, with one harness.

``measure(artifact, inputs)`` runs the artifact ``warmup`` times, then ``repeat`` timed samples of ``number``
back-to-back runs each (a sample is their mean), with a fixed thread count, and returns :class:`MeasureStats`.
``measure_onnxruntime(model, inputs, threads)`` times an onnxruntime session the same way (intra-op threads fixed,
inter-op 1, sequential execution) so FP32, INT8 and onnxruntime numbers are comparable side by side.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from ..errors import DeviceError, HagoError

__all__ = ["MeasureStats", "measure", "measure_onnxruntime", "profile", "random_inputs", "set_num_threads",
           "stats_from_samples"]


@dataclasses.dataclass(frozen=True)
class MeasureStats:
    """Latency statistics of ``n`` samples, in milliseconds."""

    median_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float
    n: int
    device: str
    threads: int | None = None

    @property
    def spread_ms(self) -> float:
        """Interquartile range (robust spread)."""
        return self.iqr_ms

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms median (IQR {self.iqr_ms:.3f}, min {self.min_ms:.3f}, n={self.n}, "
                f"{self.device}{'' if self.threads is None else f', {self.threads} threads'})")


def stats_from_samples(samples_ms, device: str, threads: int | None = None) -> MeasureStats:
    a = np.asarray(list(samples_ms), dtype=np.float64)
    if a.size == 0:
        raise HagoError("measure: no samples")
    q1, q3 = np.percentile(a, [25, 75])
    return MeasureStats(
        median_ms=float(np.median(a)), mean_ms=float(a.mean()), std_ms=float(a.std(ddof=1) if a.size > 1 else 0.0),
        min_ms=float(a.min()), max_ms=float(a.max()), iqr_ms=float(q3 - q1), n=int(a.size), device=device,
        threads=threads,
    )


def set_num_threads(n: int | None) -> None:
    """Fix the TVM runtime's thread pool size in this process (``runtime.config_threadpool``).

    TVM binds its threads to cores counted from core 0 of the machine, ignoring the process's CPU mask: a
    benchmark started with ``taskset -c 1`` would run on core 0, beside whatever the user put there. Unless the
    user set ``TVM_BIND_THREADS``, binding is turned off, so the operating system's mask holds."""
    if not n:
        return
    import tvm

    os.environ.setdefault("TVM_BIND_THREADS", "0")
    os.environ["TVM_NUM_THREADS"] = str(int(n))
    f = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if f is not None:
        f(0, int(n))  # affinity mode 0 = big cores (all cores on a homogeneous CPU), n threads


def random_inputs(names, shapes, dtypes, seed: int = 0) -> dict:
    """Random arrays of the given shapes and dtypes (floats in [0, 1), integers in their dtype's small range)."""
    rs = np.random.RandomState(seed)
    out = {}
    for n, s, d in zip(names, shapes, dtypes):
        s = [int(x) for x in s]
        if "float" in d:
            out[n] = rs.rand(*s).astype(d)
        elif d == "bool":
            out[n] = rs.randint(0, 2, size=s).astype(d)
        elif d.startswith("uint"):
            out[n] = rs.randint(0, 256 if d == "uint8" else 1000, size=s).astype(d)
        else:
            out[n] = rs.randint(-8, 8, size=s).astype(d)
    return out


def _time_loop(fn, repeat: int, warmup: int, number: int) -> list[float]:
    for _ in range(max(0, warmup)):
        fn()
    samples = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        for _ in range(max(1, number)):
            fn()
        samples.append((time.perf_counter() - t0) * 1e3 / max(1, number))
    return samples


def measure(artifact, inputs=None, *, repeat: int = 30, warmup: int = 5, number: int = 1, threads: int | None = None,
            rpc=None) -> MeasureStats:
    """Latency of ``artifact`` (a :class:`hago.backend.compile.Artifact`) on ``inputs`` (``{name: ndarray}``;
    random ones of the right shapes/dtypes when None).

    Locally the artifact runs in this process with ``threads`` TVM threads (default: the artifact's, else the
    runtime's default). With ``rpc`` (a session or ``"host:port:key"``) it is uploaded and timed on the remote
    device by :mod:`hago.backend.rpc`.
    """
    if repeat < 1:
        raise HagoError(f"measure: repeat must be >= 1, got {repeat}")
    if inputs is None:
        inputs = random_inputs(artifact.input_names, artifact.input_shapes, artifact.input_dtypes)
    else:
        missing = [n for n in artifact.input_names if n not in inputs]
        if missing:
            raise HagoError(f"measure: inputs lack {missing} (artifact inputs: {artifact.input_names})")
    threads = threads or getattr(artifact, "threads", None)
    if rpc is not None:
        return _measure_rpc(artifact, inputs, rpc, repeat=repeat, warmup=warmup, number=number, threads=threads)
    ok, why = artifact.runnable()
    if not ok:
        raise DeviceError(f"measure: artifact for {artifact.target_str} cannot run here ({why}); pass rpc=")
    set_num_threads(threads)
    import tvm

    vm = artifact.vm()
    dev = artifact.device()
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), dev) for n in artifact.input_names]
    fmain = vm["main"]

    def run():
        fmain(*args)
        dev.sync()

    samples = _time_loop(run, repeat, warmup, number)
    return stats_from_samples(samples, device=f"tvm:{artifact.target_kind}:{dev}", threads=threads)


def _measure_rpc(artifact, inputs, rpc, *, repeat, warmup, number, threads):
    """Upload and time through :mod:`hago.backend.rpc` (``connect_address`` / ``upload_and_run``)."""
    try:
        from . import rpc as rpc_mod
    except ImportError as e:  # pragma: no cover - shipped with hago
        raise DeviceError(f"measure(rpc=...): hago.backend.rpc cannot be imported ({e})") from e
    where = rpc if isinstance(rpc, str) else "session"
    if isinstance(rpc, str):
        session = rpc_mod.connect_address(rpc)
    else:
        session = rpc
    # upload_and_run discards one warm-up run itself; `warmup` extra runs are folded into the first sample's
    # time_evaluator call by TVM, so only repeat/number are passed on
    res = rpc_mod.upload_and_run(artifact.executable, artifact.target, session,
                                 {n: inputs[n] for n in artifact.input_names}, repeat=repeat, number=max(1, number))
    lat = res.latency
    return stats_from_samples(getattr(lat, "times_ms", None) or [lat.median_ms], device=f"rpc:{where}",
                              threads=threads)


def measure_onnxruntime(model, inputs=None, threads: int = 1, repeat: int = 30, warmup: int = 5, number: int = 1,
                        optimize: bool = True) -> MeasureStats:
    """Latency of an ONNX model (``ModelProto`` or path) in onnxruntime's CPU provider with ``threads`` intra-op
    threads (inter-op 1, sequential), timed like :func:`measure`."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise HagoError(f"measure_onnxruntime: onnxruntime cannot load the model: {e}") from e
    ins = sess.get_inputs()
    if inputs is None:
        tmap = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
                "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
        inputs = random_inputs([i.name for i in ins], [[d if isinstance(d, int) else 1 for d in i.shape] for i in ins],
                               [tmap.get(i.type, "float32") for i in ins])
    feeds = {i.name: inputs[i.name] for i in ins}
    samples = _time_loop(lambda: sess.run(None, feeds), repeat, warmup, number)
    return stats_from_samples(samples, device=f"onnxruntime-{ort.__version__}:cpu", threads=int(threads))


def profile(artifact, inputs=None, *, runs: int = 5, threads: int | None = None) -> list[dict]:
    """Where the time goes in a compiled artifact: wall time of every kernel call of the Relax VM (timed by a VM
    instrument around each call instruction), summed per kernel and averaged over ``runs`` runs after a warm-up.
    Rows ``{"kernel", "ms", "calls", "shapes"}`` (shapes: the tensor arguments of the first call, inputs then
    outputs) sorted by time. Local artifacts only."""
    ok, why = artifact.runnable()
    if not ok:
        raise DeviceError(f"profile: artifact for {artifact.target_str} cannot run here ({why})")
    if inputs is None:
        inputs = random_inputs(artifact.input_names, artifact.input_shapes, artifact.input_dtypes)
    set_num_threads(threads or getattr(artifact, "threads", None))
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(artifact.executable, artifact.device())
    dev = artifact.device()
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), dev) for n in artifact.input_names]
    vm["main"](*args)  # warm-up
    per: dict[str, list] = {}
    t0 = [0.0]

    def instrument(func, name, before, ret, *a):
        if before:
            t0[0] = time.perf_counter()
        else:
            dev.sync()
            row = per.setdefault(str(name), [0.0, 0, None])
            row[0] += time.perf_counter() - t0[0]
            row[1] += 1
            if row[2] is None:  # the first call's tensor shapes: which layer this kernel is
                row[2] = [tuple(int(d) for d in x.shape) for x in a if hasattr(x, "shape")]
        return 0

    vm.set_instrument(instrument)
    for _ in range(max(1, runs)):
        vm["main"](*args)
    n = max(1, runs)
    rows = [{"kernel": k, "ms": v[0] * 1e3 / n, "calls": v[1] // n, "shapes": v[2] or []} for k, v in per.items()]
    return sorted(rows, key=lambda r: -r["ms"])
