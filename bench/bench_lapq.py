"""LAPQ (Nahshan et al., "Loss Aware Post-training Quantization") vs per-tensor min-max and per-layer MSE
clipping at W4A4 on the MNIST example models and on PP-OCRv4 recognition.

    python bench/bench_lapq.py [--models mnist_cnn,mnist_resnet] [--calib 512] [--maxiter 1] [--maxfev N]
                               [--bcw on|round|bias|off] [--seeds K] [--wbits 4 --abits 4] [--json out.json]
                               [--protocol hago|reference] [--train-seeds 0,1,2] [--from-json out.json]
    python bench/bench_lapq.py --model ppocr_rec [--ocr-calib 8] [--ocr-lines 150] [--ocr-maxfev 60]
                               [--ocr-powell-top 8] [--ocr-wbits 4 --ocr-abits 4] [--ocr-loss kl|ctc]
                               [--ocr-per-channel] [--ocr-ends 8]

Setting: spec ``x86_avx512_vnni`` with 4-bit weights, **per tensor** (as in the paper),
and 4-bit asymmetric activations (``per_channel=False, weight_bits=4, activation_bits=4``).
For each model:

* min-max: observed activation ranges, max-abs weights;
* MSE: per-layer MSE-optimal clipping of activations (histogram) and weights;
* LAPQ as the reference code's README runs it (``-ba 4 -bw 4 --min_method Powell -maxi 1 -cs 512
  -bcw``): 512 calibration digits, cross-entropy with their labels, bias correction of the weights
  (``--bcw on``: realized on the integer grid, in the search and the written result; ``--bcw exact``:
  the reference's off-grid formula in the search), step 1 (Lp clippings for the
  reference's p grid ``linspace(2, 4, 10)``, parabola-refined p), step 2 (Powell on one multiplier per
  tensor, ``maxiter=1``, no evaluation cap).

Reported: top-1 on the 1,000 held-out digits, the calibration cross-entropy LAPQ
minimises (on the ``--calib`` training digits it was calibrated on), the number of
loss evaluations, and run time; with ``--bcw exact``, "LAPQ sim." is the search's own simulation with
the reference's exact (off-grid) weight correction, for comparison with the exported model.
``--engine-timing`` adds the time of one loss evaluation with the parametric QDQ model
against re-exporting the QDQ model and opening a new session per evaluation.

``ppocr_rec``: the loss LAPQ minimises is a distillation loss, KL(fp32 || quantized) of the output
distributions per time step over the calibration lines (``--ocr-loss kl``), or the recogniser's own
training loss, CTC against the texts of the rendered calibration lines (``--ocr-loss ctc``, the analogue of
LAPQ's cross-entropy with labels); ``--ocr-per-channel`` and ``--ocr-ends B`` (first and last layer at
``B`` bits, as the reference code leaves them unquantized) relax the MNIST setting; accuracy is character accuracy on ``--ocr-lines`` rendered lines
(``hago.examples.ocr``). To keep each method under 10 minutes on the 2-core machine: 8 calibration
lines, the p grid {2, 2.5, 3, 3.5, 4} over all tensors, and Powell restricted to the
``--ocr-powell-top`` tensors with the largest relative quantization noise at the Lp init, at most
``--ocr-maxfev`` evaluations.

The paper (Nahshan et al., arXiv 1911.07190): its result tables could not be read from this machine (no
internet; the stored pages hold only the abstract) and the reference code's lapq/README.md has commands, no
table. Its abstract's claim, which this bench checks qualitatively: at 4 bits the loss landscape over the
clipping values is "highly non-separable with steep curvature", and quantizing "the layer parameters jointly"
gives "significant accuracy improvement over current post-training quantization methods".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hago  # noqa: E402
from hago.algorithms.lapq import ParamModel, apply_clipping, cross_entropy, lapq, lp_ranges  # noqa: E402
from hago.runtime import ort as rt  # noqa: E402
from common import add_network_args, mnist_model, network_seeds, paired  # noqa: E402

SPEC = "x86_avx512_vnni"
BCW = {"on": True, "round": "round", "exact": "exact", "off": False, "bias": "bias"}
OCR_P_GRID = (2.0, 2.5, 3.0, 3.5, 4.0)


def calib_ce(qg, x, y) -> float:
    return cross_entropy(qg.run({qg.graph.input_names[0]: x}), y, None)


def scores(qg, test, xc, yc, xte, yte) -> dict:
    """Held-out top-1 and cross-entropy, calibration cross-entropy."""
    return {"acc": qg.evaluate(test), "test_loss": calib_ce(qg, xte, yte), "calib_loss": calib_ce(qg, xc, yc)}


def engine_timing(qg, calib, n: int = 5) -> dict:
    """Seconds per loss evaluation: parametric model vs re-export + new session."""
    from hago.calibrate import activation_edges, collect_stats, finalize_derived

    g = qg.graph
    inp = g.input_names[0]
    x = np.concatenate([b[inp] for b in calib])
    y = np.concatenate([b["label"] for b in calib])
    names = [v.name for v, _ in activation_edges(g)] + [v.name for v, a in g.annotated() if a.kind == "weight"]
    obs = collect_stats(g, [{inp: b[inp]} for b in calib], [v.name for v, _ in activation_edges(g)], histogram=True)
    ranges = [lp_ranges(g, obs, names, p) for p in (2.0, 2.5, 3.0, 3.5, 4.0)][:n]
    anns = {nm: g.annotation(g.value(nm)) for nm in names}
    t0 = time.perf_counter()
    pm = ParamModel(g)
    build = time.perf_counter() - t0
    base = pm.params_from_annotations()
    t0 = time.perf_counter()
    for r in ranges:
        feeds = dict(base)
        for nm, (lo, hi) in r.items():
            feeds.update(pm.range_feeds(pm.edge_group[nm], lo, hi, anns[nm]))
        cross_entropy(pm.run({inp: x}, feeds), y, None)
    param = (time.perf_counter() - t0) / len(ranges)
    t0 = time.perf_counter()
    for r in ranges:
        for nm, (lo, hi) in r.items():
            anns[nm].set_range(lo, hi)
        finalize_derived(g)
        qg.invalidate()
        cross_entropy(qg.run({inp: x}), y, None)
    rebuild = (time.perf_counter() - t0) / len(ranges)
    return {"param_s": param, "param_build_s": build, "rebuild_s": rebuild}


def lp_init_scores(qg, r, score):
    """Scores of LAPQ's step 1 alone (the Lp init, bias correction folded as exported)."""
    apply_clipping(qg, r.init_clip, method=f"lp:{r.p:.3g}", fold=getattr(qg, "lapq_fold", None))
    out = score(qg)
    apply_clipping(qg, r.clip, method="lapq", fold=getattr(qg, "lapq_fold", None))
    return out


