"""Measurement over TVM RPC: run compiled Relax code on a remote board (e.g. a Raspberry Pi 4).

On the board: ``python -m tvm.exec.rpc_server --tracker TRACKER_HOST:9190 --key rasp4b``
(see tutorials/raspberry_pi.md). On the host:

    sess = connect("tracker-host", 9190, key="rasp4b", via_tracker=True)   # or connect_address("host:9190:rasp4b")
    result = upload_and_run(executable, target, sess, {"x": x}, repeat=10, number=5)
    result.outputs, result.latency.median_ms

Addresses are written ``HOST:PORT:KEY`` (through a tracker, as ``hago search --target-rpc``
takes them) or ``HOST:PORT`` (straight to a server). The TVM RPC server runs whatever code it
is sent: only use it in a trusted network. :func:`start_local_server` and
:func:`start_local_tracker` listen on 127.0.0.1 only (for tests and local checks).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import DeviceError, HagoError
from .runner import LatencyStats, export_module

__all__ = [
    "LocalRpcProcess",
    "RpcResult",
    "connect",
    "connect_address",
    "measure_rpc",
    "parse_address",
    "start_local_server",
    "start_local_tracker",
    "upload_and_run",
]

LOOPBACK = "127.0.0.1"
DEFAULT_KEY = "hago-local"


@dataclasses.dataclass
class RpcResult:
    outputs: list  # numpy arrays, the function's outputs (tuples flattened)
    latency: LatencyStats  # per repeat: the mean of `number` runs, in ms (TVM's time_evaluator)


# ----------------------------------------------------------------------------- local server / tracker
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tracker_addr(tracker):
    if tracker is None:
        return None
    if hasattr(tracker, "host") and hasattr(tracker, "port"):
        return (tracker.host, int(tracker.port))
    if isinstance(tracker, str):
        host, _, port = tracker.rpartition(":")
        return (host, int(port))
    host, port = tracker
    return (host, int(port))


def _descendants(pid: int) -> list[int]:
    """Process ids below pid (Linux /proc), parents before children."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            parent_of[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], {pid}
    while frontier:
        kids = {c for c, ppid in parent_of.items() if ppid in frontier}
        found += sorted(kids)
        frontier = kids
    return found


class LocalRpcProcess:
    """A TVM RPC server or tracker this process started on 127.0.0.1 (a subprocess or a thread).
    ``terminate()`` (also called at exit) stops it and every process it forked."""

    def __init__(self, kind: str, host: str, port: int, key: str | None = None, handle=None, stop=None):
        self.kind, self.host, self.port, self.key = kind, host, port, key
        self._handle, self._stop = handle, stop
        atexit.register(self.terminate)

    @property
    def address(self) -> str:
        """``HOST:PORT:KEY`` for a server behind a tracker, else ``HOST:PORT``."""
        return f"{self.host}:{self.port}" + (f":{self.key}" if self.kind == "tracker-server" else "")

    def terminate(self) -> None:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            stop()
        worker = getattr(self._handle, "proc", None)  # tvm.rpc.Server -> PopenWorker
        proc = getattr(worker, "_proc", None)
        if proc is not None:
            import signal

            # TVM's own kill() needs psutil to find the forked session processes; do it by hand.
            for pid in reversed(_descendants(proc.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.kill()
            try:
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - best effort
                pass
            for pipe in ("_writer", "_reader"):
                try:
                    getattr(worker, pipe).close()
                except Exception:  # noqa: BLE001
                    pass
            worker._proc = None
            self._handle.proc = None
        atexit.unregister(self.terminate)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.terminate()

    def __repr__(self):
        return f"LocalRpcProcess({self.kind} at {self.address})"


def start_local_tracker(port: int | None = None) -> LocalRpcProcess:
    """Start a TVM RPC tracker on 127.0.0.1 (``port`` or a free one) in a daemon thread of this
    process (TVM's tracker needs the ``tornado`` package); returns it (``.host``, ``.port``,
    ``.terminate()``)."""
    import struct
    import threading

    try:
        from tvm.rpc import base
        from tvm.rpc import tracker as tvm_tracker
    except ImportError as err:
        raise DeviceError(f"the TVM RPC tracker needs the tornado package (pip install tornado): {err}") from None

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port or 0))
    except OSError as err:
        sock.close()
        raise DeviceError(f"cannot listen on {LOOPBACK}:{port}: {err.strerror or err}") from None
    sock.listen(8)
    bound = sock.getsockname()[1]
    stop_key = base.random_key("tracker")
    thread = threading.Thread(target=tvm_tracker._tracker_server, args=(sock, stop_key), daemon=True,
                              name=f"hago-rpc-tracker-{bound}")
    thread.start()

    def stop():
        try:
            with socket.create_connection((LOOPBACK, bound), timeout=5) as c:
                c.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                base.recvall(c, 4)
                base.sendjson(c, [base.TrackerCode.STOP, stop_key])
                base.recvjson(c)
        except OSError:
            pass
        thread.join(timeout=5)

    return LocalRpcProcess("tracker", LOOPBACK, bound, handle=thread, stop=stop)


