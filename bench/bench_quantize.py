"""INT8 accuracy and calibration time: hago vs onnxruntime.quantization.quantize_static, side by side.

    python bench/bench_quantize.py [--models mnist_cnn,ppocr_rec] [--calib 128] [--ocr-lines 300]
    python bench/bench_quantize.py --models mnist_cnn --seeds 10 --train-seeds 0,1,2,3,4   # over trained networks

For each model: FP32 accuracy; hago.quantize with the x86_avx2 spec (W7A8
per-channel weights, u8 asymmetric activations) with each calibration method
and "auto"; and onnxruntime's quantize_static (QDQ, per-channel, QUInt8
activations, QInt8 weights) with each of its calibration methods, with
reduce_range off and on (7-bit weights, as on AVX2 without VNNI). The same
calibration samples go to both. All QDQ models are evaluated by onnxruntime
with its default optimizations (what a user deploys; on this AVX2 CPU its
integer kernels run) and hago's also as exact simulation (``sim``).
Calibration time is wall time of the quantize call on this machine (hago.quantize:
graph preparation + calibration; quantize_static: calibration + writing the
QDQ model), the minimum over ``--repeat`` rounds that each time every
quantizer once (interleaved: both sides see the same machine load); a table at the end of each
model puts each hago method next to onnxruntime's method of the same kind
(minmax/MinMax, percentile/Percentile, kl/Entropy; auto and mse next to
onnxruntime's histogram methods).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hago  # noqa: E402
from common import SEED_DIR, add_network_args, mnist_model, network_seeds, paired  # noqa: E402
from hago.runtime import ort as rt  # noqa: E402


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
    with contextlib.redirect_stdout(io.StringIO()):  # its calibrators print progress
        quantize_static(pre, out, _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                        calibrate_method=getattr(CalibrationMethod, method))
    return time.perf_counter() - t0


def mnist_task(name, train_seed=0, seed_dir=SEED_DIR):
    from hago.examples import datasets

    path = mnist_model(name, train_seed, seed_dir)
    g = hago.load(path)
    inp = g.input_names[0]
    xtr, _ = datasets.mnist("train")
    xte, yte = datasets.mnist("test")

    def calib(n, seed=0):
        """Calibration set ``seed``: the seed-th block of n training digits (sets are disjoint)."""
        if (seed + 1) * n > len(xtr):
            raise SystemExit(f"--seeds {seed + 1} x --calib {n} needs more than the {len(xtr)} training digits")
        return list(datasets.batches(xtr[seed * n:(seed + 1) * n], 32, inp))

    test = list(datasets.batches(xte, 200, inp, yte))

    fp32_pred = []

    def accuracy(model):
        """(top-1, fraction of test digits whose prediction equals fp32's: a label-free fidelity measure)."""
        sess = rt.session(model if isinstance(model, (str, bytes)) else model)
        pred = np.concatenate([sess.run(None, {inp: b[inp]})[0].argmax(1) for b in test])
        if not fp32_pred:
            fp32_pred.append(pred)
        return float(np.mean(pred == yte)), float(np.mean(pred == fp32_pred[0]))

    def accuracy_sim(qg):
        return qg.evaluate(test)

    return path, g, calib, accuracy, accuracy_sim, "top-1 %"


def ocr_task(n_lines):
    from hago.examples import ocr

    path = ocr.model_path()
    g = hago.load(path)
    images, texts = ocr.dataset(n=n_lines, seed=0)

    def calib(n, seed=0):
        return list(ocr.calib_batches(n=n, seed=1 + seed))

    fp32_pred = []

    def accuracy(model):
        """(character accuracy, character agreement with fp32's reading: a label-free fidelity measure)."""
        pred = ocr.predict(model, images)
        if not fp32_pred:
            fp32_pred.append(pred)
        return ocr.char_accuracy(pred, texts), ocr.char_accuracy(pred, fp32_pred[0])

    def accuracy_sim(qg):
        return ocr.evaluate(qg.to_qdq(), images, texts, optimize="basic")

    return path, g, calib, accuracy, accuracy_sim, "char acc %"


# hago method family -> onnxruntime CalibrationMethod of the same kind
MATCHED = {"minmax": "MinMax", "percentile": "Percentile", "kl": "Entropy", "entropy": "Entropy"}


def _clock(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(task_name, task, n_calib, methods, ort_methods, reduce_range=(False, True), repeat=1, seeds=1,
        spec_name="x86_avx2"):
    """Accuracy of every quantizer, then calibration timing: ``repeat`` rounds, each timing every hago method
    and every onnxruntime configuration once (interleaved, so that both sides see the same machine load);
    the minimum per quantizer is reported. With ``seeds`` > 1, every quantizer is also run on seeds - 1 more
    disjoint calibration sets and a table of its accuracy per set and mean follows (one digit of 1,000 is
    0.1 point: a single calibration set cannot rank quantizers that differ by that)."""
    path, g, calib_fn, acc, acc_sim, unit = task
    calib = calib_fn(n_calib)
    methods = [x for x in methods if x]
    log = lambda msg: print(f"  [{task_name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    spec = hago.load_spec(spec_name)
    wbits = max(spec.op("Conv").signatures[0].inputs[1].bits) if spec.op("Conv") else 8
    hago.quantize(g, spec, calib[:1], method="minmax")  # warm-up (imports, onnxruntime start), not timed
    rows = [("fp32", "", acc(path), None, None)]
    times: dict = {}
    with tempfile.TemporaryDirectory() as d:
        for m in methods:
            qg, dt = _clock(lambda: hago.quantize(g, spec, calib, method=m))
            times[("hago", m)] = [dt]
            chosen = qg.calibration.get("method", m)
            rows.append(((f"hago {m}" + (f" ({chosen})" if m == "auto" else "")), f"W{wbits}A8 per-channel",
                         acc(qg.to_qdq()), acc_sim(qg), ("hago", m)))
            log(f"hago {m}: {dt:.2f} s")
        for rr in reduce_range:
            for m in ort_methods:
                out = os.path.join(d, f"ort_{m}_{rr}.onnx")
                try:
                    dt = ort_quantize(g, calib, m, rr, out)
                    times[("ort", m, rr)] = [dt]
                    rows.append((f"ort {m}", f"W{'7' if rr else '8'}A8 per-channel", acc(out), None, ("ort", m, rr)))
                    log(f"ort {m} W{'7' if rr else '8'}: {dt:.2f} s")
                except Exception as e:  # report, don't hide
                    rows.append((f"ort {m}", f"failed: {type(e).__name__}: {str(e)[:60]}", (float("nan"),) * 2,
                                 None, None))
        for r in range(1, repeat):
            for key in times:
                if key[0] == "hago":
                    times[key].append(_clock(lambda: hago.quantize(g, spec, calib, method=key[1]))[1])
                else:
                    times[key].append(ort_quantize(g, calib, key[1], key[2], os.path.join(d, "scratch.onnx")))
            log(f"timing round {r + 1}/{repeat} done")
        per_seed = {key: [r[2]] for r in rows if (key := r[4]) is not None}
        for sd in range(1, seeds):
            cs = calib_fn(n_calib, sd)
            for key in per_seed:
                if key[0] == "hago":
                    per_seed[key].append(acc(hago.quantize(g, spec, cs, method=key[1]).to_qdq()))
                else:
                    out = os.path.join(d, "seed.onnx")
                    ort_quantize(g, cs, key[1], key[2], out)
                    per_seed[key].append(acc(out))
            log(f"calibration set {sd + 1}/{seeds} done")
    best = {k: min(v) for k, v in times.items()}
    print(f"\n## {task_name} ({unit}; {sum(next(iter(b.values())).shape[0] for b in calib)} calibration samples; "
          f"calibration s = min of {repeat} interleaved run(s))\n")
    print("| quantizer | weights | accuracy (deployed, ORT) | agrees with fp32 (deployed) | accuracy (hago simulation) "
          "| calibration s |")
    print("|---|---|---|---|---|---|")
    for name, w, (a, agree), sim, key in rows:
        sa = "" if sim is None else f"{sim * 100:.2f}"
        ts = "" if key is None else f"{best[key]:.2f}"
        print(f"| {name} | {w} | {a * 100:.2f} | {agree * 100:.2f} | {sa} | {ts} |")
    if seeds > 1:
        seeds_table(task_name, rows, per_seed, n_calib)
    calibration_table(task_name, {k[1]: t for k, t in best.items() if k[0] == "hago"},
                      {(k[1], k[2]): t for k, t in best.items() if k[0] == "ort"}, reduce_range)
    return rows, per_seed


def networks_table(task_name, results: dict) -> None:
    """Over several trained networks (``results``: training seed -> (rows, per_seed)): each quantizer's mean
    accuracy per network and over all (network, calibration set) runs, and each hago method's paired difference
    to each onnxruntime configuration, mean +- standard error over the runs."""
    seeds = list(results)
    rows0 = results[seeds[0]][0]
    keys = [(name, w, key) for name, w, _, _, key in rows0 if key is not None]
    print(f"\n### {task_name}: {len(seeds)} trained networks (training seeds {', '.join(map(str, seeds))}; "
          f"seed 0 is the shipped model), every calibration set of each (deployed on onnxruntime)\n")
    print("| quantizer | weights | mean accuracy per network | mean over all runs | mean agreement with fp32 |")
    print("|---|---|---|---|---|")
    fp = [results[sd][0][0][2][0] * 100 for sd in seeds]
    print(f"| fp32 | | {' / '.join(f'{x:.2f}' for x in fp)} | {np.mean(fp):.2f} | |")
    allruns = {}
    for name, w, key in keys:
        per = [np.array(results[sd][1][key]) * 100 for sd in seeds]
        allruns[key] = np.concatenate([p[:, 0] for p in per])
        print(f"| {name.split(' (')[0]} | {w} | {' / '.join(f'{p[:, 0].mean():.2f}' for p in per)} | "
              f"{allruns[key].mean():.2f} | {np.concatenate([p[:, 1] for p in per]).mean():.2f} |")
    print()
    print("| hago method | onnxruntime | mean difference (points) +- standard error (runs hago above / equal / below) |")
    print("|---|---|---|")
    for _, _, hk in keys:
        if hk[0] != "hago":
            continue
        for _, w, ok in keys:
            if ok[0] != "ort":
                continue
            d = allruns[hk] - allruns[ok]
            print(f"| {hk[1]} | {ok[1]} {w.split()[0]} | {paired(d, 3)} |")
    print(flush=True)


def seeds_table(task_name, rows, per_seed, n_calib) -> None:
    """Deployed accuracy of each quantizer on each disjoint calibration set, with the mean."""
    k = len(next(iter(per_seed.values())))
    print(f"\n### {task_name}: {k} disjoint calibration sets of {n_calib} samples (deployed on onnxruntime)\n")
    print("| quantizer | weights | accuracy per set | mean accuracy | mean agreement with fp32 |")
    print("|---|---|---|---|---|")
    for name, w, _, _, key in rows:
        if key is None or key not in per_seed:
            continue
        a = np.array(per_seed[key]) * 100
        print(f"| {name} | {w} | {' / '.join(f'{x:.2f}' for x in a[:, 0])} | {a[:, 0].mean():.2f} "
              f"| {a[:, 1].mean():.2f} |")
    print(flush=True)


def calibration_table(task_name, hago_t: dict, ort_t: dict, reduce_range) -> None:
    """Per-method calibration seconds, hago next to onnxruntime's method of the same kind."""
    print(f"\n### {task_name}: calibration seconds, hago vs onnxruntime (same samples, same run)\n")
    cols = [f"ORT W{'7' if rr else '8'}" for rr in reduce_range]
    print("| hago method | hago s | ORT method | " + " | ".join(f"{c} s" for c in cols) + " | hago / faster ORT |")
    print("|---|---|---|" + "---|" * len(cols) + "---|")
    hist_ort = [m for m in ("Percentile", "Entropy") if any((m, rr) in ort_t for rr in reduce_range)]
    for m, t in hago_t.items():
        fam = m.split(":", 1)[0]
        if fam in MATCHED:
            om = [MATCHED[fam]]
        elif fam in ("auto", "mse", "lp"):  # no onnxruntime counterpart: next to its histogram methods
            om = hist_ort
        else:
            om = ["MinMax"] if fam == "avg_range" else []
        for o in om:
            ts = [ort_t.get((o, rr)) for rr in reduce_range]
            have = [x for x in ts if x is not None]
            if not have:
                continue
            verdict = f"{t / min(have):.2f} " + ("(not slower)" if t <= min(have) else "(SLOWER)")
            print(f"| {m} | {t:.2f} | {o} | " + " | ".join("" if x is None else f"{x:.2f}" for x in ts) + f" | {verdict} |")
    print(flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mnist_cnn,ppocr_rec")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--ocr-lines", type=int, default=300)
    ap.add_argument("--methods", default="auto,minmax,avg_range,percentile:99.99,mse,kl")
    ap.add_argument("--ort-methods", default="MinMax,Entropy,Percentile,Distribution")
    ap.add_argument("--reduce-range", default="both", choices=["both", "on", "off"])
    ap.add_argument("--repeat", type=int, default=None,
                    help="time each quantizer this many times, interleaved, and report the minimum "
                         "(default 5; 1 for ppocr_rec)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="also run every quantizer on this many disjoint calibration sets and report the mean")
    add_network_args(ap)
    ap.add_argument("--spec", default="x86_avx2", help="hago's spec (x86_avx2: 7-bit weights, the figures in "
                    "docs/BENCHMARKS.md; x86_avx512_vnni: 8-bit weights; host: the spec of this CPU)")
    a = ap.parse_args()
    import platform

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; spec {a.spec}; "
          f"onnxruntime {__import__('onnxruntime').__version__}; hago {hago.__version__}")
    train_seeds = network_seeds(a)
    for name in a.models.split(","):
        rr = {"both": (False, True), "on": (True,), "off": (False,)}[a.reduce_range]
        repeat = a.repeat if a.repeat is not None else (1 if name == "ppocr_rec" else 5)
        results = {}
        for sd in ([0] if name == "ppocr_rec" else train_seeds):
            task = ocr_task(a.ocr_lines) if name == "ppocr_rec" else mnist_task(name, sd, a.seed_dir)
            label = name if len(train_seeds) == 1 or name == "ppocr_rec" else f"{name} (training seed {sd})"
            results[sd] = run(label, task, a.calib if name != "ppocr_rec" else min(a.calib, 64), a.methods.split(","),
                              a.ort_methods.split(","), rr, repeat=repeat, seeds=a.seeds, spec_name=a.spec)
        if len(results) > 1:
            networks_table(name, results)


if __name__ == "__main__":
    main()