def run_lapq(qg, calib, a, **kw):
    t0 = time.perf_counter()
    r = lapq(qg, calib, maxiter=a.maxiter, maxfev=a.maxfev, bias_correction=BCW[a.bcw], **kw)
    dt = time.perf_counter() - t0
    info = {"seconds": dt, "p": r.p, "p_grid": {str(k): v for k, v in r.p_grid.items()}, "p_refined": r.p_refined,
            "init_loss": r.init_loss_qdq, "final_loss_qdq": r.final_loss_qdq, "sim_init_loss": r.init_loss,
            "sim_final_loss": r.final_loss, "powell_loss": r.powell_loss, "evals": r.evals, "tensors": len(r.edges),
            "per_eval_s": r.seconds["per_eval"], "reverted": r.reverted, "powell": r.powell,
            "bias_correction": r.bias_correction, "folded": len(r.folded)}
    return r, info


def run_model(name: str, a, calib_set: int = 0, train_seed: int = 0) -> dict:
    """One MNIST model; ``calib_set`` k takes training digits [k*calib, (k+1)*calib) for calibration
    (disjoint sets for --seeds); ``train_seed`` picks the trained network (0: the shipped one)."""
    from hago.examples import datasets

    n_calib = a.calib
    path = mnist_model(name, train_seed, a.seed_dir)
    g = hago.load(path)
    inp = g.input_names[0]
    xtr, ytr = datasets.mnist("train")
    xte, yte = datasets.mnist("test")
    lo = calib_set * n_calib
    if lo + n_calib > len(xtr):
        raise SystemExit(f"--seeds: only {len(xtr) // n_calib} disjoint sets of {n_calib} training digits")
    xc, yc = xtr[lo:lo + n_calib], ytr[lo:lo + n_calib]
    calib = list(datasets.batches(xc, 128, inp, yc))
    test = list(datasets.batches(xte, 250, inp, yte))
    out = {"model": name, "calib_samples": n_calib, "calib_set": calib_set, "train_seed": train_seed, "bcw": a.bcw,
           "maxiter": a.maxiter,
           "maxfev": a.maxfev}
    fp = rt.session(g.to_onnx())
    from hago.pipeline import evaluate

    out["fp32"] = {"acc": evaluate(lambda f: fp.run(None, f), test),
                   "test_loss": cross_entropy(fp.run(None, {inp: xte}), yte, None),
                   "calib_loss": cross_entropy(fp.run(None, {inp: xc}), yc, None)}
    kw = dict(per_channel=False, weight_bits=a.wbits, activation_bits=a.abits, sparq=None)
    low = None
    if a.protocol == "reference":
        over, low = reference_tensors(g, a.wbits, a.abits)
        kw |= dict(weight_bits=8, activation_bits=8, overrides=over)
        out["protocol"] = {"low_bit": sorted(low)}
    for label, m in (("minmax", "minmax"), ("mse", "mse")):
        t0 = time.perf_counter()
        qg = hago.quantize(g, SPEC, calib, method=m, weight_method=m, **kw)
        dt = time.perf_counter() - t0
        out[label] = scores(qg, test, xc, yc, xte, yte) | {"seconds": dt}
    if a.engine_timing:
        qg = hago.quantize(g, SPEC, calib, method="mse", weight_method="mse", **kw)
        out["engine"] = engine_timing(qg, calib)
    qg = hago.quantize(g, SPEC, calib, method="mse", weight_method="mse", **kw)
    r, info = run_lapq(qg, calib, a, edges=low)
    out["lapq"] = scores(qg, test, xc, yc, xte, yte) | info
    if r.bias_correction == "exact":  # the reference code's exact (float, off-grid) weight correction
        sim = [r.simulate({inp: b[inp]})[0].argmax(1) for b in test]
        out["lapq"]["sim_acc"] = float(np.mean(np.concatenate(sim) == yte))
        out["lapq"]["sim_test_loss"] = cross_entropy(r.simulate({inp: xte}), yte, None)
    out["lp_init"] = lp_init_scores(qg, r, lambda q: scores(q, test, xc, yc, xte, yte)) | {"p": r.p}
    return out


