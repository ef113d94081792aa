"""INT8 accuracy and calibration time: hago vs onnxruntime.quantization.quantize_static, side by side.

    python bench/bench_quantize.py [--models mnist_cnn,ppocr_rec] [--calib 128] [--ocr-lines 300]

For each model: FP32 accuracy; hago.quantize with the x86_avx2 spec (W7A8
per-channel weights, u8 asymmetric activations) with each calibration method
and "auto"; and onnxruntime's quantize_static (QDQ, per-channel, QUInt8
activations, QInt8 weights) with each of its calibration methods, with
reduce_range off and on (7-bit weights, as on AVX2 without VNNI). The same
calibration samples go to both. All QDQ models are evaluated by onnxruntime
with its default optimizations (what a user deploys; on this AVX2 CPU its
integer kernels run) and hago's also as exact simulation (``sim``).
Calibration time is wall time of the quantize call on this machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hago  # noqa: E402
from hago.runtime import ort as rt  # noqa: E402

MODELS_DIR = os.path.join(os.path.dirname(hago.__file__), "examples", "models")


class _Reader:
    def __init__(self, batches):
        self.batches = list(batches)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


def ort_quantize(graph, calib, method: str, reduce_range: bool, out: str) -> float:
    """onnxruntime's quantize_static on the same canonicalized float graph hago starts from (opset 21, BN folded):
    on the original PP-OCR file (opset 10 era) its per-channel QDQ output does not load."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre = out + ".src.onnx", out + ".pre.onnx"
    onnx.save(graph.to_onnx(), src)
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    t0 = time.perf_counter()
    quantize_static(pre, out, _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                    calibrate_method=getattr(CalibrationMethod, method))
    return time.perf_counter() - t0


def mnist_task(name):
    from hago.examples import datasets

    path = os.path.join(MODELS_DIR, f"{name}.onnx")
    g = hago.load(path)
    inp = g.input_names[0]
    xtr, _ = datasets.mnist("train")
    xte, yte = datasets.mnist("test")

    def calib(n):
        return list(datasets.batches(xtr[:n], 32, inp))

    test = list(datasets.batches(xte, 200, inp, yte))

    def accuracy(model):
        sess = rt.session(model if isinstance(model, (str, bytes)) else model)
        tot = 0
        for b in test:
            out = sess.run(None, {inp: b[inp]})[0]
            tot += int((out.argmax(1) == b["label"]).sum())
        return tot / len(yte)

    def accuracy_sim(qg):
        return qg.evaluate(test)

    return path, g, calib, accuracy, accuracy_sim, "top-1 %"


def ocr_task(n_lines):
    from hago.examples import ocr

    path = ocr.model_path()
    g = hago.load(path)
    images, texts = ocr.dataset(n=n_lines, seed=0)

    def calib(n):
        return list(ocr.calib_batches(n=n, seed=1))

    def accuracy(model):
        return ocr.evaluate(model if isinstance(model, str) else model, images, texts)

    def accuracy_sim(qg):
        return ocr.evaluate(qg.to_qdq(), images, texts, optimize="basic")

    return path, g, calib, accuracy, accuracy_sim, "char acc %"


def run(task_name, task, n_calib, methods, ort_methods, reduce_range=(False, True)):
    path, g, calib_fn, acc, acc_sim, unit = task
    calib = calib_fn(n_calib)
    rows = []
    print(f"\n## {task_name} ({unit}; {sum(next(iter(b.values())).shape[0] for b in calib)} calibration samples)\n")
    print("| quantizer | weights | accuracy (deployed, ORT) | accuracy (hago simulation) | calibration s |")
    print("|---|---|---|---|---|", flush=True)

    def emit(row):
        name, w, a, s, t = row
        sa = "" if s is None else f"{s * 100:.2f}"
        ts = "" if t is None else f"{t:.2f}"
        print(f"| {name} | {w} | {a * 100:.2f} | {sa} | {ts} |", flush=True)
        rows.append(row)

    fp32 = acc(path)
    emit(("fp32", "", fp32, None, None))
    spec = hago.load_spec("x86_avx2")
    for m in [x for x in methods if x]:
        t0 = time.perf_counter()
        qg = hago.quantize(g, spec, calib, method=m)
        dt = time.perf_counter() - t0
        chosen = qg.calibration.get("method", m)
        emit((f"hago {m}" + (f" ({chosen})" if m == "auto" else ""), "W7A8 per-channel", acc(qg.to_qdq()), acc_sim(qg), dt))
    with tempfile.TemporaryDirectory() as d:
        for rr in reduce_range:
            for m in ort_methods:
                out = os.path.join(d, f"ort_{m}_{rr}.onnx")
                try:
                    dt = ort_quantize(g, calib, m, rr, out)
                    emit((f"ort {m}", f"W{'7' if rr else '8'}A8 per-channel", acc(out), None, dt))
                except Exception as e:  # report, don't hide
                    emit((f"ort {m}", f"failed: {type(e).__name__}: {str(e)[:60]}", float('nan'), None, None))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mnist_cnn,ppocr_rec")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--ocr-lines", type=int, default=300)
    ap.add_argument("--methods", default="auto,minmax,avg_range,percentile:99.99,mse,kl")
    ap.add_argument("--ort-methods", default="MinMax,Entropy,Percentile,Distribution")
    ap.add_argument("--reduce-range", default="both", choices=["both", "on", "off"])
    a = ap.parse_args()
    import platform

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"onnxruntime {__import__('onnxruntime').__version__}; hago {hago.__version__}")
    for name in a.models.split(","):
        task = ocr_task(a.ocr_lines) if name == "ppocr_rec" else mnist_task(name)
        rr = {"both": (False, True), "on": (True,), "off": (False,)}[a.reduce_range]
        run(name, task, a.calib if name != "ppocr_rec" else min(a.calib, 64), a.methods.split(","), a.ort_methods.split(","), rr)


if __name__ == "__main__":
    main()
