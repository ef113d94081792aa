"""The hago device runner: run TVM-exported Relax models natively, on the host or on aarch64.

The runner (``device/runner.cc``, built with the repository's ``CMakeLists.txt``) is a small C++
program linked against the TVM runtime and tvm-ffi libraries of the installed wheels. It loads a
library exported by :func:`export_module`, feeds ``.npy`` inputs to the Relax VM's ``main``,
writes the outputs as ``.npy`` files and prints JSON with latency statistics.

For aarch64 (Raspberry Pi 4, 64-bit OS) the same runner is cross-compiled with
``aarch64-linux-gnu-g++`` against the aarch64 wheels' libraries (downloaded from PyPI once by
:func:`aarch64_runtime_libs`), and run on x86 under ``qemu-aarch64``: this checks that the
cross-compiled integer code gives the same results. Latencies measured under emulation say
nothing about the device; measure on the board itself (the runner there, or TVM RPC:
:mod:`hago.backend.rpc`).

    lib = export_module(executable, target, "model.so")
    outputs, stats = run_on_runner(lib, {"x": x}, arch="aarch64", repeat=10)

Everything here depends only on ``hago.errors``, numpy and (lazily) tvm.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import CompileError, DeviceError, HagoError

__all__ = [
    "LatencyStats",
    "aarch64_runtime_libs",
    "build_runner",
    "export_module",
    "run_on_runner",
    "target_arch",
    "runner_source_dir",
]

TVM_DIST = "apache-tvm"
TVM_FFI_DIST = "apache-tvm-ffi"
AARCH64_PLATFORM = "manylinux_2_28_aarch64"
QEMU_SYSROOT = "/usr/aarch64-linux-gnu"
CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++"}
APT_PACKAGES = {
    "cmake": "cmake",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "qemu-aarch64": "qemu-user",
    "g++": "g++",
    "c++": "g++",
    "make": "make",
}
_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")


@dataclasses.dataclass
class LatencyStats:
    """Latency of repeated runs, in milliseconds."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    n: int
    times_ms: list = dataclasses.field(default_factory=list)
    emulated: bool = False  # measured under qemu: not the device's latency

    @classmethod
    def from_times(cls, times_ms, emulated: bool = False) -> LatencyStats:
        t = [float(v) for v in times_ms]
        if not t:
            raise ValueError("no timings")
        return cls(float(np.median(t)), float(np.mean(t)), min(t), max(t), len(t), t, emulated)


# ----------------------------------------------------------------------------- tools and paths
def cache_root() -> Path:
    """``$HAGO_CACHE_DIR`` or ``~/.cache/hago``."""
    return Path(os.environ.get("HAGO_CACHE_DIR") or Path.home() / ".cache" / "hago")


def _require_tool(name: str, purpose: str) -> str:
    path = shutil.which(name)
    if path is None:
        pkg = APT_PACKAGES.get(name, name)
        raise DeviceError(f"'{name}' not found on PATH; it is needed {purpose}. "
                          f"Install it with: apt-get install {pkg}  (or run .ci/install_system.sh)")
    return path


def _versions() -> tuple[str, str]:
    from importlib import metadata

    try:
        return metadata.version(TVM_DIST), metadata.version(TVM_FFI_DIST)
    except metadata.PackageNotFoundError as err:
        raise DeviceError(f"the Python package {err.args[0]} is not installed (pip install {TVM_DIST} "
                          f"{TVM_FFI_DIST})") from None


