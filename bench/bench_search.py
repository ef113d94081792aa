"""The search driver against measured latency: hago's searched model vs FP32 vs all-INT8 vs onnxruntime INT8.

    python bench/bench_search.py [--models resnet50,squeezenet,shufflenet,mobilenetv2] [--measure onnxruntime|tvm]
                                 [--threads 1] [--budget 24] [--max-drop 1.0] [--spearman 40]

For each model (random-weight versions of the onnx package's light graphs; a
MobileNetV2-shaped graph from hago.examples.zoo), batch 1, in one run on this machine:
onnxruntime FP32; onnxruntime INT8 from ``quantize_static`` (QDQ, per-channel);
hago all-INT8 (x86_avx2 spec); and ``hago.search`` (model-based strategy) with
latency measured by ``--measure``. Accuracy without labels is top-1 agreement
with the float model on random inputs, budget ``--max-drop`` points.
``--spearman N`` measures N random configurations of the first model, fits the
xgboost latency model on 70% and reports the Spearman rank correlation of
predicted vs measured whole-model latency on the held-out 30%.
``--compare-strategies`` runs model-based, random and HAGO's greedy with the same
number of measured trials and prints their Pareto fronts.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hago  # noqa: E402
from common import image_batches, light, machine  # noqa: E402
from hago.search.latency import OrtLatency  # noqa: E402


def get_model(name):
    if name == "mobilenetv2":
        from hago.examples import zoo

        return zoo.mobilenetv2(input_size=224, seed=0)
    return light(name)


def ort_int8(model: onnx.ModelProto, calib, out_dir: str) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre, out = (os.path.join(out_dir, f) for f in ("m.onnx", "pre.onnx", "q.onnx"))
    onnx.save(model, src)
    quant_pre_process(src, pre, skip_symbolic_shape=True)

    class R:
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    quantize_static(pre, out, R(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return onnx.load(out)


class _Proto:
    def __init__(self, m):
        self.m = m

    def to_qdq(self):
        return self.m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,squeezenet,shufflenet,mobilenetv2")
    ap.add_argument("--measure", default="onnxruntime")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--spearman", type=int, default=0)
    ap.add_argument("--compare-strategies", action="store_true")
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--eval", type=int, default=32)
    a = ap.parse_args()
    print(f"machine: {machine()}; threads {a.threads}; measure {a.measure}; budget {a.budget} measured trials\n")
    ortl = OrtLatency(threads=a.threads, repeat=30, warmup=5)
    rows = []
    for name in a.models.split(","):
        model = get_model(name)
        g = hago.load(model)
        inp = g.input_names[0]
        shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
        calib = image_batches(shape, a.calib, 1, inp)
        ev = image_batches(shape, a.eval, 2, inp)
        with tempfile.TemporaryDirectory() as d:
            t_fp32 = ortl(_Proto(g.to_onnx()))
            t_ort8 = ortl(_Proto(ort_int8(g.to_onnx(), calib, d)))
        t0 = time.perf_counter()
        res = hago.search(g, "x86_avx2", calib, ev, max_drop=a.max_drop, strategy="model", budget=a.budget,
                          measure=a.measure if a.measure != "onnxruntime" else ortl, threads=a.threads, progress=False)
        t_search = time.perf_counter() - t0
        all_int = [t for t in res.history if not t.config.float_nodes and not t.config.bits and t.config.method == "mse"]
        best = res.best
        t_best = ortl(res.apply(g)) if a.measure == "onnxruntime" else best.latency_ms
        row = (name, t_fp32, t_ort8, all_int[0].latency_ms if all_int else float("nan"),
               all_int[0].accuracy if all_int else float("nan"), t_best, best.accuracy, len(best.config.float_nodes),
               len(res.history), t_search)
        rows.append(row)
        print(f"{name}: fp32 {t_fp32:.3f} ms, ort int8 {t_ort8:.3f} ms, hago all-int8 {row[3]:.3f} ms "
              f"(agree {row[4] * 100:.1f}%), hago searched {t_best:.3f} ms (agree {best.accuracy * 100:.1f}%, "
              f"{row[7]} float nodes), {row[8]} trials in {t_search:.0f} s", flush=True)
    print("\n| model | ORT fp32 ms | ORT int8 ms | hago all-int8 ms | hago searched ms | searched vs fp32 | searched vs ORT int8 | agreement (searched) | float nodes | search s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[5]:.3f} | {r[1] / r[5]:.2f}x | {r[2] / r[5]:.2f}x | "
              f"{r[6] * 100:.1f}% | {r[7]} | {r[9]:.0f} |")

    if a.spearman:
        name = a.models.split(",")[0]
        g = hago.load(get_model(name))
        inp = g.input_names[0]
        shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
        from hago.search.driver import Driver
        from hago.search.evaluate import Evaluator
        from hago.search.latency import FeatureMap, LatencyModel, spearman
        from hago.search.space import Config, build_space

        ev = Evaluator(g, hago.load_spec("x86_avx2"), image_batches(shape, 2, 1, inp), None)
        space = build_space(g, ev.spec)
        fm = FeatureMap(g, space)
        rs = np.random.RandomState(0)
        cfgs, lat = [], []
        for i in range(a.spearman):
            p = rs.rand()
            fl = [n for n in space.nodes if rs.rand() < p]
            cfg = Config.make({}, fl, "mse", space)
            cfgs.append(cfg)
            lat.append(ortl(ev.build(cfg)))
        X = np.stack([fm(c) for c in cfgs])
        y = np.array(lat)
        k = int(0.7 * len(y))
        m = LatencyModel().fit(X[:k], y[:k])
        pred = m.predict(X[k:])
        print(f"\nlatency model on {name}: trained on {k} measured configs, held-out {len(y) - k}: "
              f"Spearman {spearman(pred, y[k:]):.3f}; measured range {y.min():.2f}-{y.max():.2f} ms")

    if a.compare_strategies:
        name = a.models.split(",")[0]
        g = hago.load(get_model(name))
        inp = g.input_names[0]
        shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
        calib = image_batches(shape, a.calib, 1, inp)
        ev = image_batches(shape, a.eval, 2, inp)
        print(f"\nstrategies on {name}, {a.budget} measured trials each (accuracy = agreement %, latency ms):")
        for strat in ("model", "random", "greedy"):
            r = hago.search(g, "x86_avx2", calib, ev, max_drop=a.max_drop, strategy=strat, budget=a.budget,
                            measure=ortl if a.measure == "onnxruntime" else a.measure, threads=a.threads, progress=False)
            front = ", ".join(f"({t.accuracy * 100:.1f}, {t.latency_ms:.2f})" for t in r.pareto)
            b = r.best
            print(f"  {strat:<8} best ({b.accuracy * 100:.1f}%, {b.latency_ms:.3f} ms)  pareto: {front}")


if __name__ == "__main__":
    main()