def start_local_server(port: int | None = None, tracker=None, key: str | None = None,
                       wait: float = 60.0) -> LocalRpcProcess:
    """Start a TVM RPC server (``tvm.rpc.Server``, a Python subprocess) on 127.0.0.1; returns it
    (``.host``, ``.port``, ``.key``, ``.address``, ``.terminate()``).

    With ``tracker`` (a tracker, ``(host, port)`` or ``"host:port"``) the server registers there
    under ``key`` (default "hago-local"), this waits up to ``wait`` s until the tracker lists it,
    and ``.host``/``.port`` are the tracker's (``.server_port`` is the server's own). Without a
    tracker, clients must pass the same ``key`` (default: none)."""
    from tvm import rpc

    start = port or _free_port()
    taddr = _tracker_addr(tracker)
    key = key if key is not None else (DEFAULT_KEY if taddr else "")
    server = rpc.Server(host=LOOPBACK, port=start, port_end=start + (1 if port else 50), key=key,
                        tracker_addr=taddr, silent=True)
    handle = LocalRpcProcess("tracker-server" if taddr else "server", LOOPBACK, server.port, key, handle=server)
    handle.server_port = server.port
    if taddr is not None:
        handle.host, handle.port = taddr
        deadline = time.time() + wait
        while key not in _tracker_keys(taddr):
            if time.time() > deadline:
                handle.terminate()
                raise DeviceError(f"the RPC server (key {key!r}) did not register with the tracker at "
                                  f"{taddr[0]}:{taddr[1]} within {wait} s")
            time.sleep(0.1)
    return handle


def _tracker_keys(addr, timeout: float = 10.0) -> dict:
    """{key: number of servers} registered with the tracker at addr."""
    from tvm.rpc import base

    sock = _probe(addr[0], addr[1], timeout, "tracker")
    try:
        sock.settimeout(timeout)
        import struct

        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        if magic != base.RPC_TRACKER_MAGIC:
            raise DeviceError(f"{addr[0]}:{addr[1]} is not a TVM RPC tracker")
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    except OSError as err:
        raise DeviceError(f"the TVM RPC tracker at {addr[0]}:{addr[1]} did not answer: {err}") from None
    finally:
        sock.close()
    if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
        raise DeviceError(f"the TVM RPC tracker at {addr[0]}:{addr[1]} gave an invalid summary: {value!r}")
    keys: dict = {}
    for item in value[1].get("server_info", []):
        k = str(item.get("key", "")).split(":", 1)[-1]
        keys[k] = keys.get(k, 0) + 1
    return keys


# ----------------------------------------------------------------------------- connecting
def _probe(host: str, port: int, timeout: float, what: str) -> socket.socket:
    try:
        return socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as err:  # refused, unreachable, timed out, unknown host
        reason = "timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise DeviceError(f"cannot reach the TVM RPC {what} at {host}:{port}: {reason}") from None


def parse_address(address: str) -> tuple[str, int, str | None]:
    """``"HOST:PORT:KEY"`` or ``"HOST:PORT"`` (optionally prefixed ``rpc://``) -> (host, port, key)."""
    text = address[len("rpc://"):] if address.startswith("rpc://") else address
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise HagoError(f"RPC address {address!r}: expected HOST:PORT:KEY (tracker) or HOST:PORT (server)")
    try:
        port = int(parts[1])
    except ValueError:
        raise HagoError(f"RPC address {address!r}: port {parts[1]!r} is not a number") from None
    if not 0 < port < 65536:
        raise HagoError(f"RPC address {address!r}: port {port} out of range")
    key = parts[2] if len(parts) == 3 and parts[2] else None
    return parts[0], port, key


def connect(host: str, port: int, key: str | None = None, via_tracker: bool = False, timeout: float = 10.0,
            session_timeout: float = 0):
    """Open a TVM RPC session: straight to a server at host:port, or (``via_tracker``) by asking
    the tracker at host:port for a server registered under ``key``. Raises DeviceError naming
    the address when it cannot be reached within ``timeout`` seconds, or when the tracker has no
    server with that key."""
    from tvm import rpc

    if via_tracker:
        if not key:
            raise HagoError(f"connecting through the tracker at {host}:{port} needs a device key")
        keys = _tracker_keys((host, port), timeout)
        if key not in keys:
            known = ", ".join(sorted(keys)) or "none"
            raise DeviceError(f"the TVM RPC tracker at {host}:{port} has no server with key {key!r} "
                              f"(registered keys: {known})")
        try:
            tracker = rpc.connect_tracker(host, int(port))
            if tracker._sock is not None:
                tracker._sock.settimeout(timeout)  # a request waits for a free server
            return tracker.request(key, session_timeout=session_timeout, max_retry=2)
        except (OSError, RuntimeError) as err:
            raise DeviceError(f"the TVM RPC tracker at {host}:{port} gave no server for key {key!r}: {err}") from None
    _probe(host, port, timeout, "server").close()
    try:
        return rpc.connect(host, int(port), key or "", session_timeout=session_timeout)
    except Exception as err:  # TVM raises its own error types
        raise DeviceError(f"cannot open a TVM RPC session with the server at {host}:{port}: {err}") from None