def _package_dir(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DeviceError(f"the Python package '{module}' is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def runner_source_dir() -> Path:
    """The directory holding ``CMakeLists.txt`` and ``device/runner.cc`` (``$HAGO_SOURCE_DIR``
    or the source checkout hago is imported from)."""
    env = os.environ.get("HAGO_SOURCE_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[2]
    if not (root / "device" / "runner.cc").is_file() or not (root / "CMakeLists.txt").is_file():
        raise DeviceError(f"the device runner sources (CMakeLists.txt, device/runner.cc) are not in {root}; "
                          "use a source checkout of hago or set HAGO_SOURCE_DIR")
    return root


def normalize_arch(arch: str) -> str:
    a = (arch or "host").lower()
    if a in ("host", "native", "local"):
        return "host"
    if a in ("aarch64", "arm64", "armv8", "rasp4b", "raspberry_pi_4"):
        return "aarch64"
    raise HagoError(f"arch={arch!r}: use 'host' or 'aarch64'")


def _host_is_aarch64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


# ----------------------------------------------------------------------------- aarch64 libraries
def aarch64_runtime_libs(cache_dir: str | os.PathLike | None = None) -> Path:
    """A directory holding the aarch64 ``libtvm_runtime.so`` and ``libtvm_ffi.so`` of the installed
    apache-tvm / apache-tvm-ffi versions, downloaded from PyPI (``pip download``) and unpacked
    once; later calls return the cached directory."""
    tvm_ver, ffi_ver = _versions()
    root = Path(cache_dir) if cache_dir else cache_root() / "aarch64"
    libdir = root / f"tvm-{tvm_ver}-ffi-{ffi_ver}" / "lib"
    if all((libdir / n).is_file() for n in _LIBS):
        return libdir
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".lock"):
        if all((libdir / n).is_file() for n in _LIBS):
            return libdir
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--platform", AARCH64_PLATFORM, "--python-version", f"{sys.version_info[0]}.{sys.version_info[1]}",
                   "--disable-pip-version-check", "-q", "-d", tmp,
                   f"{TVM_DIST}=={tvm_ver}", f"{TVM_FFI_DIST}=={ffi_ver}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise DeviceError(f"cannot download the aarch64 wheels of {TVM_DIST}=={tvm_ver} and "
                                  f"{TVM_FFI_DIST}=={ffi_ver} (needs PyPI): {proc.stderr.strip()[-800:]}")
            staging = Path(tmp) / "lib"
            staging.mkdir()
            wanted = {"tvm/lib/libtvm_runtime.so": "libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so": "libtvm_ffi.so"}
            for wheel in Path(tmp).glob("*.whl"):
                with zipfile.ZipFile(wheel) as zf:
                    for member, name in wanted.items():
                        if member in zf.namelist():
                            with zf.open(member) as src, open(staging / name, "wb") as dst:
                                shutil.copyfileobj(src, dst)
            missing = [n for n in _LIBS if not (staging / n).is_file()]
            if missing:
                raise DeviceError(f"the downloaded aarch64 wheels lack {', '.join(missing)}")
            libdir.parent.mkdir(parents=True, exist_ok=True)
            if libdir.exists():
                shutil.rmtree(libdir)
            staging.rename(libdir)
    return libdir


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- building the runner
def build_runner(arch: str = "host", build_dir: str | os.PathLike | None = None) -> Path:
    """Configure and build ``hago-runner`` with cmake for ``arch`` ('host' or 'aarch64');
    returns the binary. Cached: rebuilt only when the sources, the toolchain or the TVM
    versions change."""
    arch = normalize_arch(arch)
    if arch == "aarch64" and _host_is_aarch64():
        arch = "host"
    src = runner_source_dir()
    cmake = _require_tool("cmake", "to build the hago device runner")
    tvm_ver, ffi_ver = _versions()
    cmake_args = [f"-DHAGO_PYTHON={sys.executable}", f"-DTVM_FFI_ROOT={_package_dir('tvm_ffi')}"]
    if arch == "host":
        if shutil.which("c++") is None and shutil.which("g++") is None:
            _require_tool("g++", "to build the hago device runner")
        cmake_args.append(f"-DTVM_LIB_DIR={_package_dir('tvm') / 'lib'}")
    else:
        _require_tool(CROSS_CXX["aarch64"], "to cross-compile the hago device runner for aarch64")
        cmake_args += [f"-DCMAKE_TOOLCHAIN_FILE={src / 'device' / 'cmake' / 'aarch64-linux-gnu.cmake'}",
                       f"-DHAGO_AARCH64_LIBS={aarch64_runtime_libs()}"]

    h = hashlib.sha256()
    for f in ("CMakeLists.txt", "device/runner.cc", "device/cmake/aarch64-linux-gnu.cmake"):
        h.update((src / f).read_bytes())
    h.update(f"{arch}|{tvm_ver}|{ffi_ver}|{'|'.join(cmake_args)}".encode())
    stamp = h.hexdigest()[:16]
    out = Path(build_dir) if build_dir else cache_root() / "runner" / f"{arch}-{stamp}"
    binary = out / "hago-runner"
    stamp_file = out / "hago-runner.stamp"
    if binary.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return binary
    out.mkdir(parents=True, exist_ok=True)
    with _file_lock(out / ".lock"):
        if binary.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
            return binary
        steps = [[cmake, "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", *cmake_args],
                 [cmake, "--build", str(out), "-j", str(min(4, os.cpu_count() or 1))]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                log = (proc.stdout + proc.stderr).strip()[-3000:]
                raise DeviceError(f"building the hago device runner for {arch} failed ({' '.join(cmd[:3])} ...):\n{log}")
        if not binary.is_file():
            raise DeviceError(f"the build in {out} produced no hago-runner")
        stamp_file.write_text(stamp)
    return binary


# ----------------------------------------------------------------------------- exporting models
def _target(target):
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) and target.lstrip().startswith("{"):
        target = json.loads(target)
    return tvm.target.Target(target)


def target_arch(target) -> str:
    """'aarch64' when the target's code runs on aarch64 (its ``mtriple``), otherwise 'host'
    (x86 code for this machine, or a GPU target whose host code runs here)."""
    tgt = _target(target)
    for t in (tgt, getattr(tgt, "host", None)):
        if t is None:
            continue
        triple = str(t.attrs.get("mtriple", "") or "")
        if triple.split("-")[0] in ("aarch64", "arm64"):
            return "host" if _host_is_aarch64() else "aarch64"
        if t.kind.name in ("llvm", "c") and triple:
            machine = triple.split("-")[0]
            host_machine = platform.machine().lower()
            if machine not in (host_machine, "x86_64" if host_machine == "amd64" else host_machine):
                raise CompileError(f"target triple {triple!r} is neither this machine ({host_machine}) nor aarch64: "
                                   "hago cannot export or run it")
    return "host"


def export_module(executable_or_irmodule, target, path: str | os.PathLike) -> Path:
    """Export a Relax executable (``tvm.compile``'s result), or compile and export an IRModule,
    as a shared library at ``path``: with the aarch64 cross compiler for aarch64 targets,
    TVM's default compiler otherwise."""
    import tvm

    tgt = _target(target)
    cxx = None
    if target_arch(tgt) == "aarch64":
        cxx = _require_tool(CROSS_CXX["aarch64"], f"to link code for the aarch64 target {tgt}")
    ex = executable_or_irmodule
    if isinstance(ex, tvm.IRModule):
        try:
            ex = tvm.compile(ex, target=tgt)
        except Exception as err:  # TVM raises many types
            raise CompileError(f"compiling for {tgt} failed: {err}") from err
    if not hasattr(ex, "export_library"):
        raise CompileError(f"cannot export {type(ex).__name__}: expected tvm.compile's result or an IRModule")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if cxx is not None:
        from tvm.support import cc

        kwargs["fcompile"] = cc.cross_compiler(cxx)  # a fresh one each time: it accumulates options
    try:
        ex.export_library(str(path), **kwargs)
    except Exception as err:
        raise CompileError(f"exporting the library {path} for {tgt} failed: {err}") from err
    return path


# ----------------------------------------------------------------------------- running
def _runner_command(binary: Path, arch: str) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if arch == "aarch64" and not _host_is_aarch64():
        qemu = _require_tool("qemu-aarch64", "to run aarch64 code on this machine")
        if not Path(QEMU_SYSROOT).is_dir():
            raise DeviceError(f"{QEMU_SYSROOT} (the aarch64 C/C++ libraries) is missing; "
                              "install it with: apt-get install g++-aarch64-linux-gnu")
        libs = aarch64_runtime_libs()
        # -E sets the variable for the emulated program only, not for qemu itself.
        return [qemu, "-L", QEMU_SYSROOT, "-E", f"LD_LIBRARY_PATH={libs}", str(binary)], env
    if arch == "host":
        libdirs = [str(_package_dir("tvm") / "lib"), str(_package_dir("tvm_ffi") / "lib")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    return [str(binary)], env


def run_on_runner(lib_path: str | os.PathLike, inputs, arch: str = "host", repeat: int = 10, warmup: int = 1,
                  threads: int | None = None, func: str = "main", runner: str | os.PathLike | None = None,
                  timeout: float | None = 600) -> tuple[list[np.ndarray], LatencyStats]:
    """Run an exported library with the native hago runner; returns (outputs, latency).

    ``inputs``: a dict {parameter name: array} (bound by name) or a list of arrays (in the
    function's parameter order). ``arch='aarch64'`` on x86 runs under qemu-aarch64: outputs are
    exact, the latency is marked ``emulated`` and means nothing for the device.
    """
    arch = normalize_arch(arch)
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise DeviceError(f"model library {lib_path} does not exist")
    if repeat < 1 or warmup < 0:
        raise HagoError(f"repeat={repeat}, warmup={warmup}: need repeat >= 1 and warmup >= 0")
    binary = Path(runner) if runner else build_runner(arch)
    prefix, env = _runner_command(binary, arch)
    emulated = len(prefix) > 1
    with tempfile.TemporaryDirectory(prefix="hago-runner-") as tmp:
        args = []
        items = inputs.items() if isinstance(inputs, Mapping) else enumerate(inputs if inputs is not None else [])
        for i, (key, value) in enumerate(items):
            arr = np.ascontiguousarray(value)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            f = Path(tmp) / f"{i}.npy"
            np.save(f, arr, allow_pickle=False)
            if isinstance(inputs, Mapping):
                if "=" in str(key):
                    raise HagoError(f"input name {key!r} contains '='")
                args += ["--input", f"{key}={f}"]
            else:
                args += ["--input", str(f)]
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        cmd = prefix + [str(lib_path.resolve()), *args, "--out", str(out_dir), "--repeat", str(repeat),
                        "--warmup", str(warmup), "--func", func]
        if threads:
            cmd += ["--threads", str(int(threads))]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"hago-runner on {lib_path} ({arch}) did not finish within {timeout} s") from None
        if proc.returncode != 0:
            raise DeviceError(f"hago-runner failed on {lib_path} ({arch}, exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-2000:]}")
        try:
            report = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            raise DeviceError(f"hago-runner printed no JSON report: {proc.stdout[-500:]!r} {proc.stderr[-500:]!r}") from None
        outputs = [np.load(o["file"]) for o in report["outputs"]]
    lat = report["latency_ms"]
    stats = LatencyStats(float(lat["median"]), float(lat["mean"]), float(lat["min"]), float(lat["max"]),
                         int(lat["n"]), [float(t) for t in lat.get("times", [])], emulated)
    return outputs, stats
