"""Single int8 kernels through hago's x86 code path: what the requantize rule and the hand schedules cost.

    python bench/bench_kernels.py [--threads 1] [--trials 16] [--cache-dir DIR] [--part requantize,depthwise]

``requantize``: one conv (+ Relu, + a 1x1 max pool so that the conv's output is requantized to uint8 as inside a network) per
row, quantized by ``hago.quantize(..., "x86_avx2", method="minmax")`` and
compiled twice by ``hago.compile``: with the shipped spec (``"requantize": "float"``: int32 -> fp32, times the
scale, rounded) and with the same spec set to ``"fixed_point"`` (31-bit multiplier and rounding shift in int64).
Both use hago's hand-written packed int8 conv schedule. Reported: median ms of each (interleaved rounds), the
difference per output value, GMAC/s of the float-rule kernel, and onnxruntime FP32 on the same conv for scale.

``depthwise``: one 3x3 depthwise conv (+ Relu + 1x1 max pool) per row, compiled with hago's hand schedule
(``int8_schedule="manual"``, no tuning) and with MetaSchedule (``int8_schedule="tune"``, ``--trials`` trials);
outputs must be identical.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hago  # noqa: E402
from common import machine  # noqa: E402
from hago.backend.measure import measure, measure_onnxruntime  # noqa: E402

# (input channels, height = width, output channels, kernel, stride): SqueezeNet's and ResNet-50's 1x1 convs
# with few input channels, a ResNet-50 3x3 conv, SqueezeNet's 13-wide 1000-class conv
CONVS = [(16, 55, 64, 1, 1), (64, 56, 256, 1, 1), (64, 56, 64, 3, 1), (512, 13, 1000, 1, 1)]
# (channels, height = width, stride): MobileNetV2's depthwise convs
DEPTHWISE = [(96, 112, 2), (144, 56, 1), (384, 14, 1), (960, 7, 1)]


def conv_model(c, hw, k, ks, stride, groups=1, seed=0):
    from onnx import TensorProto, helper, numpy_helper

    rs = np.random.RandomState(seed)
    w = (rs.randn(k, c // groups, ks, ks) * np.sqrt(2.0 / (ks * ks * c // groups))).astype(np.float32)
    b = (rs.randn(k) * 0.1).astype(np.float32)
    p = ks // 2
    ohw = (hw + 2 * p - ks) // stride + 1
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["y0"], pads=[p] * 4, strides=[stride] * 2, group=groups),
         helper.make_node("Relu", ["y0"], ["y1"]),
         # a 1x1 max pool reads the Relu's output as uint8, so the conv's int32 result is requantized in the
         # conv kernel as between two layers of a network (the graph output itself stays float)
         helper.make_node("MaxPool", ["y1"], ["y"], kernel_shape=[1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k, ohw, ohw])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    calib = [{"x": rs.rand(1, c, hw, hw).astype(np.float32)} for _ in range(4)]
    return m, calib, ohw


def interleaved(arts: dict, feeds, threads, rounds=5, repeat=30) -> dict:
    times = {k: [] for k in arts}
    for _ in range(rounds):
        for k, a in arts.items():
            times[k].append(measure(a, feeds, repeat=repeat, threads=threads).median_ms)
    return {k: float(np.median(v)) for k, v in times.items()}


def part_requantize(a, cache):
    spec = hago.load_spec("x86_avx2")
    fixed = copy.deepcopy(spec)
    fixed.arithmetic["requantize"] = "fixed_point"
    print(f"\nrequantize rule ({spec.requantize} = shipped x86_avx2 spec, vs fixed_point), {a.threads} thread(s)")
    print("| conv | MMAC | outputs | ORT fp32 ms | hago int8 float-rule ms (GMAC/s) | hago int8 fixed-point ms | "
          "fixed / float | extra ns per output | max diff (steps) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, hw, k, ks, s in CONVS:
        model, calib, ohw = conv_model(c, hw, k, ks, s)
        qg = hago.quantize(hago.load(model), spec, calib, method="minmax", progress=False)
        arts = {r: hago.compile(qg, sp, cache_dir=cache, threads=a.threads, progress=False)
                for r, sp in (("float", spec), ("fixed", fixed))}
        y = {r: art.run(calib[0])[0] for r, art in arts.items()}
        step = float(np.asarray(qg.graph.annotation(qg.graph.value("y1")).scale).max())
        diff = float(np.abs(y["float"] - y["fixed"]).max()) / step  # the conv output step: rules differ by a rounding
        t = interleaved(arts, calib[0], a.threads)
        ort = measure_onnxruntime(model, calib[0], threads=a.threads, repeat=30).median_ms
        mac = ohw * ohw * k * c * ks * ks / 1e6
        outs = k * ohw * ohw
        print(f"| {c}->{k} {ks}x{ks}/{s} at {hw}x{hw} | {mac:.1f} | {outs:,} | {ort:.3f} | {t['float']:.3f} "
              f"({mac / t['float']:.1f}) | {t['fixed']:.3f} | {t['fixed'] / t['float']:.2f}x | "
              f"{(t['fixed'] - t['float']) * 1e6 / outs:.2f} | {diff:.0f} |", flush=True)


def part_depthwise(a, cache):
    spec = hago.load_spec("x86_avx2")
    print(f"\ndepthwise 3x3 int8: hago hand schedule (no tuning) vs MetaSchedule ({a.trials} trials), "
          f"{a.threads} thread(s)")
    print("| depthwise conv | ORT fp32 ms | hago hand ms | MetaSchedule ms | MetaSchedule / hand | tuning s | identical |")
    print("|---|---|---|---|---|---|---|")
    for c, hw, s in DEPTHWISE:
        model, calib, _ = conv_model(c, hw, c, 3, s, groups=c)
        qg = hago.quantize(hago.load(model), spec, calib, method="minmax", progress=False)
        hand = hago.compile(qg, spec, cache_dir=cache, threads=a.threads, progress=False, int8_schedule="manual")
        ms = hago.compile(qg, spec, cache_dir=cache, threads=a.threads, progress=False, int8_schedule="tune",
                          tune_trials=a.trials)
        same = bool(np.array_equal(hand.run(calib[0])[0], ms.run(calib[0])[0]))
        t = interleaved({"hand": hand, "ms": ms}, calib[0], a.threads)
        ort = measure_onnxruntime(model, calib[0], threads=a.threads, repeat=30).median_ms
        print(f"| {c}ch {hw}x{hw}/{s} | {ort:.3f} | {t['hand']:.3f} | {t['ms']:.3f} | {t['ms'] / t['hand']:.2f}x | "
              f"{ms.tuning.seconds:.0f} | {'yes' if same else 'NO'} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per kernel (depthwise part)")
    ap.add_argument("--cache-dir", help="tuning database (default: a fresh temporary directory)")
    ap.add_argument("--part", default="requantize,depthwise")
    a = ap.parse_args(argv)
    cache = a.cache_dir or tempfile.mkdtemp(prefix="hago-bench-kernels-")
    print(f"machine: {machine()}; threads {a.threads}; cache {cache}")
    parts = a.part.split(",")
    if "requantize" in parts:
        part_requantize(a, cache)
    if "depthwise" in parts:
        part_depthwise(a, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
