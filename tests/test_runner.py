"""hago.backend.runner: the native device runner (device/runner.cc) on x86 and, cross-compiled,
on aarch64 (Raspberry Pi 4, cortex-a72) under qemu-aarch64.

The reference is tvm's relax.VirtualMachine on the host: the runner must reproduce its outputs
exactly (integer code: bit for bit). Timings under emulation are never checked or reported.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from hago.backend import runner as rn  # noqa: E402
from hago.errors import CompileError, DeviceError, HagoError  # noqa: E402

RPI4_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}
IN_CI = bool(os.environ.get("CI"))


def _int8_module():
    """int8 matmul and conv2d with int32 accumulation, an int32 -> float32 rescale; a tuple result."""

    @tvm.script.ir_module
    class Int8Mod:
        @R.function
        def main(x: R.Tensor((4, 16), "int8"), w: R.Tensor((16, 8), "int8"),
                 img: R.Tensor((1, 3, 8, 8), "int8"), k: R.Tensor((4, 3, 3, 3), "int8")):
            with R.dataflow():
                y = R.matmul(x, w, out_dtype="int32")
                c = R.nn.conv2d(img, k, padding=(1, 1), out_dtype="int32")
                f = R.multiply(R.astype(y, "float32"), R.const(0.125, "float32"))
                r = R.astype(R.clip(R.right_shift(c, R.const(6, "int32")), -128, 127), "int8")
                R.output(y, c, f, r)
            return (y, c, f, r)

    return Int8Mod


def _int8_inputs():
    rng = np.random.default_rng(0)
    return {
        "x": rng.integers(-128, 128, (4, 16), dtype=np.int8),
        "w": rng.integers(-128, 128, (16, 8), dtype=np.int8),
        "img": rng.integers(-128, 128, (1, 3, 8, 8), dtype=np.int8),
        "k": rng.integers(-128, 128, (4, 3, 3, 3), dtype=np.int8),
    }


def _vm_outputs(ex, inputs: list) -> list:
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return [o.numpy() for o in ([out] if hasattr(out, "numpy") else out)]


@pytest.fixture(scope="module")
def int8_case():
    mod = _int8_module()
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    inputs = _int8_inputs()
    return mod, ex, inputs, _vm_outputs(ex, list(inputs.values()))


def _assert_same(outputs, reference):
    assert len(outputs) == len(reference)
    for got, want in zip(outputs, reference):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def _require(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = " ".join(sorted({rn.APT_PACKAGES.get(t, t) for t in missing}))
        msg = f"{', '.join(missing)} not installed (apt-get install {pkgs}, or .ci/install_system.sh)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


# --------------------------------------------------------------------------------------------------- host


def test_host_runner_reproduces_relax_vm(int8_case, tmp_path):
    _require("cmake", "g++")
    mod, ex, inputs, ref = int8_case
    lib = rn.export_module(ex, "llvm", tmp_path / "int8.so")
    outputs, stats = rn.run_on_runner(lib, list(inputs.values()), arch="host", repeat=5, warmup=2)
    _assert_same(outputs, ref)
    assert ref[0].dtype == np.int32 and ref[3].dtype == np.int8
    # int32 accumulation really happened: the matmul exceeds the int16 range for these inputs
    assert np.abs(ref[0]).max() > 2**15
    assert stats.n == 5 and len(stats.times_ms) == 5 and not stats.emulated
    assert 0 < stats.min_ms <= stats.median_ms <= stats.max_ms

    # named inputs in another order bind by parameter name; an IRModule is compiled first
    lib2 = rn.export_module(mod, {"kind": "llvm"}, tmp_path / "int8_ir.so")
    shuffled = {k: inputs[k] for k in ("k", "img", "w", "x")}
    outputs, _ = rn.run_on_runner(lib2, shuffled, arch="host", repeat=1, threads=1)
    _assert_same(outputs, ref)


def test_runner_cli_json_values_and_dtypes(tmp_path):
    """The JSON report (values inline) and the .npy reader/writer on several dtypes."""
    _require("cmake", "g++")

    @tvm.script.ir_module
    class Mixed:
        @R.function
        def main(a: R.Tensor((3,), "uint8"), b: R.Tensor((2, 2), "int64"), c: R.Tensor((2, 3), "float32"),
                 d: R.Tensor((5,), "int32")):
            with R.dataflow():
                a1 = R.add(a, R.const(1, "uint8"))
                b1 = R.multiply(b, R.const(-3, "int64"))
                c1 = R.multiply(c, R.const(0.1, "float32"))
                d1 = R.subtract(d, R.const(7, "int32"))
                R.output(a1, b1, c1, d1)
            return (a1, b1, c1, d1)

    ex = tvm.compile(Mixed, target="llvm")
    lib = rn.export_module(ex, "llvm", tmp_path / "mixed.so")
    ins = [np.array([0, 200, 255], np.uint8), np.array([[1, -2], [2**40, 5]], np.int64),
           np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), np.arange(-2, 3, dtype=np.int32)]
    ref = _vm_outputs(ex, ins)
    outs, _ = rn.run_on_runner(lib, ins, repeat=1)
    _assert_same(outs, ref)

    # the CLI without --out prints the values; inputs from a directory of <index>_<name>.npy files
    indir = tmp_path / "in"
    indir.mkdir()
    for i, (name, a) in enumerate(zip("abcd", ins)):
        np.save(indir / f"{i}_{name}.npy", a)
    binary = rn.build_runner("host")
    cmd, env = rn._runner_command(binary, "host")
    proc = subprocess.run(cmd + [str(lib), "--inputs", str(indir), "--repeat", "3", "--warmup", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["num_inputs"] == 4 and report["latency_ms"]["n"] == 3
    for item, want in zip(report["outputs"], ref):
        assert item["dtype"] == str(want.dtype) and item["shape"] == list(want.shape)
        got = np.array(item["values"], dtype=want.dtype).reshape(want.shape)
        np.testing.assert_array_equal(got, want)  # float32 printed with 9 digits: exact


def test_runner_errors(int8_case, tmp_path):
    _require("cmake", "g++")
    _, ex, inputs, _ = int8_case
    lib = rn.export_module(ex, "llvm", tmp_path / "int8.so")
    with pytest.raises(DeviceError, match="expects 4 arguments"):
        rn.run_on_runner(lib, [inputs["x"]], repeat=1)
    with pytest.raises(DeviceError, match="'nope' is not a parameter of main"):
        rn.run_on_runner(lib, {"nope": inputs["x"]}, repeat=1)
    with pytest.raises(DeviceError, match="does not exist"):
        rn.run_on_runner(tmp_path / "missing.so", [], repeat=1)
    with pytest.raises(DeviceError, match="has no function 'other'"):
        rn.run_on_runner(lib, list(inputs.values()), repeat=1, func="other")
    with pytest.raises(HagoError, match="repeat"):
        rn.run_on_runner(lib, list(inputs.values()), repeat=0)
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"not a library")
    with pytest.raises(DeviceError, match="hago-runner failed on .*bad.so"):
        rn.run_on_runner(bad, list(inputs.values()), repeat=1)


def test_missing_tools_name_the_apt_package(monkeypatch):
    monkeypatch.setattr(rn.shutil, "which", lambda name: None)
    with pytest.raises(DeviceError, match="apt-get install qemu-user"):
        rn._require_tool("qemu-aarch64", "to run aarch64 code")
    with pytest.raises(DeviceError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        rn.export_module(tvm.IRModule(), RPI4_TARGET, "/nonexistent/x.so")
    with pytest.raises(DeviceError, match="apt-get install cmake"):
        rn.build_runner("host")


def test_target_arch():
    assert rn.target_arch(RPI4_TARGET) == "aarch64"
    assert rn.target_arch(json.dumps(RPI4_TARGET)) == "aarch64"
    assert rn.target_arch("llvm") == "host"
    with pytest.raises(CompileError, match="riscv64"):
        rn.target_arch({"kind": "llvm", "mtriple": "riscv64-linux-gnu"})
    with pytest.raises(HagoError, match="arch='mips'"):
        rn.normalize_arch("mips")


# ------------------------------------------------------------------------------------------ aarch64 (qemu)


def test_aarch64_cross_compiled_matches_x86(int8_case, tmp_path):
    """Cross-compile for the Raspberry Pi 4 (cortex-a72, NEON), run under qemu-aarch64: identical to x86."""
    _require("cmake", "aarch64-linux-gnu-g++", "qemu-aarch64")
    if not os.path.isdir(rn.QEMU_SYSROOT):
        pytest.skip(f"{rn.QEMU_SYSROOT} missing (apt-get install g++-aarch64-linux-gnu)")
    mod, _, inputs, ref = int8_case
    ex = tvm.compile(mod, target=tvm.target.Target(RPI4_TARGET))
    lib = rn.export_module(ex, RPI4_TARGET, tmp_path / "int8_rpi4.so")
    with open(lib, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    outputs, stats = rn.run_on_runner(lib, inputs, arch="aarch64", repeat=1, warmup=0)
    _assert_same(outputs, ref)
    assert stats.emulated  # the latency under qemu is not the device's; never reported
