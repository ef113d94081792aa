"""TVM targets from hago hardware specs (or TVM target JSON), and what this machine can run.

Accepted: a dict (TVM target JSON, e.g. ``{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "core-avx2",
"mattr": ["+avx2", "+fma"]}``, ``{"kind": "cuda", "arch": "sm_80"}``, ``{"kind": "llvm", "mtriple":
"aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}``), a ``tvm.target.Target``, a target string
(``"llvm"``), or an object with a ``.target`` dict (hago's ``HardwareSpec``).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform

from ..errors import CompileError

__all__ = ["make_target", "target_dict", "target_key", "is_gpu", "is_cross", "can_run_locally", "spec_hash_of"]


def _spec_target(obj):
    t = getattr(obj, "target", None)
    if isinstance(t, dict):
        return t
    return None


def spec_hash_of(obj) -> str | None:
    h = getattr(obj, "hash", None)
    return h if isinstance(h, str) else None


def make_target(spec_or_target, *, threads: int | None = None):
    """A ``tvm.target.Target``. CUDA targets get an llvm host; CPU targets get ``num-cores`` (``threads``, or
    this machine's core count for a host target) so MetaSchedule sizes its parallel loops."""
    import tvm

    src = spec_or_target
    where = "target"
    if isinstance(src, tvm.target.Target):
        return src
    spec_t = _spec_target(src)
    if spec_t is not None:
        where = f"spec {getattr(src, 'path', None) or getattr(src, 'name', '?')} at target"
        src = spec_t
    if isinstance(src, str):
        src = {"kind": src} if src.isidentifier() else src
    if isinstance(src, dict):
        cfg = dict(src)
        kind = cfg.get("kind")
        if not isinstance(kind, str):
            raise CompileError(f"{where}: missing or invalid 'kind' in {json.dumps(src)}")
        if kind == "llvm" and "num-cores" not in cfg:
            if threads:
                cfg["num-cores"] = int(threads)
            elif not _is_cross_cfg(cfg):
                cfg["num-cores"] = max(1, os.cpu_count() or 1)
        try:
            if kind in ("cuda", "rocm", "vulkan", "metal", "opencl"):
                host = cfg.pop("host", None) or {"kind": "llvm"}
                return tvm.target.Target(cfg, host=host)
            return tvm.target.Target(cfg)
        except Exception as e:  # noqa: BLE001 - TVM raises ValueError/TVMError/...
            raise CompileError(f"{where}: TVM rejects target {json.dumps(src)}: {e}") from e
    if isinstance(src, str):
        try:
            return tvm.target.Target(src)
        except Exception as e:  # noqa: BLE001
            raise CompileError(f"{where}: TVM rejects target {src!r}: {e}") from e
    raise CompileError(
        f"{where}: expected a TVM target dict, a tvm.target.Target or a HardwareSpec, got {type(spec_or_target).__name__}"
    )


def target_dict(target) -> dict:
    """JSON-able dict of a Target (for manifests and hashes)."""
    cfg = target.export() if hasattr(target, "export") else {"str": str(target)}

    def conv(v):
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, (int, float)):
            return v
        if isinstance(v, str):
            return str(v)
        if hasattr(v, "items"):
            return {str(k): conv(x) for k, x in v.items()}
        if hasattr(v, "__iter__"):
            return [conv(x) for x in v]
        return str(v)

    return conv(dict(cfg))


def target_key(target, extra: str = "") -> str:
    """Stable short hash of a target (and e.g. the design-space variant): the tuning cache's directory name."""
    d = target_dict(target)
    # num-cores stays in the key: it changes MetaSchedule's parallel schedules
    blob = json.dumps(d, sort_keys=True) + "|" + extra
    kind = d.get("kind", "t")
    return f"{kind}-{hashlib.sha1(blob.encode()).hexdigest()[:16]}"


def is_gpu(target) -> bool:
    return "gpu" in [str(k) for k in target.keys]


def _is_cross_cfg(cfg: dict) -> bool:
    triple = str(cfg.get("mtriple", "") or "")
    if not triple:
        return False
    return not _triple_matches_host(triple)


def _triple_matches_host(triple: str) -> bool:
    arch = triple.split("-")[0]
    host = platform.machine().lower()
    aliases = {"x86_64": {"x86_64", "amd64"}, "aarch64": {"aarch64", "arm64"}, "arm64": {"aarch64", "arm64"}}
    return host in aliases.get(arch, {arch})


def is_cross(target) -> bool:
    """True when code for ``target`` cannot run on this machine's CPU architecture."""
    if is_gpu(target):
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    return bool(triple) and not _triple_matches_host(triple)


def can_run_locally(target) -> tuple[bool, str]:
    """Whether this machine can execute code compiled for ``target``, and why not."""
    import tvm

    if is_gpu(target):
        kind = target.kind.name
        try:
            exists = bool(tvm.device(kind, 0).exist)
        except Exception:  # noqa: BLE001 - "Device API cuda is not enabled" in CPU-only runtimes
            return False, f"this TVM runtime has no {kind} device API"
        if not exists:
            return False, f"no {kind} device on this machine"
        return True, ""
    if target.kind.name not in ("llvm", "c"):
        return False, f"target kind {target.kind.name} does not run on the host"
    if is_cross(target):
        return False, f"target triple {target.attrs.get('mtriple')} is not this machine ({platform.machine()})"
    from ..hwspec.spec import cpu_flags

    flags = cpu_flags()
    need = [str(a)[1:] for a in (target.attrs.get("mattr") or []) if str(a).startswith("+")]
    names = {"avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni"}
    missing = [f for f in need if flags and names.get(f, f).replace(".", "_") not in flags]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)} required by the target"
    return True, ""
