"""CUDA through hago's code generator: the three benchmark models (FP32 and INT8) compiled for the ``cuda_sm80``
spec; on a machine with a GPU also run, checked and timed.

    python bench/bench_cuda.py [--models squeezenet,mobilenetv2,resnet50] [--spec cuda_sm80] [--repeat 50]

Without a GPU (CI, the 2-core dev machine) this is a codegen check: each model must compile (kernels generated
by TVM's dlight GPU rules and built by nvcc / NVRTC). With a GPU it also runs each artifact and reports:
INT8 vs its own QDQ model in onnxruntime (top-1 agreement, max difference), FP32 vs onnxruntime FP32, and the
latency of hago INT8, TVM FP32 and onnxruntime (CPU provider; the GPU provider is not installed) side by side.
Set ``TVM_CUDA_COMPILE_MODE=nvcc`` to build with nvcc instead of NVRTC.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hago  # noqa: E402
from bench_search import get_model  # noqa: E402
from common import image_batches, machine  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="squeezenet,mobilenetv2,resnet50")
    ap.add_argument("--spec", default="cuda_sm80")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--calib", type=int, default=4)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from hago.backend.measure import measure, measure_onnxruntime

    spec = hago.load_spec(args.spec)
    print(f"machine: {machine()}; spec {args.spec} target {spec.target}; "
          f"TVM_CUDA_COMPILE_MODE={os.environ.get('TVM_CUDA_COMPILE_MODE', '(default)')}", flush=True)
    rows = []
    for name in args.models.split(","):
        g = hago.load(get_model(name))
        inp = g.input_names[0]
        shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
        calib = image_batches(shape, args.calib, 1, inp)
        feeds = image_batches(shape, 1, 7, inp)[0]
        qg = hago.quantize(g, spec, calib, method="minmax", progress=False)
        row = {"model": name}
        for kind, model in (("fp32", g), ("int8", qg)):
            t0 = time.perf_counter()
            try:
                art = hago.compile(model, spec, progress=False)
            except Exception as e:  # noqa: BLE001 - report and go on with the next model
                row[kind] = f"compile FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"{name} {kind}: {row[kind]}", flush=True)
                traceback.print_exc(limit=2)
                continue
            secs = time.perf_counter() - t0
            ok, why = art.runnable()
            msg = f"compiled in {secs:.0f} s"
            if ok:
                ref_model = g.to_onnx() if kind == "fp32" else qg.to_qdq()
                sess = ort.InferenceSession(ref_model.SerializeToString(), providers=["CPUExecutionProvider"])
                agree, diff = [], []
                for b in image_batches(shape, 8, 11, inp):
                    y, r = art.run(b)[0], sess.run(None, b)[0]
                    agree.append(int(np.argmax(y) == np.argmax(r)))
                    diff.append(float(np.abs(y - r).max()))
                st = measure(art, feeds, repeat=args.repeat)
                row[kind + "_ms"] = st.median_ms
                msg += (f"; top-1 agreement with onnxruntime {np.mean(agree) * 100:.0f}%, max |diff| {max(diff):.3g}; "
                        f"{st}")
            else:
                msg += f"; not run ({why})"
            row[kind] = msg
            print(f"{name} {kind}: {msg}", flush=True)
        if "fp32_ms" in row:
            row["ort_fp32_cpu_ms"] = measure_onnxruntime(g.to_onnx(), feeds, threads=os.cpu_count() or 1,
                                                         repeat=args.repeat).median_ms
        rows.append(row)
    print()
    for r in rows:
        line = f"{r['model']}: fp32 {r.get('fp32')}; int8 {r.get('int8')}"
        if "int8_ms" in r and "fp32_ms" in r:
            line += (f"; INT8 vs TVM FP32 {r['fp32_ms'] / r['int8_ms']:.2f}x, vs onnxruntime CPU FP32 "
                     f"{r['ort_fp32_cpu_ms'] / r['int8_ms']:.2f}x")
        print(line)
    return 0 if all("FAILED" not in str(r.get(k, "")) for r in rows for k in ("fp32", "int8")) else 1


if __name__ == "__main__":
    sys.exit(main())
