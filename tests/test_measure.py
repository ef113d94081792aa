"""hago.backend.measure: statistics structure, random inputs, onnxruntime harness, error paths (no timing asserts)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from hago.backend.compile import compile  # noqa: E402
from hago.backend.measure import (  # noqa: E402
    MeasureStats,
    measure,
    measure_onnxruntime,
    random_inputs,
    stats_from_samples,
)
from hago.errors import DeviceError, HagoError  # noqa: E402


def _tiny_module():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(x, relax.const(np.ones((4, 8), "float32"))))
            o = bb.emit_output(y)
        bb.emit_func_output(o)
    return bb.get()


def _check_stats(s: MeasureStats, n: int):
    assert isinstance(s, MeasureStats)
    assert s.n == n
    assert 0 < s.min_ms <= s.median_ms <= s.max_ms
    assert s.min_ms <= s.mean_ms <= s.max_ms
    assert s.std_ms >= 0 and s.iqr_ms >= 0 and s.spread_ms == s.iqr_ms
    assert np.isfinite([s.median_ms, s.mean_ms, s.std_ms, s.iqr_ms]).all()
    assert isinstance(s.device, str) and s.device


def test_stats_from_samples_values():
    s = stats_from_samples([1.0, 2.0, 3.0, 4.0, 100.0], device="x", threads=2)
    assert s.median_ms == 3.0 and s.min_ms == 1.0 and s.max_ms == 100.0 and s.n == 5
    assert s.mean_ms == pytest.approx(22.0)
    assert s.iqr_ms == pytest.approx(2.0)  # 4 - 2
    assert s.as_dict()["threads"] == 2
    with pytest.raises(HagoError):
        stats_from_samples([], device="x")


def test_random_inputs_shapes_and_dtypes():
    r = random_inputs(["a", "b", "c"], [(2, 3), (4,), (1, 2)], ["float32", "uint8", "int64"])
    assert r["a"].shape == (2, 3) and r["a"].dtype == np.float32
    assert r["b"].dtype == np.uint8 and r["c"].dtype == np.int64 and r["c"].shape == (1, 2)


def test_measure_local_artifact(tmp_path):
    art = compile(_tiny_module(), "llvm", cache_dir=str(tmp_path), progress=False)
    s = measure(art, None, repeat=7, warmup=1, threads=1)
    _check_stats(s, 7)
    assert s.threads == 1 and s.device.startswith("tvm:llvm")
    s2 = measure(art, {"x": np.zeros((4, 8), np.float32)}, repeat=3, warmup=0, number=2)
    _check_stats(s2, 3)
    with pytest.raises(HagoError, match="lack"):
        measure(art, {"y": np.zeros((4, 8), np.float32)})
    with pytest.raises(HagoError, match="repeat"):
        measure(art, None, repeat=0)


def test_measure_onnxruntime_same_harness():
    pytest.importorskip("onnxruntime")
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(np.ones((4, 8), np.float32), "c")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    s = measure_onnxruntime(m, None, threads=1, repeat=5, warmup=1)
    _check_stats(s, 5)
    assert s.threads == 1 and s.device.startswith("onnxruntime")


def test_measure_cross_artifact_needs_rpc(tmp_path):
    art = compile(_tiny_module(), {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
                  cache_dir=str(tmp_path), progress=False)
    with pytest.raises(DeviceError, match="rpc"):
        measure(art, None, repeat=2)


def test_measure_rpc_unreachable_raises_device_error(tmp_path):
    art = compile(_tiny_module(), "llvm", cache_dir=str(tmp_path), progress=False)
    with pytest.raises(HagoError):  # DeviceError: nothing listens on port 1
        measure(art, None, repeat=2, rpc="127.0.0.1:1:nokey")


def test_profile_kernels_of_an_artifact(tmp_path):
    from hago.backend.measure import profile

    art = compile(_tiny_module(), "llvm", cache_dir=str(tmp_path), progress=False)
    rows = profile(art, None, runs=3)
    assert rows and all(r["ms"] >= 0 and r["calls"] >= 1 for r in rows)
    assert rows == sorted(rows, key=lambda r: -r["ms"])
    add = [r for r in rows if "add" in r["kernel"]]
    assert add and add[0]["shapes"][0] == (4, 8) and add[0]["shapes"][-1] == (4, 8)  # which layer it is


def test_profile_nodes_of_onnxruntime():
    from onnx import TensorProto, helper, numpy_helper

    from hago.runtime.ort import profile_nodes

    w = numpy_helper.from_array(np.random.RandomState(0).rand(64, 64).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                           helper.make_node("Relu", ["h"], ["y"], name="act")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 64])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    rows = profile_nodes(m, runs=3)
    assert {r["op"] for r in rows} & {"MatMul", "FusedMatMul", "Gemm"}
    assert all(r["ms"] >= 0 for r in rows)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to pin to the second")
def test_set_num_threads_keeps_the_process_cpu_mask():
    """`taskset -c 1 python bench/...` must run on core 1: TVM's thread pool binds to cores from core 0 unless
    hago turns binding off."""
    import subprocess
    import sys

    cpu = sorted(os.sched_getaffinity(0))[-1]
    code = ("import os; os.sched_setaffinity(0, {%d}); from hago.backend.measure import set_num_threads; "
            "set_num_threads(1); print(sorted(os.sched_getaffinity(0)))" % cpu)
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str([cpu])