# ------------------------------------------------------------------------------------------------
# PP-OCRv4 recognition: no labels for the loss, so a distillation loss (KL to the fp32 model)
# ------------------------------------------------------------------------------------------------

def kl_probs(outputs, labels, ref) -> float:
    """Mean over lines and time steps of KL(p_fp32 || p_quantized); the model's output is already a softmax
    over its 6,625 classes."""
    eps = 1e-8
    p = np.clip(ref[0].astype(np.float64), eps, 1.0)
    q = np.clip(outputs[0].astype(np.float64), eps, 1.0)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))


def reference_tensors(g, wbits: int, abits: int) -> tuple[dict, list]:
    """The tensors the reference code quantizes (``layer_scale_optimization_opt.py``: the Conv2d weights but the
    first and the last, the ReLU outputs but the first and the last; the Linear layer and every other tensor stay
    float): overrides setting those to ``wbits`` / ``abits``, and their names. The caller quantizes the rest at
    8 bits, hago's stand-in for float, and LAPQ optimises only the low-bit tensors."""
    convs = [n for n in g.nodes() if n.op_type == "Conv" and n.inputs[1] is not None
             and n.inputs[1].const_value is not None]
    relus = [n for n in g.nodes() if n.op_type == "Relu"]
    over = {n.inputs[1].name: {"bits": wbits} for n in convs[1:-1]}
    over |= {n.outputs[0].name: {"bits": abits} for n in relus[1:-1]}
    return over, list(over)


