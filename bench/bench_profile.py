"""Where hago INT8 and onnxruntime INT8 spend their time on one model, conv by conv, 1 thread.

    python bench/bench_profile.py --model resnet50 [--spec host] [--cache-dir DIR] [--runs 20]

onnxruntime: the ``quantize_static`` QDQ model (as in ``bench_models.py``) with its profiler on (its per-node kernel
times, summed by op type and, for its fused ``QLinearConv`` nodes, by (input channels, output channels, output H, W)).
hago: ``hago.quantize`` + ``hago.compile`` (no new tuning; pass the ``bench_models.py`` database to use its records)
and the Relax VM profiler (``hago.backend.measure.profile``), summed by kernel kind and, for conv kernels, by the
same key. A hago conv kernel holds its epilogue (requantize, a residual add), which onnxruntime runs as separate
``QLinearAdd`` nodes, listed apart. Both profilers add a little time per call; compare rows, not the totals with
``bench_models.py``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hago  # noqa: E402
from bench_search import get_model, ort_int8  # noqa: E402
from common import image_batches, machine  # noqa: E402


def ort_profile(model, feeds, runs: int):
    """({op type: ms per run}, {conv key: ms per run}) of onnxruntime, 1 thread, all optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="hago-ortprof-"), "p")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    warm = 5
    for _ in range(warm + runs):
        sess.run(None, feeds)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    by_op, by_conv = collections.defaultdict(float), collections.defaultdict(float)
    n = warm + runs  # the profile covers every run; the per-node mean is what matters
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        a = e["args"]
        ms = e["dur"] / 1e3 / n
        by_op[a.get("op_name")] += ms
        if a.get("op_name") == "QLinearConv":  # onnxruntime runs it NHWC here: [N, H, W, C]
            x = list(a["input_type_shape"][0].values())[0]
            o = list(a["output_type_shape"][0].values())[0]
            by_conv[(x[-1], o[-1], o[1], o[2])] += ms
    return by_op, by_conv


def hago_profile(art, feeds, runs: int):
    """({kernel kind: ms per run}, {conv key: ms per run}) of a hago artifact (NHWC integer regions)."""
    from hago.backend.measure import profile

    by_kind, by_conv = collections.defaultdict(float), collections.defaultdict(float)
    for r in profile(art, feeds, runs=runs, threads=1):
        k, sh = r["kernel"], r["shapes"]
        if "conv2d" in k and len(sh) >= 3 and len(sh[0]) == 4 and len(sh[-1]) == 4:
            packed, depthwise = len(sh[1]) == 6, len(sh[1]) == 4 and sh[1][2] == 1 and sh[1][3] == sh[0][3]
            kind = f"conv {sh[1][1]}x{sh[1][2]}" if packed else ("depthwise conv" if depthwise else "conv (other)")
            if packed or depthwise:  # "other": e.g. an average pool done as a conv with ones
                by_conv[(sh[0][3], sh[-1][3], sh[-1][1], sh[-1][2])] += r["ms"]
        elif "dense" in k or "matmul" in k:
            kind = "matmul"
        elif "transpose" in k:
            kind = "transpose"
        elif "pool" in k:
            kind = "pool"
        elif "concat" in k:
            kind = "concat"
        elif k.startswith("vm.builtin"):
            kind = "VM builtins (" + k.split(".")[-1] + ")"
        else:
            kind = "other"
        by_kind[kind] += r["ms"]
    return by_kind, by_conv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--spec", default="host")
    ap.add_argument("--cache-dir")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--calib", type=int, default=8)
    a = ap.parse_args(argv)
    spec = hago.load_spec(a.spec)
    g = hago.load(get_model(a.model))
    inp = g.input_names[0]
    shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
    calib = image_batches(shape, a.calib, 1, inp)
    feeds = image_batches(shape, 1, 7, inp)[0]
    with tempfile.TemporaryDirectory() as d:
        q_ort = ort_int8(g.to_onnx(), calib, d)
    o_op, o_conv = ort_profile(q_ort, feeds, a.runs)
    qg = hago.quantize(g, spec, calib, method="minmax", progress=False)
    art = hago.compile(qg, spec, cache_dir=a.cache_dir, threads=1, progress=False)
    h_kind, h_conv = hago_profile(art, feeds, a.runs)
    print(f"machine: {machine()}; spec {spec.name}; model {a.model}; 1 thread; {a.runs} profiled runs\n")
    print(f"onnxruntime INT8, kernel sum {sum(o_op.values()):.2f} ms per run:")
    for k, v in sorted(o_op.items(), key=lambda x: -x[1]):
        print(f"  {k:<28} {v:8.3f} ms")
    print(f"hago INT8, kernel sum {sum(h_kind.values()):.2f} ms per run:")
    for k, v in sorted(h_kind.items(), key=lambda x: -x[1]):
        print(f"  {k:<28} {v:8.3f} ms")
    print("\nconvs by (input C, output C, output H, W), hago kernel (its epilogue included) vs onnxruntime QLinearConv:")
    print("| conv | hago ms | ORT ms | hago / ORT |")
    print("|---|---|---|---|")
    rows = [(h_conv.get(k, 0.0) - o_conv.get(k, 0.0), k) for k in set(h_conv) | set(o_conv)]
    for _diff, k in sorted(rows, reverse=True):
        h, o = h_conv.get(k, 0.0), o_conv.get(k, 0.0)
        print(f"| {k} | {h:.3f} | {o:.3f} | {h / o if o else float('nan'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