def connect_address(address: str, timeout: float = 10.0, session_timeout: float = 0):
    """Connect from an address string: ``HOST:PORT:KEY`` through a tracker, ``HOST:PORT`` to a server."""
    host, port, key = parse_address(address)
    return connect(host, port, key=key, via_tracker=key is not None, timeout=timeout,
                   session_timeout=session_timeout)


# ----------------------------------------------------------------------------- upload and run
def _flatten(value, out: list) -> list:
    if isinstance(value, list | tuple) or type(value).__name__ == "Array":
        for v in value:
            _flatten(v, out)
    else:
        out.append(value.numpy())
    return out


def upload_and_run(executable, target, session, inputs, repeat: int = 10, number: int = 5, func: str = "main",
                   min_repeat_ms: int = 0, library: str | os.PathLike | None = None) -> RpcResult:
    """Export ``executable`` (tvm.compile's result, or an IRModule) for ``target``, upload it
    through ``session``, run ``func`` once for its outputs, then time it with the Relax VM's
    ``time_evaluator`` (``repeat`` measurements, each the mean of ``number`` runs, after one
    discarded warm-up run). ``inputs``: {parameter name: array} or a list in parameter order.
    ``library``: an already exported library to upload instead of exporting."""
    import tvm
    from tvm import relax

    if repeat < 1 or number < 1:
        raise HagoError(f"repeat={repeat}, number={number}: both must be >= 1")
    remote_name = f"hago_{uuid.uuid4().hex[:12]}.so"
    with tempfile.TemporaryDirectory(prefix="hago-rpc-") as tmp:
        lib_path = Path(library) if library else export_module(executable, target, Path(tmp) / remote_name)
        try:
            session.upload(str(lib_path), target=remote_name)
            rlib = session.load_module(remote_name)
        except Exception as err:
            raise DeviceError(f"uploading or loading {lib_path.name} on the RPC device failed: {err}") from None
    dev = session.cpu(0)
    try:
        vm = relax.VirtualMachine(rlib, dev)
        arity = vm._get_function_arity(func)
        params = [vm._get_function_param_name(func, i) for i in range(arity)]
    except Exception as err:
        raise DeviceError(f"creating the Relax VM on the RPC device failed: {err}") from None
    if isinstance(inputs, Mapping):
        missing = [p for p in params if p not in inputs]
        extra = [k for k in inputs if k not in params]
        if missing or extra:
            raise HagoError(f"inputs do not match the parameters of {func} ({', '.join(params)}): "
                            f"missing {missing}, unknown {extra}")
        arrays = [inputs[p] for p in params]
    else:
        arrays = list(inputs)
        if len(arrays) != arity:
            raise HagoError(f"{func} takes {arity} inputs ({', '.join(params)}), got {len(arrays)}")
    try:
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), device=dev) for a in arrays]
        vm.set_input(func, *args)
        vm.invoke_stateful(func)
        outputs = _flatten(vm.get_outputs(func), [])
        timer = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        res = timer(func)
    except Exception as err:
        raise DeviceError(f"running {func} on the RPC device failed: {err}") from None
    finally:
        try:
            session.remove(remote_name)
        except Exception:  # the file may already be gone with the session's temp dir
            pass
    times_ms = [float(t) * 1e3 for t in res.results]
    return RpcResult(outputs, LatencyStats.from_times(times_ms))


def measure_rpc(executable, target, address: str, inputs, repeat: int = 10, number: int = 5,
                timeout: float = 10.0, func: str = "main") -> RpcResult:
    """Connect to ``address`` (``HOST:PORT:KEY`` through a tracker, ``HOST:PORT`` to a server),
    upload, run and time ``executable`` there (:func:`upload_and_run`), then close the session.
    This is what ``hago search --target-rpc HOST:PORT:KEY`` measures through."""
    session = connect_address(address, timeout=timeout)
    try:
        return upload_and_run(executable, target, session, inputs, repeat=repeat, number=number, func=func)
    finally:
        del session  # a server serves one session at a time: release it now