def end_overrides(g, bits: int) -> dict:
    """Overrides that set the weight and the input of the first and the last Conv / Gemm / MatMul with a
    constant weight to ``bits`` (the reference code leaves those two layers unquantized)."""
    weighted = [n for n in g.nodes() if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.inputs) > 1
                and n.inputs[1] is not None and n.inputs[1].const_value is not None]
    return {v.name: {"bits": bits} for n in weighted[:1] + weighted[-1:] for v in n.inputs[:2]}


def run_ocr(a) -> dict:
    from hago.examples import ocr

    g = hago.load(ocr.model_path())
    inp = g.input_names[0]
    images, texts = ocr.dataset(n=a.ocr_lines, seed=0)
    calib, ctc = ocr.ctc_calibration(a.ocr_calib, seed=1, name=inp)
    xc = np.concatenate([b[inp] for b in calib])

    fp = rt.session(g.to_onnx())
    ref_c = fp.run(None, {inp: xc})
    ref_t = [fp.run(None, {inp: images[i:i + 16]})[0] for i in range(0, len(images), 16)]
    fp_pred = ocr.predict(g.to_onnx(), images)

    def score(qg):
        model = qg.to_qdq()
        pred = ocr.predict(model, images, optimize="basic")
        sess = qg.session()
        test_kl = float(np.mean([kl_probs(sess.run(None, {inp: images[i:i + 16]}), None, [ref_t[k]])
                                 for k, i in enumerate(range(0, len(images), 16))]))
        return {"acc": ocr.char_accuracy(pred, texts), "agree": ocr.char_accuracy(pred, fp_pred),
                "test_loss": test_kl, "calib_kl": kl_probs(out_c := qg.run({inp: xc}), None, ref_c),
                "calib_ctc": ctc(out_c, np.arange(len(xc)))}

    out = {"model": "ppocr_rec", "calib_samples": a.ocr_calib, "test_lines": a.ocr_lines, "bcw": a.bcw,
           "maxiter": a.maxiter, "maxfev": a.ocr_maxfev, "edges": a.ocr_edges, "powell_top": a.ocr_powell_top,
           "bits": [a.ocr_wbits, a.ocr_abits], "per_channel": a.ocr_per_channel, "ends": a.ocr_ends,
           "loss": a.ocr_loss,
           "fp32": {"acc": ocr.char_accuracy(fp_pred, texts), "agree": 1.0, "test_loss": 0.0, "calib_kl": 0.0,
                    "calib_ctc": ctc(ref_c, np.arange(len(xc)))}}
    kw = dict(per_channel=a.ocr_per_channel, weight_bits=a.ocr_wbits, activation_bits=a.ocr_abits, sparq=None,
              overrides=end_overrides(g, a.ocr_ends) if a.ocr_ends else None)
    for label, m in (("minmax", "minmax"), ("mse", "mse")):
        t0 = time.perf_counter()
        qg = hago.quantize(g, SPEC, calib, method=m, weight_method=m, **kw)
        dt = time.perf_counter() - t0
        out[label] = score(qg) | {"seconds": dt}
        print(f"  ppocr_rec {label}: {out[label]}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    qg = hago.quantize(g, SPEC, calib, method="mse", weight_method="mse", **kw)
    t_q = time.perf_counter() - t0
    include = {"all": ("weight", "activation"), "weights": ("weight",), "activations": ("activation",)}[a.ocr_edges]
    a2 = argparse.Namespace(**vars(a))
    a2.maxfev = a.ocr_maxfev
    r, info = run_lapq(qg, calib, a2, loss=ctc if a.ocr_loss == "ctc" else kl_probs, include=include, p_grid=OCR_P_GRID,
                       powell_edges=a.ocr_powell_top or None)
    info["powell_edges"] = r.powell_edges
    info["stage_seconds"] = r.seconds
    info["seconds"] += t_q
    out["lapq"] = score(qg) | info
    out["lp_init"] = lp_init_scores(qg, r, score) | {"p": r.p}
    print(f"  ppocr_rec lapq: {out['lapq']}", file=sys.stderr, flush=True)
    return out


def seeds_summary(rows: list, names) -> None:
    """Each MNIST method's mean (std) over the runs in ``rows`` (calibration sets, and trained networks when
    there are several training seeds: then also one row per trained network)."""
    n = max(sum(r["model"] == name for r in rows) for name in names)
    seeds = list(dict.fromkeys(r.get("train_seed", 0) for r in rows))
    what = "disjoint calibration sets" if len(seeds) == 1 else \
        f"runs ({len(seeds)} trained networks x their disjoint calibration sets)"
    print(f"\nMean over {n} {what} (std): top-1 % on the 1,000 test digits, held-out CE / "
          f"calibration CE; wins = runs where LAPQ's top-1 / held-out CE is better than both baselines")
    print("| model | min-max | MSE | Lp init | LAPQ | LAPQ wins (top-1 / CE) |")
    print("|---|---|---|---|---|---|")
    groups = [(name, [r for r in rows if r["model"] == name]) for name in names]
    if len(seeds) > 1:
        groups += [(f"{name} (training seed {sd})", [r for r in rows if r["model"] == name and
                                                     r.get("train_seed", 0) == sd])
                   for name in names for sd in seeds]
    for name, rs in groups:
        if not rs:
            continue

        def m(key, field, scale=1.0, fmt=".4f"):
            v = np.array([r[key][field] for r in rs]) * scale
            return f"{v.mean():{fmt}} ({v.std():{fmt}})"

        cells = [f"{m(k, 'acc', 100, '.2f')} %, {m(k, 'test_loss')} / {m(k, 'calib_loss')}"
                 for k in ("minmax", "mse", "lp_init", "lapq")]
        wa = sum(r["lapq"]["acc"] > max(r["minmax"]["acc"], r["mse"]["acc"]) for r in rs)
        wl = sum(r["lapq"]["test_loss"] < min(r["minmax"]["test_loss"], r["mse"]["test_loss"]) for r in rs)
        print(f"| {name} | " + " | ".join(cells) + f" | {wa} / {wl} of {len(rs)} |", flush=True)
    if len(rows) > 1:
        print("\nLAPQ minus each baseline in top-1 over all runs (points, mean +- standard error; runs above / equal / "
              "below)")
        for name in names:
            rs = [r for r in rows if r["model"] == name]
            if len(rs) < 2:
                continue
            parts = []
            for b, lab in (("minmax", "min-max"), ("mse", "MSE"), ("lp_init", "Lp init")):
                d = np.array([r["lapq"]["acc"] - r[b]["acc"] for r in rs]) * 100
                parts.append(f"{lab} {paired(d)}")
            print(f"{name}: " + "; ".join(parts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", "--model", dest="models", default="mnist_cnn,mnist_resnet",
                    help="comma-separated: mnist_cnn, mnist_resnet, mnist_plain, ppocr_rec")
    ap.add_argument("--calib", type=int, default=512, help="calibration digits (from the training split; the "
                    "reference code's -cs 512)")
    ap.add_argument("--maxfev", type=int, default=None, help="Powell's budget of loss evaluations (none: the "
                    "reference code sets none)")
    ap.add_argument("--maxiter", type=int, default=1, help="Powell iterations (reference README: 1, or 2 for resnet18)")
    ap.add_argument("--bcw", choices=sorted(BCW), default="on",
                    help="bias correction of the weights (the reference code's -bcw): on / round = on the integer grid "
                         "(mean-preserving rounding), searched and written; exact = the reference's off-grid formula "
                         "in the search, written on the grid; bias = folded into the biases; off")
    ap.add_argument("--protocol", choices=("hago", "reference"), default="hago",
                    help="MNIST: which tensors take the low bits: hago = every annotated tensor (the baselines' "
                         "setting); reference = the reference code's (Conv weights and ReLU outputs, each but the "
                         "first and the last), the others at 8 bits, LAPQ optimising the low-bit ones only")
    ap.add_argument("--wbits", type=int, default=4, help="MNIST: weight bits (per tensor)")
    ap.add_argument("--abits", type=int, default=4, help="MNIST: activation bits")
    ap.add_argument("--seeds", type=int, default=1,
                    help="MNIST: repeat on K disjoint calibration sets (training digits [k*calib, (k+1)*calib)) and "
                         "report each method's mean and spread: one 1,000-digit test set resolves about +-0.4 points")
    add_network_args(ap)
    ap.add_argument("--from-json", default=None,
                    help="print the --seeds summary of a previous run's --json file and exit")
    ap.add_argument("--engine-timing", action="store_true", help="also time the parametric model vs rebuild")
    ap.add_argument("--ocr-calib", type=int, default=8, help="ppocr_rec: calibration lines")
    ap.add_argument("--ocr-lines", type=int, default=150, help="ppocr_rec: rendered test lines")
    ap.add_argument("--ocr-maxfev", type=int, default=60, help="ppocr_rec: Powell's budget of loss evaluations")
    ap.add_argument("--ocr-edges", choices=("all", "weights", "activations"), default="all",
                    help="ppocr_rec: the tensors LAPQ sets (p search and Powell)")
    ap.add_argument("--ocr-powell-top", type=int, default=8,
                    help="ppocr_rec: Powell optimises only the K tensors with the largest relative quantization "
                         "noise at the Lp init (0: all); the others keep their Lp clipping")
    ap.add_argument("--ocr-wbits", type=int, default=4)
    ap.add_argument("--ocr-abits", type=int, default=4)
    ap.add_argument("--ocr-loss", choices=("kl", "ctc"), default="kl",
                    help="ppocr_rec: the loss LAPQ minimises: KL to fp32 (distillation) or CTC against the texts of "
                         "the calibration lines (the model's training loss, as LAPQ's CE with labels)")
    ap.add_argument("--ocr-per-channel", action="store_true",
                    help="ppocr_rec: per-channel weights (default per tensor, as on MNIST)")
    ap.add_argument("--ocr-ends", type=int, default=0,
                    help="ppocr_rec: bits of the first and last layer's weight and input (0: same as the rest; the "
                         "reference code leaves those two layers unquantized)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            old = [r for r in json.load(f) if r["model"] != "ppocr_rec"]
        seeds_summary(old, list(dict.fromkeys(r["model"] for r in old)))
        return
    t_all = time.perf_counter()
    rows = []
    names = a.models.split(",")
    mnist = [n for n in names if n != "ppocr_rec"]
    if mnist:
        proto = ("" if a.protocol == "hago" else "; the reference code's tensors at those bits (Conv weights and "
                 "ReLU outputs but the first and last), the rest 8-bit")
        print(f"W{a.wbits}A{a.abits} (x86_avx512_vnni, per-tensor {a.wbits}-bit weights, {a.abits}-bit activations{proto}). "
              "Each cell: top-1 and CE on the "
              f"1,000 test digits / CE on the {a.calib} calibration digits (the loss LAPQ minimises); seconds. "
              f"LAPQ: bias correction {a.bcw}, Powell maxiter {a.maxiter}, maxfev {a.maxfev}")
        print("| model | fp32 | min-max | MSE | Lp init (p) | LAPQ | LAPQ sim. (exact bcw) | LAPQ evals |")
        print("|---|---|---|---|---|---|---|---|")
    train_seeds = network_seeds(a)
    for name, sd, k in [(n, sd, k) for n in mnist for sd in train_seeds for k in range(a.seeds)]:
        r = run_model(name, a, k, sd)
        rows.append(r)
        label = name if a.seeds == 1 else f"{name} (set {k})"
        if len(train_seeds) > 1:
            label = f"{name} (seed {sd}, set {k})"

        def c(d):
            t = f", {d['seconds']:.0f} s" if "seconds" in d else ""
            return f"{d['acc'] * 100:.1f} %, {d['test_loss']:.4f} / {d['calib_loss']:.4f}{t}"

        L = r["lapq"]
        sim = (f"{L['sim_acc'] * 100:.1f} %, {L['sim_test_loss']:.4f} / {L['sim_final_loss']:.4f}"
               if "sim_acc" in L else "-")
        print(f"| {label} | {c(r['fp32'])} | {c(r['minmax'])} | {c(r['mse'])} | {c(r['lp_init'])} (p={r['lp_init']['p']:.2f}) "
              f"| {c(L)} | {sim} | {L['evals']} ({L['tensors']} tensors, {L['per_eval_s']:.2f} s/eval) |", flush=True)
    if a.seeds > 1 or len(train_seeds) > 1:
        seeds_summary(rows, mnist)
    for r in rows:
        beats = r["lapq"]["calib_loss"] < min(r["minmax"]["calib_loss"], r["mse"]["calib_loss"])
        acc_ok = r["lapq"]["acc"] >= max(r["minmax"]["acc"], r["mse"]["acc"])
        print(f"{r['model']} (seed {r['train_seed']}, set {r['calib_set']}): LAPQ calibration loss {'below' if beats else 'NOT below'} both baselines "
              f"({r['lapq']['calib_loss']:.4f} vs min-max {r['minmax']['calib_loss']:.4f}, MSE {r['mse']['calib_loss']:.4f}); "
              f"held-out top-1 {r['lapq']['acc'] * 100:.1f} % vs {r['minmax']['acc'] * 100:.1f} / {r['mse']['acc'] * 100:.1f} % "
              f"({'>=' if acc_ok else 'NOT >='} both), "
              f"held-out CE {r['lapq']['test_loss']:.4f} vs {r['minmax']['test_loss']:.4f} / {r['mse']['test_loss']:.4f}")
    if "ppocr_rec" in names:
        r = run_ocr(a)
        rows.append(r)
        ends = f", first/last layer {a.ocr_ends}-bit" if a.ocr_ends else ""
        print(f"\nppocr_rec W{a.ocr_wbits}A{a.ocr_abits} (x86_avx512_vnni, "
              f"{'per-channel' if a.ocr_per_channel else 'per-tensor'} weights{ends}). Each cell: character "
              f"accuracy on {a.ocr_lines} rendered lines (agreement with fp32's reading); KL(fp32 || quantized) per "
              f"time step on those lines; on the {a.ocr_calib} calibration lines KL and CTC against their texts. "
              f"LAPQ minimises the calibration {a.ocr_loss.upper()} (LAPQ's own loss is CE with labels; KL is a "
              f"distillation stand-in, CTC the model's training loss); bias correction {a.bcw}, "
              f"p search over {a.ocr_edges} tensors, Powell over the {a.ocr_powell_top or 'all'} noisiest of them, "
              f"maxiter {a.maxiter}, maxfev {a.ocr_maxfev}")
        print("| method | char acc (agree) | KL test | KL / CTC calib | s |")
        print("|---|---|---|---|---|")
        for k, lab in (("fp32", "fp32"), ("minmax", "min-max"), ("mse", "MSE"), ("lp_init", f"Lp init (p={r['lp_init']['p']:.2f})"),
                       ("lapq", "LAPQ")):
            d = r[k]
            print(f"| {lab} | {d['acc'] * 100:.1f} % ({d['agree'] * 100:.1f} %) | {d['test_loss']:.4f} | "
                  f"{d['calib_kl']:.4f} / {d['calib_ctc']:.4f} | {d.get('seconds', float('nan')):.0f} |", flush=True)
        L = r["lapq"]
        print(f"LAPQ: {L['evals']} evaluations ({L['tensors']} tensors, {L['per_eval_s']:.2f} s/eval), Powell {L['powell']} "
              f"on {L['powell_edges']}; stage seconds " + ", ".join(f"{k} {v:.0f}" for k, v in L["stage_seconds"].items()))
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
