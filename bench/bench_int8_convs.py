"""Single int8 convs (conv + Relu) of the benchmark networks: hago's conv kernel vs onnxruntime's QDQ model, 1 thread.

    python bench/bench_int8_convs.py [--spec host] [--repeat 50] [--epilogues]

For each shape: onnxruntime FP32 and INT8 (``quantize_static`` QDQ, per-channel) of the one-conv model, timed
whole (its Q/DQ of the input and output included); hago's ``hago.quantize`` + ``hago.compile`` of the same model
for ``--spec`` with the conv kernel's own time from the Relax VM profiler (the layout transposes and the input
quantize at the model's border are separate kernels and left out: inside a network they do not exist) and the
whole artifact. ``--epilogues`` adds, for the same shapes, the conv kernel with three requantize epilogues on a
bare Relax module (``hago.compile`` with a VNNI target): a plain ``>> 8`` shift, the exact int64 fixed-point
rule (realize's ``fixed_point``) and the fp32 rule (realize's ``float``, which the shipped x86 specs use: times the
scale, TVM ``round``, max/min bounds), to show what the epilogue costs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hago  # noqa: E402
from common import machine  # noqa: E402

# (input channels, height = width, output channels, kernel, from)
SHAPES = [
    (256, 14, 256, 3, "resnet50 3x3"),
    (512, 7, 512, 3, "resnet50 3x3 at 7x7"),
    (64, 56, 256, 1, "resnet50 1x1 expand"),
    (512, 13, 1000, 1, "squeezenet classifier"),
    (16, 55, 64, 1, "squeezenet fire expand 1x1"),
]


def one_conv(c: int, hw: int, oc: int, k: int, seed: int = 0):
    from onnx import TensorProto, helper, numpy_helper

    rs = np.random.RandomState(seed)
    w = (rs.randn(oc, c, k, k) * np.sqrt(2.0 / (k * k * c))).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4), helper.make_node("Relu", ["y"], ["z"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": rs.rand(1, c, hw, hw).astype(np.float32)} for _ in range(4)]
    return m, calib


def epilogue_module(w: np.ndarray, shape, epi: str):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "uint8"))
    oc = w.shape[0]
    pad = w.shape[2] // 2
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=pad, out_dtype="int32"))
            if epi == "shift":
                z = relax.op.clip(relax.op.right_shift(y, relax.const(8, "int32")), 0, 255)
            elif epi == "fixed64":
                m = relax.const(np.full((1, oc, 1, 1), 1234567, np.int64), "int64")
                sh = relax.const(np.full((1, oc, 1, 1), 31, np.int64), "int64")
                t = relax.op.multiply(relax.op.astype(y, "int64"), m)
                t = relax.op.right_shift(relax.op.add(t, relax.const(1 << 30, "int64")), sh)
                z = relax.op.clip(relax.op.add(t, relax.const(3, "int64")), 0, 255)
            else:
                t = relax.op.multiply(relax.op.astype(y, "float32"), relax.const(np.full((1, oc, 1, 1), 1e-3, "float32")))
                t = relax.op.add(relax.op.round(t), relax.const(3.0, "float32"))
                z = relax.op.minimum(relax.op.maximum(t, relax.const(0.0, "float32")), relax.const(255.0, "float32"))
            o = bb.emit_output(bb.emit(relax.op.astype(z, "uint8")))
        bb.emit_func_output(o)
    return bb.get()


def conv_kernel_ms(art, feeds) -> float:
    from hago.backend.measure import profile

    rows = profile(art, feeds, runs=20, threads=1)
    return min(r["ms"] for r in rows if "conv" in r["kernel"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="host")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--epilogues", action="store_true")
    a = ap.parse_args(argv)
    from bench_search import ort_int8

    from hago.backend.measure import measure, measure_onnxruntime

    spec = hago.load_spec(a.spec)
    print(f"machine: {machine()}; spec {spec.name}; 1 thread\n")
    print("| conv | MMAC | ORT fp32 ms | ORT int8 ms (whole QDQ model) | hago conv kernel ms | GMAC/s | hago whole ms |")
    print("|---|---|---|---|---|---|---|")
    cache = tempfile.mkdtemp(prefix="hago-int8-convs-")
    for c, hw, oc, k, what in SHAPES:
        m, calib = one_conv(c, hw, oc, k)
        with tempfile.TemporaryDirectory() as d:
            q = ort_int8(m, calib, d)
        feeds = calib[0]
        t_of = measure_onnxruntime(m, feeds, threads=1, repeat=a.repeat).median_ms
        t_oq = measure_onnxruntime(q, feeds, threads=1, repeat=a.repeat).median_ms
        qg = hago.quantize(hago.load(m), spec, calib, method="minmax", progress=False)
        art = hago.compile(qg, spec, threads=1, progress=False, cache_dir=cache)
        t_k = conv_kernel_ms(art, feeds)
        t_h = measure(art, feeds, threads=1, repeat=a.repeat).median_ms
        macs = c * oc * k * k * hw * hw
        print(f"| {what}: {c}x{hw}x{hw} -> {oc}, {k}x{k} | {macs / 1e6:.0f} | {t_of:.3f} | {t_oq:.3f} | {t_k:.3f} "
              f"| {macs / t_k / 1e6:.0f} | {t_h:.3f} |", flush=True)
    if a.epilogues:
        from hago.backend.compile import compile as hcompile

        target = spec.target
        print("\nconv kernel (us) with each requantize epilogue, bare Relax module, same target:")
        print("| conv | >> 8 shift | int64 fixed point | fp32 with round |")
        print("|---|---|---|---|")
        rs = np.random.RandomState(1)
        for c, hw, oc, k, what in SHAPES:
            w = rs.randint(-128, 128, size=(oc, c, k, k)).astype(np.int8)
            x = {"x": rs.randint(0, 256, size=(1, c, hw, hw)).astype(np.uint8)}
            cells = []
            for epi in ("shift", "fixed64", "float"):
                art = hcompile(epilogue_module(w, (1, c, hw, hw), epi), target, threads=1, progress=False,
                               cache_dir=cache)
                cells.append(f"{conv_kernel_ms(art, x) * 1000:.0f}")
            print(f"| {what} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
