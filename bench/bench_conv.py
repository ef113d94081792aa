"""One 3x3 conv (1x64x56x56 input, 64 filters, pad 1) side by side: onnxruntime vs TVM, FP32 vs INT8.

Rows (same thread count everywhere):
  ort fp32             onnxruntime, float model
  ort int8 (QDQ)       onnxruntime, QDQ model (u8 activations, 7-bit s8 per-channel weights: reduce_range)
  tvm fp32             hago.compile of the float model, MetaSchedule-tuned
  tvm int8 plain       hago.compile of the QDQ model, int8 conv2d in NCHW with TVM's default rules (no intrinsic)
  hago int8 avx2       hago.compile of the QDQ model, packed NCHW16c layouts + the AVX2 vpmaddubsw intrinsic,
                       hago's hand-written register-blocked schedule (no tuning)
  hago int8 avx2 ms    the same, the conv kernel tuned by MetaSchedule instead (int8_schedule="tune")

Each TVM row reports its tuning trials and seconds (tuned from scratch in a fresh cache unless --cache-dir).

    python bench/bench_conv.py --threads 1 --trials 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

X86_AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "core-avx2", "mattr": ["+avx2", "+fma"]}


def conv_models(c: int = 64, hw: int = 56, k: int = 64, seed: int = 0):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rs = np.random.RandomState(seed)
    w = (rs.randn(k, c, 3, 3) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
    b = (rs.randn(k) * 0.1).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1])], "conv3x3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k, hw, hw])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    fp32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    fp32.ir_version = 10
    calib = [{"x": rs.rand(1, c, hw, hw).astype(np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        fin, fout = os.path.join(d, "fp32.onnx"), os.path.join(d, "qdq.onnx")
        onnx.save(fp32, fin)
        quantize_static(fin, fout, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        qdq = onnx.load(fout)
    return fp32, qdq, calib[0]["x"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per kernel")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--cache-dir", help="tuning cache (default: a fresh temporary directory)")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: ort_fp32,ort_int8,tvm_fp32,tvm_int8_plain,hago_int8_avx2,hago_int8_avx2_ms")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from hago.backend.compile import compile as hcompile
    from hago.backend.measure import measure, measure_onnxruntime

    import onnxruntime as ort

    fp32, qdq, x = conv_models()
    feeds = {"x": x}
    skip = set(filter(None, args.skip.split(",")))
    cache = args.cache_dir or tempfile.mkdtemp(prefix="hago-bench-conv-")
    rows = []
    ref_fp = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ref_q = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    def add(name, stats, trials=None, tune_s=None, check=None):
        rows.append({"name": name, "median_ms": stats.median_ms, "iqr_ms": stats.iqr_ms, "min_ms": stats.min_ms,
                     "n": stats.n, "trials": trials, "tune_s": tune_s, "check": check})
        print(f"  {name:<18} {stats}" + (f"  [{trials} trials, {tune_s:.0f} s tuning]" if trials is not None else "")
              + (f"  {check}" if check else ""), flush=True)

    print(f"conv 3x3 1x64x56x56 -> 64, {args.threads} thread(s), {args.trials} trials/kernel, cache {cache}", flush=True)
    if "ort_fp32" not in skip:
        add("ort fp32", measure_onnxruntime(fp32, feeds, threads=args.threads, repeat=args.repeat))
    if "ort_int8" not in skip:
        add("ort int8 (QDQ)", measure_onnxruntime(qdq, feeds, threads=args.threads, repeat=args.repeat))

    def tvm_row(name, model, ref, tol, **kw):
        t0 = time.perf_counter()
        art = hcompile(model, X86_AVX2, tune_trials=args.trials, cache_dir=cache, threads=args.threads, **kw)
        wall = time.perf_counter() - t0
        out = art.run(feeds)[0]
        err = float(np.abs(out - ref).max())
        check = f"max|diff| vs onnxruntime {err:.3g}" + (" OK" if err <= tol else " MISMATCH")
        add(name, measure(art, feeds, repeat=args.repeat, threads=args.threads), art.tuning.new_trials, wall, check)

    qstep = 0.0
    for n in qdq.graph.node:  # the output quantization step: one step of tolerance
        if n.op_type == "DequantizeLinear" and n.output[0] == qdq.graph.output[0].name:
            from onnx import numpy_helper

            inits = {i.name: i for i in qdq.graph.initializer}
            qstep = float(numpy_helper.to_array(inits[n.input[1]]))
    if "tvm_fp32" not in skip:
        tvm_row("tvm fp32", fp32, ref_fp, 1e-3)
    if "tvm_int8_plain" not in skip:
        tvm_row("tvm int8 plain", qdq, ref_q, qstep * 1.01, avx2_int8=False)
    if "hago_int8_avx2" not in skip:
        tvm_row("hago int8 avx2", qdq, ref_q, qstep * 1.01, avx2_int8=True)
    if "hago_int8_avx2_ms" not in skip:
        tvm_row("hago int8 avx2 ms", qdq, ref_q, qstep * 1.01, avx2_int8=True, int8_schedule="tune")

    by = {r["name"]: r for r in rows}
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; threads={args.threads}; "
          f"trials/kernel={args.trials}; load avg {os.getloadavg()[0]:.1f}")
    print(f"{'row':<18} {'median ms':>10} {'IQR':>7} {'trials':>7} {'tune s':>7} {'vs tvm fp32':>12} {'vs ort int8':>12}")
    for r in rows:
        vf = by.get("tvm fp32")
        vo = by.get("ort int8 (QDQ)")
        a = f"{vf['median_ms'] / r['median_ms']:.2f}x" if vf else "-"
        b = f"{vo['median_ms'] / r['median_ms']:.2f}x" if vo else "-"
        tr = "-" if r["trials"] is None else str(r["trials"])
        ts = "-" if r["tune_s"] is None else f"{r['tune_s']:.0f}"
        print(f"{r['name']:<18} {r['median_ms']:>10.3f} {r['iqr_ms']:>7.3f} {tr:>7} {ts:>7} {a:>12} {b:>12}")
    print("(ratios are speedups: >1 means this row is faster than the reference)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "trials": args.trials, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
