"""Whole models through hago's code generator, side by side: hago INT8 (TVM, tuned) vs TVM FP32 (tuned, same
budget) vs onnxruntime FP32 vs onnxruntime INT8 (QDQ), batch 1, same thread count, one run.

    python bench/bench_models.py [--models squeezenet,mobilenetv2,resnet50] [--threads 1] [--trials 16]
                                 [--cache-dir DIR] [--profile 8] [--json out.json] [--spec host]

Models: random-weight versions of the onnx package's light graphs (ResNet-50, SqueezeNet) and a
MobileNetV2-shaped network from ``hago.examples.zoo`` (depthwise convs), 224x224 inputs.
hago INT8 is ``hago.quantize(g, spec, calib)`` compiled with ``hago.compile(qg, spec, tune_trials=N)``; the spec
is ``--spec`` (default ``host``: ``x86_avx512_vnni`` on a CPU with AVX-512 VNNI, 8-bit per-channel weights, integer
convs in the packed layouts with the ``vpdpbusd`` intrinsic; ``x86_avx2`` on AVX2 only, 7-bit weights,
``vpmaddubsw``), hand-scheduled convs, other kernels MetaSchedule-tuned. TVM FP32 is the float graph through the same call and budget.
onnxruntime INT8 is ``quantize_static`` (QDQ, per-channel, u8/s8) on the same calibration samples.

Checks printed per model: hago INT8 vs onnxruntime running hago's own QDQ model (top-1 agreement and max
difference in output quantization steps) and TVM FP32 vs onnxruntime FP32 (max relative difference).
``--profile K`` prints the K most expensive kernels of the hago INT8 artifact (Relax VM profiler), so the
report can say where the time goes. Tuning records persist in ``--cache-dir`` (default a fresh temporary
directory): a rerun with the same directory costs no tuning.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hago  # noqa: E402
from bench_search import get_model, ort_int8  # noqa: E402
from common import image_batches, machine  # noqa: E402


def profile_artifact(art, feeds, top: int, runs: int = 5):
    """The ``top`` most expensive kernels (:func:`hago.backend.measure.profile`) and the sum over all kernels."""
    from hago.backend.measure import profile

    rows = profile(art, feeds, runs=runs)
    total = sum(r["ms"] for r in rows) or 1.0
    return [(r["kernel"], r["ms"], r["ms"] / total, r["calls"], r["shapes"]) for r in rows[:top]], total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="squeezenet,mobilenetv2,resnet50")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per distinct kernel")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--cache-dir")
    ap.add_argument("--profile", type=int, default=8)
    ap.add_argument("--json")
    ap.add_argument("--spec", default="host",
                    help="hardware spec for hago INT8 and the TVM FP32 target (default: the shipped spec of this CPU)")
    args = ap.parse_args(argv)
    spec = hago.load_spec(args.spec)

    from hago.backend.measure import measure, measure_onnxruntime

    cache = args.cache_dir or tempfile.mkdtemp(prefix="hago-bench-models-")
    print(f"machine: {machine()}; spec {spec.name}; threads {args.threads}; {args.trials} MetaSchedule trials per "
          f"kernel; cache {cache}",
          flush=True)
    results = []
    for name in args.models.split(","):
        g = hago.load(get_model(name))
        inp = g.input_names[0]
        shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
        calib = image_batches(shape, args.calib, 1, inp)
        feeds = image_batches(shape, 1, 7, inp)[0]
        fp32 = g.to_onnx()
        row = {"model": name}
        with tempfile.TemporaryDirectory() as d:
            q_ort = ort_int8(fp32, calib, d)
        row["ort_fp32"] = measure_onnxruntime(fp32, feeds, threads=args.threads, repeat=args.repeat).median_ms
        row["ort_int8"] = measure_onnxruntime(q_ort, feeds, threads=args.threads, repeat=args.repeat).median_ms
        print(f"{name}: onnxruntime fp32 {row['ort_fp32']:.2f} ms, int8 {row['ort_int8']:.2f} ms", flush=True)

        t0 = time.perf_counter()
        art_f = hago.compile(g, spec, tune_trials=args.trials, cache_dir=cache, threads=args.threads,
                             progress=False)
        row["tvm_fp32_compile_s"] = time.perf_counter() - t0
        ref = measure_onnxruntime  # noqa: F841 - keep the harness symmetrical
        import onnxruntime as ort

        sess = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
        y_ref = sess.run(None, feeds)[0]
        y_f = art_f.run(feeds)[0]
        row["tvm_fp32_rel_err"] = float(np.abs(y_f - y_ref).max() / (np.abs(y_ref).max() + 1e-12))
        row["tvm_fp32"] = measure(art_f, feeds, repeat=args.repeat, threads=args.threads).median_ms
        print(f"  tvm fp32 {row['tvm_fp32']:.2f} ms ({art_f.tuning.new_trials} new trials, "
              f"{row['tvm_fp32_compile_s']:.0f} s compile+tune; rel. err vs ORT {row['tvm_fp32_rel_err']:.1e})",
              flush=True)
        del art_f

        t0 = time.perf_counter()
        qg = hago.quantize(g, spec, calib, method="minmax", progress=False)
        row["quantize_s"] = time.perf_counter() - t0
        qdq = qg.to_qdq()
        t0 = time.perf_counter()
        art_q = hago.compile(qg, spec, tune_trials=args.trials, cache_dir=cache, threads=args.threads,
                             progress=False)
        row["hago_int8_compile_s"] = time.perf_counter() - t0
        row["packed_int8_ops"] = art_q.info.get("packed_int8_ops")
        sq = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
        agree, steps = [], []
        for b in image_batches(shape, 8, 11, inp):
            yq, yo = art_q.run(b)[0], sq.run(None, b)[0]
            agree.append(int(np.argmax(yq) == np.argmax(yo)))
            steps.append(float(np.abs(yq - yo).max()))
        row["hago_vs_qdq_top1_agree"] = float(np.mean(agree))
        row["hago_vs_qdq_max_abs"] = float(max(steps))
        row["hago_int8"] = measure(art_q, feeds, repeat=args.repeat, threads=args.threads).median_ms
        print(f"  hago int8 {row['hago_int8']:.2f} ms ({art_q.tuning.new_trials} new trials, "
              f"{row['hago_int8_compile_s']:.0f} s compile+tune, {row['packed_int8_ops']} packed int8 ops; top-1 "
              f"agreement with its QDQ model in onnxruntime {row['hago_vs_qdq_top1_agree'] * 100:.0f}%, max |diff| "
              f"{row['hago_vs_qdq_max_abs']:.3g})", flush=True)
        if args.profile:
            try:
                top, total = profile_artifact(art_q, feeds, args.profile)
                row["profile"] = [{"kernel": k, "ms": ms, "share": s, "calls": c, "shapes": sh}
                                  for k, ms, s, c, sh in top]
                print(f"  profile of hago int8 (sum of kernels {total:.2f} ms; calls, then the first call's "
                      f"data/weight and output shapes):")
                for k, ms, s, c, sh in top:
                    brief = [sh[0], sh[1], sh[-1]] if len(sh) >= 3 else sh
                    print(f"    {ms:8.3f} ms {s * 100:5.1f}%  x{c} {k[:48]} {' '.join(str(list(b)) for b in brief)}")
            except Exception as e:  # noqa: BLE001 - the profile is a diagnostic
                print(f"  (profile unavailable: {type(e).__name__}: {e})")
        del art_q
        results.append(row)
        sys.stdout.flush()

    print("\n| model | ORT fp32 ms | ORT int8 ms | TVM fp32 ms | hago int8 ms | hago vs TVM fp32 | hago vs ORT int8 "
          "| hago vs ORT fp32 | top-1 agree (hago vs its QDQ in ORT) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['ort_fp32']:.2f} | {r['ort_int8']:.2f} | {r['tvm_fp32']:.2f} | {r['hago_int8']:.2f} "
              f"| {r['tvm_fp32'] / r['hago_int8']:.2f}x | {r['ort_int8'] / r['hago_int8']:.2f}x "
              f"| {r['ort_fp32'] / r['hago_int8']:.2f}x | {r['hago_vs_qdq_top1_agree'] * 100:.0f}% |")
    print("(ratios are speedups of hago INT8: >1 means hago INT8 is faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "spec": spec.name, "threads": args.threads, "trials": args.trials,
                       "rows": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
