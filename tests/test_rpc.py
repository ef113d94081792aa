"""hago.backend.rpc: upload, run and time compiled Relax code over TVM RPC (servers on 127.0.0.1).

A server started directly and one registered with a tracker (as a Raspberry Pi would be) must
return the outputs of the local relax.VirtualMachine and timing statistics from the VM's
time_evaluator. Unreachable addresses raise DeviceError naming host:port. Timings are only
checked for presence and consistency, never for speed.
"""
from __future__ import annotations

import concurrent.futures
import gc
import importlib.util

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

from hago.backend import rpc  # noqa: E402
from hago.errors import DeviceError, HagoError  # noqa: E402

HAS_TORNADO = importlib.util.find_spec("tornado") is not None


@tvm.script.ir_module
class Int8Mod:
    @R.function
    def main(x: R.Tensor((4, 16), "int8"), w: R.Tensor((16, 8), "int8"),
             img: R.Tensor((1, 3, 8, 8), "int8"), k: R.Tensor((4, 3, 3, 3), "int8")):
        with R.dataflow():
            y = R.matmul(x, w, out_dtype="int32")
            c = R.nn.conv2d(img, k, padding=(1, 1), out_dtype="int32")
            R.output(y, c)
        return (y, c)


@pytest.fixture(scope="module")
def case():
    ex = tvm.compile(Int8Mod, target="llvm")
    rng = np.random.default_rng(1)
    inputs = {
        "x": rng.integers(-128, 128, (4, 16), dtype=np.int8),
        "w": rng.integers(-128, 128, (16, 8), dtype=np.int8),
        "img": rng.integers(-128, 128, (1, 3, 8, 8), dtype=np.int8),
        "k": rng.integers(-128, 128, (4, 3, 3, 3), dtype=np.int8),
    }
    vm = relax.VirtualMachine(ex, tvm.cpu())
    ref = [o.numpy() for o in vm["main"](*[tvm.runtime.tensor(a) for a in inputs.values()])]
    return ex, inputs, ref


@pytest.fixture(scope="module")
def servers():
    """A plain server, and (with tornado) a tracker with a server registered under a key;
    the two servers start concurrently (each imports tvm in a subprocess)."""
    started = []
    tracker = rpc.start_local_tracker() if HAS_TORNADO else None
    if tracker:
        started.append(tracker)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            direct = pool.submit(rpc.start_local_server)
            behind = pool.submit(rpc.start_local_server, tracker=tracker, key="rasp4b-test") if tracker else None
            started.append(direct.result())
            if behind is not None:
                started.append(behind.result())
        yield {"direct": started[-2] if tracker else started[-1], "tracker": tracker,
               "behind": started[-1] if tracker else None}
    finally:
        for p in reversed(started):
            p.terminate()


def _check(result, ref, repeat):
    assert len(result.outputs) == len(ref)
    for got, want in zip(result.outputs, ref):
        assert got.dtype == want.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    lat = result.latency
    assert lat.n == repeat == len(lat.times_ms) and not lat.emulated
    assert 0 < lat.min_ms <= lat.median_ms <= lat.max_ms


def test_direct_server_upload_and_run(case, servers):
    ex, inputs, ref = case
    srv = servers["direct"]
    assert srv.host == "127.0.0.1"
    sess = rpc.connect(srv.host, srv.port)
    result = rpc.upload_and_run(ex, "llvm", sess, inputs, repeat=3, number=2)
    _check(result, ref, 3)
    with pytest.raises(HagoError, match=r"missing \['k'\]"):
        rpc.upload_and_run(ex, "llvm", sess, {k: v for k, v in inputs.items() if k != "k"})
    # a server holds one session at a time: close this one before connecting again
    del sess
    gc.collect()
    # list inputs in parameter order, through an address string
    result = rpc.upload_and_run(ex, "llvm", rpc.connect_address(srv.address), list(inputs.values()),
                                repeat=2, number=1)
    _check(result, ref, 2)


@pytest.mark.skipif(not HAS_TORNADO, reason="TVM's RPC tracker needs tornado (pip install tornado)")
def test_tracker_upload_and_run(case, servers):
    ex, inputs, ref = case
    srv = servers["behind"]
    assert srv.address == f"127.0.0.1:{servers['tracker'].port}:rasp4b-test"
    sess = rpc.connect_address(srv.address)  # HOST:PORT:KEY, as `hago search --target-rpc` takes it
    result = rpc.upload_and_run(Int8Mod, "llvm", sess, inputs, repeat=3, number=1)  # IRModule: compiled first
    _check(result, ref, 3)
    del sess
    gc.collect()
    # connect, upload, run, close in one call; the server is back in the tracker's queue by then
    _check(rpc.measure_rpc(ex, "llvm", srv.address, list(inputs.values()), repeat=2, number=1), ref, 2)
    with pytest.raises(DeviceError, match=r"has no server with key 'rasp5'.*registered keys: rasp4b-test"):
        rpc.connect("127.0.0.1", servers["tracker"].port, key="rasp5", via_tracker=True)


def test_unreachable_addresses_raise_device_error():
    port = rpc._free_port()  # nothing listens there
    with pytest.raises(DeviceError, match=f"cannot reach the TVM RPC server at 127.0.0.1:{port}"):
        rpc.connect("127.0.0.1", port, timeout=2)
    with pytest.raises(DeviceError, match=f"cannot reach the TVM RPC tracker at 127.0.0.1:{port}"):
        rpc.connect_address(f"127.0.0.1:{port}:rasp4b", timeout=2)


def test_parse_address():
    assert rpc.parse_address("10.0.0.5:9190:rasp4b") == ("10.0.0.5", 9190, "rasp4b")
    assert rpc.parse_address("rpc://pi.local:9090") == ("pi.local", 9090, None)
    for bad in ("pi.local", "pi:port:key", "pi:70000:k", ":9090:k", "a:1:b:c"):
        with pytest.raises(HagoError, match="RPC address"):
            rpc.parse_address(bad)


def test_hago_measure_over_rpc(servers, tmp_path):
    """hago.measure(art, rpc="HOST:PORT") uploads the artifact to the server and times it there."""
    import hago
    from hago.backend.compile import compile as hcompile

    art = hcompile(Int8Mod, "llvm", cache_dir=str(tmp_path), progress=False)
    srv = servers["direct"]
    st = hago.measure(art, None, repeat=3, rpc=srv.address)
    assert st.n == 3 and st.device.startswith("rpc:") and 0 < st.min_ms <= st.median_ms
    gc.collect()
