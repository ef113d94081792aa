"""Multipoint quantization (Liu et al., AAAI 2021) vs single-point per-channel quantization at W3/W4.

    python bench/bench_multipoint.py [--models mnist_cnn,mnist_resnet,mnist_mobilenetv2,ppocr_rec] [--bits 3,4]

Activations 8-bit. For each model and weight bit-width: single-point per-channel
(max-abs, and MSE-clipped), multipoint with 2 points on every channel, and
adaptive multipoint with an average budget of 2 points per channel (points
allocated from each channel's output error on calibration inputs, at most 3):
the same average cost as the fixed 2 points. Depthwise convs are not split
(group > 1) and keep single-point weights. The realized form is a sum of
ordinary low-bit layers; ``tests/test_multipoint_graph.py`` checks that the
QDQ model reproduces the codes exactly.

The paper's own figures (Liu, Ye, Zhou, Liu, AAAI 2021, arXiv 2002.09049) could not be
retrieved here: the stored corpora hold only its abstract (e.g.
https://paperswithcode.com/paper/post-training-quantization-with-multiple), which gives
no numbers, and no official code README was found. So no paper figure is quoted. The
qualitative claims checked, from the abstract: the number of low-precision points per
weight vector is chosen "based on the error of its output", giving "an 'effect of mixed
precision' but without physical mixed precision implementations", and the method
"outperforms a range of state-of-the-art methods on ImageNet classification".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hago  # noqa: E402
from hago.passes.multipoint import multipoint_split  # noqa: E402

MODELS = os.path.join(os.path.dirname(hago.__file__), "examples", "models")


def task(name):
    if name == "ppocr_rec":
        from hago.examples import ocr

        imgs, texts = ocr.dataset(n=150, seed=0)
        return ocr.model_path(), list(ocr.calib_batches(n=32, seed=1)), \
            (lambda qg: ocr.evaluate(qg.to_qdq(), imgs, texts, optimize="basic")), "char acc"
    from hago.examples import datasets
    from hago.pipeline import evaluate

    g = hago.load(os.path.join(MODELS, name + ".onnx"))
    inp = g.input_names[0]
    xtr, _ = datasets.mnist("train")
    xte, yte = datasets.mnist("test")
    test = list(datasets.batches(xte, 250, inp, yte))
    return os.path.join(MODELS, name + ".onnx"), list(datasets.batches(xtr[:256], 64, inp)), \
        (lambda qg: qg.evaluate(test)), "top-1"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mnist_cnn,mnist_resnet,mnist_mobilenetv2")
    ap.add_argument("--bits", default="3,4")
    a = ap.parse_args()
    spec = "x86_avx512_vnni"
    print("| model | metric | W bits | single max-abs | single MSE | multipoint 2 pts | adaptive avg 2 pts | split s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.models.split(","):
        path, calib, acc, metric = task(name)
        g0 = hago.load(path)
        for bits in (int(b) for b in a.bits.split(",")):
            r = {}
            r["single"] = acc(hago.quantize(g0, spec, calib, weight_bits=bits, method="auto"))
            r["single_mse"] = acc(hago.quantize(g0, spec, calib, weight_bits=bits, weight_method="mse", method="auto"))
            g = hago.load(path)
            t0 = time.perf_counter()
            multipoint_split(g, calib, bits=bits, points=2)
            r["mp2"] = acc(hago.quantize(g, spec, calib, weight_bits=bits, method="auto"))
            g = hago.load(path)
            multipoint_split(g, calib, bits=bits, budget_avg=2.0, max_points=3)
            dt = time.perf_counter() - t0
            r["adaptive"] = acc(hago.quantize(g, spec, calib, weight_bits=bits, method="auto"))
            print(f"| {name} | {metric} | {bits} | {r['single'] * 100:.2f} | {r['single_mse'] * 100:.2f} | "
                  f"{r['mp2'] * 100:.2f} | {r['adaptive'] * 100:.2f} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
