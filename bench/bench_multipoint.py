"""Multipoint quantization (Liu et al., AAAI 2021) vs single-point per-channel quantization at low weight bit-widths.

    python bench/bench_multipoint.py [--models mnist_cnn,mnist_resnet,mnist_mobilenetv2,ppocr_rec] [--bits 2,3,4]
                                     [--train-seeds 0,1,2,3,4]

Activations 8-bit. For each model and weight bit-width: single-point per-channel
(max-abs, and MSE-clipped), multipoint with 2 points on every channel, and three
adaptive allocations with the same average cost (at most 3 points per channel):

* ``layer``: per layer, each layer's channels average 2 points, greedy on the raw
  per-channel output MSE on calibration inputs (the original allocation);
* ``global-E``: one network-wide greedy allocation, a point costing its channel's
  MACs (MAC-weighted average 2 points = the MACs of fixed 2 points), per-channel
  output errors divided by the layer's output energy;
* ``global-S``: as global-E, with each layer's errors also weighted by the measured
  sensitivity of the network output to that layer.

Every cell is "accuracy / output SNR": top-1 (MNIST, 1,000 held-out test digits) or
character accuracy (ppocr_rec, the first 150 of the rendered lines of
``bench_quantize.py``, seed 0), in percent, and the SNR in dB of the network output
(MNIST logits, PP-OCR per-step character probabilities) against the fp32 model on
the same held-out inputs: ``10 log10(sum y^2 / sum (y_q - y)^2)``. The SNR is what
the allocations try to keep high; accuracy on 1,000 digits moves in steps of 0.1.
Depthwise convs (group > 1) are not split and keep single-point weights. The
realized form is a sum of ordinary low-bit layers (``tests/test_multipoint_graph.py``,
``tests/test_realize_seeds.py``).

The paper's own figures (Liu, Ye, Zhou, Liu, AAAI 2021, arXiv 2002.09049) could not be
retrieved here (the stored corpora hold its abstract only), so no paper figure is quoted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hago  # noqa: E402
from hago.passes.multipoint import multipoint_split  # noqa: E402
from hago.runtime import ort as rt  # noqa: E402
from common import SEED_DIR, add_network_args, mnist_model, network_seeds, paired  # noqa: E402

SPEC = "x86_avx512_vnni"


def _outputs(model, feeds_list):
    sess = rt.session(model, optimize="basic")
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: f})[0] for f in feeds_list], axis=0)


def snr_db(y, ref):
    err = float(np.sum(np.square(y.astype(np.float64) - ref)))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(np.square(ref.astype(np.float64)))) / err)


def task(name, ocr_lines, train_seed=0, seed_dir=None):
    """(model path, calibration batches, held-out inputs list, score(outputs) -> accuracy, metric name).
    MNIST models: ``train_seed`` picks the trained network (0: the shipped one)."""
    if name == "ppocr_rec":
        from hago.examples import ocr

        imgs, texts = ocr.dataset(n=ocr_lines, seed=0)
        chars = ocr.charset()
        feeds = [imgs[i:i + 16] for i in range(0, len(imgs), 16)]
        return ocr.model_path(), list(ocr.calib_batches(n=32, seed=1)), feeds, \
            (lambda y: ocr.char_accuracy([p.strip(" ") for p in ocr.decode(y, chars)], texts)), "char acc"
    from hago.examples import datasets

    path = mnist_model(name, train_seed, seed_dir or SEED_DIR)
    g = hago.load(path)
    inp = g.input_names[0]
    xtr, _ = datasets.mnist("train")
    xte, yte = datasets.mnist("test")
    test = list(datasets.batches(xte, 250, inp, yte))
    labels = np.concatenate([b["label"] for b in test])
    return path, list(datasets.batches(xtr[:256], 64, inp)), \
        [b[inp] for b in test], (lambda y: float(np.mean(np.argmax(y, axis=-1) == labels))), "top-1"


VARIANTS = [
    ("single max-abs", None),
    ("single MSE", None),
    ("multipoint 2 pts", dict(points=2)),
    ("adaptive layer", dict(budget_avg=2.0, max_points=3, allocation="layer")),
    ("adaptive global-E", dict(budget_avg=2.0, max_points=3, allocation="global", weighting="energy")),
    ("adaptive global-S", dict(budget_avg=2.0, max_points=3, allocation="global", weighting="sensitivity")),
]


def networks_summary(name, bits_list, cols, runs) -> None:
    """``runs``: training seed -> {(bits, column): (accuracy, snr)}. Mean over the trained networks per column, and
    each adaptive column's difference to fixed 2 points, mean +- standard error over the networks."""
    seeds = list(runs)
    print(f"\n{name}, mean over {len(seeds)} trained networks (training seeds {', '.join(map(str, seeds))}): "
          "accuracy / SNR dB; then each adaptive allocation minus fixed 2 points (mean +- standard error over the "
          "networks, networks above / equal / below)")
    print("| W bits | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for bits in bits_list:
        cells = [f"{np.mean([runs[sd][bits, c][0] for sd in seeds]) * 100:.2f} / "
                 f"{np.mean([runs[sd][bits, c][1] for sd in seeds]):.1f}" for c in cols]
        print(f"| {bits} | " + " | ".join(cells) + " |")
    base = "multipoint 2 pts"
    if base not in cols:
        return
    for bits in bits_list:
        parts = []
        for c in cols:
            if not c.startswith("adaptive"):
                continue
            d = np.array([runs[sd][bits, c][0] - runs[sd][bits, base][0] for sd in seeds]) * 100
            ds = np.array([runs[sd][bits, c][1] - runs[sd][bits, base][1] for sd in seeds])
            parts.append(f"{c}: {paired(d)} points, SNR {ds.mean():+.2f} dB ({int(np.sum(ds > 0))} above)")
        print(f"W{bits}: " + "; ".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mnist_cnn,mnist_resnet,mnist_mobilenetv2,ppocr_rec")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--ocr-lines", type=int, default=150)
    ap.add_argument("--method", default="auto",
                    help="activation calibration of every row (auto scores five methods: 60 s per OCR quantization; "
                         "on ppocr_rec auto picks percentile:99.99, which is 2x faster to pass directly)")
    ap.add_argument("--variants", default="", help="comma-separated subset of the columns (default: all)")
    add_network_args(ap)
    a = ap.parse_args()
    train_seeds = network_seeds(a)
    bits_list = [int(b) for b in a.bits.split(",")]
    variants = [v for v in VARIANTS if not a.variants or v[0] in a.variants.split(",")]
    from common import machine

    print(f"machine: {machine()}", flush=True)
    cols = [v[0] for v in variants]
    print("| model | metric | W bits | fp32 | " + " | ".join(cols) + " | MAC-avg pts layer / E / S | s |")
    print("|" + "---|" * (len(cols) + 6))
    for name in a.models.split(","):
        t_model = time.perf_counter()
        runs = {}
        for sd in ([0] if name == "ppocr_rec" else train_seeds):
            path, calib, feeds, score, metric = task(name, a.ocr_lines, sd, a.seed_dir)
            ref = _outputs(path, feeds)
            fp32 = score(ref)
            g0 = hago.load(path)
            label0 = name if len(train_seeds) == 1 or name == "ppocr_rec" else f"{name} (seed {sd})"
            runs[sd] = {}
            for bits in bits_list:
                t0 = time.perf_counter()
                cells, avgs = [], []
                for label, kw in variants:
                    if kw is None:
                        extra = {"weight_method": "mse"} if label == "single MSE" else {}
                        qg = hago.quantize(g0, SPEC, calib, weight_bits=bits, method=a.method, **extra)
                    else:
                        g = hago.load(path)
                        st = {}
                        multipoint_split(g, calib, bits=bits, stats=st, **kw)
                        if "budget_avg" in kw:
                            avgs.append(st.get("avg_points_mac", float("nan")))
                        qg = hago.quantize(g, SPEC, calib, weight_bits=bits, method=a.method)
                    y = _outputs(qg.to_qdq(), feeds)
                    runs[sd][bits, label] = (score(y), snr_db(y, ref))
                    cells.append(f"{runs[sd][bits, label][0] * 100:.2f} / {runs[sd][bits, label][1]:.1f}")
                dt = time.perf_counter() - t0
                print(f"| {label0} | {metric} | {bits} | {fp32 * 100:.2f} | " + " | ".join(cells)
                      + f" | {' / '.join(f'{x:.2f}' for x in avgs)} | {dt:.0f} |", flush=True)
        if len(runs) > 1:
            networks_summary(name, bits_list, cols, runs)
        print(f"<!-- {name}: {time.perf_counter() - t_model:.0f} s in all -->", flush=True)

if __name__ == "__main__":
    main()
