"""Mixed precision with calibration loss not above fp32 (Cheng and Chen, arXiv 2207.10083) on the MNIST
example models, against the layer-input-error layout (arXiv 2202.05137) and a Hessian-style layout.

    python bench/bench_mixed_precision.py [--models mnist_resnet,mnist_plain] [--calib 192] [--json out.json]
    python bench/bench_mixed_precision.py --seeds 5 --train-seeds 0,1,2,3 [--seed-dir DIR]
    python bench/bench_mixed_precision.py --models ppocr_rec [--ocr-calib 16] [--ocr-lines 150]
                                          [--ocr-methods second_order,input_error]

Setting: spec ``x86_avx512_vnni`` (activations 4-8 bits, weights per channel), candidate
precisions {4, 6, 8} bits per layer input (the layer's weights follow), or float; loss =
cross-entropy on ``--calib`` training digits (the calibration set); held-out top-1 on the
1,000 test digits. For each model:

* ``second_order paper`` (the paper's layout: per-layer g.e + e'He/2 from central
  differences, knapsack "minimise bits subject to sum of Delta <= 0", measured, repaired);
* ``second_order`` (the same, then hago's measured refinement: keep lowering layers in
  order of increasing Delta while the measured loss stays <= fp32);
* ``first_order paper`` (g.e only, same knapsack, no refinement);
* ``input_error`` (2202.05137's criterion: greedy, lowest relative input error first,
  keep a step when the measured loss stays <= fp32);
* ``hessian`` (HAWQ-style: greedy by the curvature along the weight noise).

The sensitivities are measured once (by the first method) and reused by the others
("evals" counts the loss evaluations each layout search made on top of them).

Reported per model: fp32 loss and top-1; per method the selection's calibration loss
(must be <= fp32), the size-weighted average bits, the held-out top-1; the loss of all
layers at 8 and at 4 bits; and the *loss improvement available*: fp32 loss minus the
lowest measured loss among the layouts tried (the lowest-Delta layout, the selections,
all-8-bit). The paper's qualitative claim: networks with many identity mappings
(``mnist_resnet``) are robust to the noise and for the same reason hard to improve,
compared with the same network without skips (``mnist_plain``).

That claim is about architectures, not about one trained network of each, so ``--train-seeds`` repeats
the comparison over independently trained networks: training seed 0 is the shipped models, any other
seed ``k`` is ``bench/models/train_mnist.py --seed k`` (same recipe; needs torch, the ``[train]`` extra),
trained once into ``--seed-dir`` and reused. Each pair (training seed, calibration set) compares the two
architectures on the same digits.

``ppocr_rec`` (PP-OCRv4 recognition, rapidocr's model): the loss is the model's own training loss, CTC
(:func:`hago.examples.ocr.ctc_loss`) against the text of each rendered calibration line
(``--ocr-calib`` lines, another seed than the test lines); held-out accuracy is character accuracy on
``--ocr-lines`` rendered lines, read by onnxruntime from the exported QDQ model.
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
from common import SEED_DIR, add_network_args, mnist_model, network_seeds  # noqa: E402
from hago.algorithms.lapq import cross_entropy  # noqa: E402
from hago.algorithms.mixed_precision import FLOAT, select_precision  # noqa: E402
from hago.runtime import ort as rt  # noqa: E402

SPEC = "x86_avx512_vnni"
# (label, method, refine): "paper" rows are the knapsack layout alone, the others add hago's measured refinement
METHODS = (("second_order", "second_order", True), ("second_order paper", "second_order", False),
           ("first_order paper", "first_order", False), ("input_error", "input_error", True),
           ("hessian", "hessian", True))


LAYER_OPS = {"Conv", "Gemm", "MatMul"}


def _consumers(value) -> set:
    """Op types that read ``value`` (an IR value), looking through Relu/Clip (folded into the quantizer of their
    input)."""
    out = set()
    for use in value.uses():
        n = use.node
        out |= _consumers(n.outputs[0]) if n.op_type in ("Relu", "Clip") else {n.op_type}
    return out


def unit_kinds(g, units) -> dict:
    """Each unit (root activation edge) as ``"layer"`` (read only by Conv/Gemm/MatMul: a layer's input),
    ``"shared"`` (read by a layer and by an Add: in a residual network the block input, which the identity path
    carries too) or ``"other"`` (Add operands, pooling, Flatten)."""
    out = {}
    for u in units:
        c = _consumers(g.value(u))
        out[u] = ("layer" if c and c <= LAYER_OPS else "shared" if c & LAYER_OPS else "other")
    return out


def compare(out: dict, g, calib, calib_loss, accuracy, candidates, methods, *, loss=None, hessian=True,
            units="all", verbose=False) -> dict:
    """Fill ``out`` (which holds ``fp32``) with all-8 / all-4-bit and each method's selection.

    ``calib_loss(qg)``: a QuantizedGraph's loss on the calibration set; ``accuracy(qg)``: its held-out
    accuracy; ``loss``: the loss ``select_precision`` minimises (None: CE with the batches' labels)."""
    from hago.calibrate import activation_edges, collect_stats

    name, inp = out["model"], g.input_names[0]
    t0 = time.perf_counter()
    qg = hago.quantize(g, SPEC, calib, method="mse", weight_method="mse", sparq=None)
    obs = collect_stats(qg.graph, [{inp: b[inp]} for b in calib], [v.name for v, _ in activation_edges(qg.graph)],
                        histogram=True)
    out["setup_s"] = time.perf_counter() - t0
    for bits in (8, 4):
        q = hago.quantize(g, SPEC, calib, method="mse", weight_method="mse", sparq=None, activation_bits=bits,
                          weight_bits=bits)
        out[f"all{bits}"] = {"acc": accuracy(q), "calib_loss": calib_loss(q)}
        print(f"  {name} all {bits}-bit: {out[f'all{bits}']}", file=sys.stderr, flush=True)
    first = None
    best_loss = out["all8"]["calib_loss"]
    for m, method, refine in METHODS:
        if m not in methods:
            continue
        t0 = time.perf_counter()
        r = select_precision(qg, None, calib, candidates=candidates, method=method, observers=obs, loss=loss,
                             hessian=hessian and first is None, reuse=first, refine=refine, units=units,
                             verbose=verbose)
        dt = time.perf_counter() - t0
        if first is None:
            first = r
            out["sensitivity_evals"] = r.sensitivity_evals
            out["lowest_delta_layout_loss"] = r.min_loss
            out["units"] = len(r.unit_bits)
            out["unit_kind"] = units
            # measured loss change with only that layer input (and its weights) at each precision
            out["unit_delta"] = {u: {str(k): v["delta"] for k, v in d.items() if k != FLOAT}
                                 for u, d in r.sensitivities.items()}
        out[m] = {"calib_loss": r.quant_loss, "feasible": r.feasible, "fallback": r.fallback,
                  "avg_bits": r.avg_bits, "acc": accuracy(r.apply()), "evals": r.evals, "seconds": dt,
                  "predicted_delta": r.predicted_delta, "unit_bits": {k: str(v) for k, v in r.unit_bits.items()}}
        print(f"  {name} {m}: {({k: v for k, v in out[m].items() if k != 'unit_bits'})}", file=sys.stderr,
              flush=True)
        best_loss = min(best_loss, r.quant_loss, r.min_loss)
    out["best_measured_loss"] = best_loss
    out["improvement_available"] = out["fp32"]["calib_loss"] - best_loss
    out["improvement_available_rel"] = out["improvement_available"] / out["fp32"]["calib_loss"]
    out["report"] = first.report()
    return out


def run_model(name: str, n_calib: int, candidates, units="all", verbose=False, calib_set: int = 0,
              train_seed: int = 0, seed_dir: str = SEED_DIR) -> dict:
    """One MNIST model; calibration set ``calib_set`` k is training digits [k*n_calib, (k+1)*n_calib)."""
    from hago.examples import datasets
    from hago.pipeline import evaluate

    g = hago.load(mnist_model(name, train_seed, seed_dir))
    inp = g.input_names[0]
    xtr, ytr = datasets.mnist("train")
    xte, yte = datasets.mnist("test")
    lo = calib_set * n_calib
    if lo + n_calib > len(xtr):
        raise SystemExit(f"--seeds: only {len(xtr) // n_calib} disjoint sets of {n_calib} training digits")
    xc, yc = xtr[lo:lo + n_calib], ytr[lo:lo + n_calib]
    calib = list(datasets.batches(xc, 128, inp, yc))
    test = list(datasets.batches(xte, 250, inp, yte))
    fp = rt.session(g.to_onnx())
    out = {"model": name, "calib_samples": n_calib, "calib_set": calib_set, "train_seed": train_seed,
           "fp32": {"acc": evaluate(lambda f: fp.run(None, f), test),
                    "calib_loss": cross_entropy(fp.run(None, {inp: xc}), yc, None)}}
    return compare(out, g, calib, lambda q: cross_entropy(q.run({inp: xc}), yc, None), lambda q: q.evaluate(test),
                   candidates, [m for m, _, _ in METHODS], units=units, verbose=verbose)


def run_ocr(n_calib: int, n_lines: int, candidates, methods, units="weighted", verbose=False) -> dict:
    from hago.examples import ocr

    g = hago.load(ocr.model_path())
    inp = g.input_names[0]
    calib, ctc = ocr.ctc_calibration(n_calib, seed=1, name=inp)
    xc, idx = np.concatenate([b[inp] for b in calib]), np.arange(n_calib)
    images, texts = ocr.dataset(n_lines, seed=0)

    def acc(model):
        return ocr.char_accuracy(ocr.predict(model, images, optimize="basic"), texts)

    out = {"model": "ppocr_rec", "calib_samples": n_calib, "test_lines": n_lines,
           "fp32": {"acc": acc(g.to_onnx()), "calib_loss": ctc(rt.session(g.to_onnx()).run(None, {inp: xc}), idx)}}
    return compare(out, g, calib, lambda q: ctc(q.run({inp: xc}), idx), lambda q: acc(q.to_qdq()), candidates,
                   methods, loss=ctc, hessian=False, units=units, verbose=verbose)


def robustness_summary(rows: list, seed_dir: str = SEED_DIR) -> None:
    """Per model over the (training seed, calibration set) pairs: the relative loss increase of all 4-bit
    (how much the noise hurts) and the relative improvement available (how far below fp32 a layout got);
    then, pair by pair, on how many pairs the first model has the smaller of each (the paper: a network
    with identity mappings is more robust and harder to improve). With several training seeds, also the
    means per trained network."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    per = {m: [r for r in rows if r["model"] == m] for m in models}

    def hurt(r):
        return (r["all4"]["calib_loss"] - r["fp32"]["calib_loss"]) / r["fp32"]["calib_loss"]

    def imp(r):
        return r["improvement_available_rel"]

    kinds = {}
    for r in rows:
        key = (r["model"], r.get("train_seed", 0))
        if "unit_delta" in r and key not in kinds:
            kinds[key] = unit_kinds(hago.load(mnist_model(key[0], key[1], seed_dir)), r["unit_delta"])

    def _units(r, which):
        f = kinds[r["model"], r.get("train_seed", 0)]
        return [d for u, d in r["unit_delta"].items() if which is None or f.get(u) == which]

    def layer_harm(r, which=None):
        """Sum over the units of kind ``which`` (see :func:`unit_kinds`; None = all) of the loss increase with only
        that one at 4 bits, relative to fp32."""
        return sum(max(d.get("4", 0.0), 0.0) for d in _units(r, which)) / r["fp32"]["calib_loss"]

    def layer_gain(r, which=None):
        """Sum over the units of the largest loss decrease one of its precisions gives alone, relative."""
        return sum(max(-min(d.values(), default=0.0), 0.0) for d in _units(r, which)) / r["fp32"]["calib_loss"]

    def label(r):
        return f"s{r.get('train_seed', 0)}/c{r['calib_set']}"

    print()
    print("| model | all 4-bit loss increase, mean (per pair) | improvement available, mean (per pair) | "
          "second_order avg bits / top-1 (fp32) |")
    print("|---|---|---|---|")
    for m in models:
        rs = per[m]
        h = [hurt(r) * 100 for r in rs]
        ia = [imp(r) * 100 for r in rs]
        so = [r["second_order"] for r in rs if "second_order" in r]
        fp = np.mean([r["fp32"]["acc"] for r in rs]) * 100
        bits = f"{np.mean([d['avg_bits'] for d in so]):.2f} / {np.mean([d['acc'] for d in so]) * 100:.2f} % " \
               f"({fp:.2f} %)" if so else "-"
        print(f"| {m} | {np.mean(h):+.1f} % ({' / '.join(f'{x:+.1f}' for x in h)}) | "
              f"{np.mean(ia):+.1f} % ({' / '.join(f'{x:+.1f}' for x in ia)}) | {bits} |")
    print("pairs, in order: " + ", ".join(label(r) for r in per[models[0]]) + " (s = training seed, c = calibration set)")
    if all("unit_delta" in r for r in rows):
        print()
        print("Per unit (a quantized activation edge with the weights of the layers reading it), measured alone (the "
              "paper's view: the loss moves through the noise on each layer's input): sum of the loss increases at 4 "
              "bits, and sum of the largest decreases any precision gives, both relative to fp32; mean over the pairs "
              "(per pair). Kinds: layer inputs read only by a Conv/Gemm; block inputs read by a Conv and by the "
              "identity path's Add (shared); the others (Add operands, pooling, Flatten)")
        print("| model | units | sum of 4-bit increases | sum of available decreases |")
        print("|---|---|---|---|")
        for m in models:
            rs = per[m]
            for which, what in ((None, "all"), ("layer", "layer inputs"), ("shared", "shared with an identity path"),
                                ("other", "the others")):
                n_u = len(_units(rs[0], which))
                if not n_u:
                    continue
                hs, gs = [layer_harm(r, which) * 100 for r in rs], [layer_gain(r, which) * 100 for r in rs]
                print(f"| {m} | {n_u} ({what}) | {np.mean(hs):+.1f} % ({' / '.join(f'{x:+.1f}' for x in hs)}) | "
                      f"{np.mean(gs):.1f} % ({' / '.join(f'{x:.1f}' for x in gs)}) |")
    seeds = list(dict.fromkeys(r.get("train_seed", 0) for r in rows))
    if len(seeds) > 1:
        print()
        print("| model | training seed | fp32 top-1 | fp32 calib loss | all 4-bit loss increase | improvement available |")
        print("|---|---|---|---|---|---|")
        for m in models:
            for sd in seeds:
                rs = [r for r in per[m] if r.get("train_seed", 0) == sd]
                print(f"| {m} | {sd} | {rs[0]['fp32']['acc'] * 100:.1f} % | "
                      f"{np.mean([r['fp32']['calib_loss'] for r in rs]):.4f} | "
                      f"{np.mean([hurt(r) for r in rs]) * 100:+.1f} % | {np.mean([imp(r) for r in rs]) * 100:+.1f} % |")
    if len(models) == 2 and [label(r) for r in per[models[0]]] == [label(r) for r in per[models[1]]]:
        a, b = per[models[0]], per[models[1]]
        n = len(a)
        print(f"pairs where {models[0]} is hurt less than {models[1]} by all 4-bit: "
              f"{sum(hurt(x) < hurt(y) for x, y in zip(a, b))} of {n}; "
              f"pairs where it has less improvement available: {sum(imp(x) < imp(y) for x, y in zip(a, b))} of {n}")
        if all("unit_delta" in r for r in rows):
            print(f"per unit: pairs where {models[0]}'s 4-bit increases sum lower: "
                  f"{sum(layer_harm(x) < layer_harm(y) for x, y in zip(a, b))} of {n} (layer inputs only: "
                  f"{sum(layer_harm(x, 'layer') < layer_harm(y, 'layer') for x, y in zip(a, b))}); its available "
                  f"decreases sum lower: {sum(layer_gain(x) < layer_gain(y) for x, y in zip(a, b))} of {n} (layer "
                  f"inputs only: {sum(layer_gain(x, 'layer') < layer_gain(y, 'layer') for x, y in zip(a, b))})")
        if len(seeds) > 1:
            by = {sd: ([r for r in a if r.get("train_seed", 0) == sd], [r for r in b if r.get("train_seed", 0) == sd])
                  for sd in seeds}
            print(f"trained networks (means over their calibration sets) where {models[0]} is hurt less: "
                  f"{sum(np.mean([hurt(r) for r in x]) < np.mean([hurt(r) for r in y]) for x, y in by.values())} "
                  f"of {len(seeds)}; where it has less improvement available: "
                  f"{sum(np.mean([imp(r) for r in x]) < np.mean([imp(r) for r in y]) for x, y in by.values())} "
                  f"of {len(seeds)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist_resnet,mnist_plain")
    ap.add_argument("--calib", type=int, default=192)
    ap.add_argument("--candidates", default="4,6,8")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seeds", type=int, default=1,
                    help="MNIST: run on K disjoint calibration sets (training digits [k*calib, (k+1)*calib)) and "
                         "compare the models' robustness (loss increase at all 4-bit) and improvement available "
                         "set by set")
    ap.add_argument("--from-json", default=None,
                    help="print the robustness summary of a previous MNIST run's --json file and exit")
    add_network_args(ap)
    ap.add_argument("--ocr-calib", type=int, default=16, help="ppocr_rec: calibration lines (CTC loss)")
    ap.add_argument("--ocr-lines", type=int, default=150, help="ppocr_rec: rendered test lines")
    ap.add_argument("--ocr-methods", default="second_order,input_error",
                    help="ppocr_rec: which of the methods to run (" + ", ".join(m for m, _, _ in METHODS) + ")")
    ap.add_argument("--units", default=None, choices=("all", "weighted"),
                    help="layer inputs chosen: every quantized activation edge (all; MNIST default) or the inputs of "
                         "Conv/Gemm/MatMul layers, each with the quantized edges after it (weighted; ppocr_rec default)")
    ap.add_argument("--verbose", action="store_true",
                    help="print the number of layer inputs and sensitivity evaluations, each layer's sensitivities as "
                         "they are measured, and the per-layer sensitivity table")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as fh:
            robustness_summary([r for r in json.load(fh) if r["model"] != "ppocr_rec"], a.seed_dir)
        return
    cands = tuple(int(b) for b in a.candidates.split(","))
    t_all = time.perf_counter()
    rows = []
    print(f"spec {SPEC}, candidates {cands} bits or float per layer input; MNIST: CE on {a.calib} training digits, "
          f"top-1 on 1,000 test digits; ppocr_rec: CTC on {a.ocr_calib} calibration lines, character accuracy on "
          f"{a.ocr_lines} test lines")
    print("| model | method | calib loss (fp32) | <= fp32 | avg bits | top-1 (fp32) | evals | s |")
    print("|---|---|---|---|---|---|---|---|")
    train_seeds = network_seeds(a)
    jobs = [(n, 0, 0) for n in a.models.split(",") if n == "ppocr_rec"]
    jobs = [(n, sd, k) for sd in train_seeds for k in range(a.seeds) for n in a.models.split(",")
            if n != "ppocr_rec"] + jobs
    for name, sd, k in jobs:
        if name == "ppocr_rec":
            r = run_ocr(a.ocr_calib, a.ocr_lines, cands, a.ocr_methods.split(","), a.units or "weighted", a.verbose)
        else:
            r = run_model(name, a.calib, cands, a.units or "all", a.verbose, calib_set=k, train_seed=sd,
                          seed_dir=a.seed_dir)
        rows.append(r)
        f = r["fp32"]
        label0 = name
        if name != "ppocr_rec" and (a.seeds > 1 or len(train_seeds) > 1):
            label0 = f"{name} (set {k})" if len(train_seeds) == 1 else f"{name} (seed {sd}, set {k})"
        for key, label in (("all8", "all 8-bit"), ("all4", "all 4-bit")):
            d = r[key]
            print(f"| {label0} | {label} | {d['calib_loss']:.4f} ({f['calib_loss']:.4f}) | "
                  f"{'yes' if d['calib_loss'] <= f['calib_loss'] else 'no'} | {key[-1]} | "
                  f"{d['acc'] * 100:.1f} % ({f['acc'] * 100:.1f} %) | - | - |")
        for m, _, _ in METHODS:
            if m not in r:
                continue
            d = r[m]
            print(f"| {label0} | {m}{' (' + d['fallback'] + ')' if d['fallback'] else ''} | {d['calib_loss']:.4f} "
                  f"({f['calib_loss']:.4f}) | {'yes' if d['feasible'] else 'no'} | {d['avg_bits']:.2f} | "
                  f"{d['acc'] * 100:.1f} % ({f['acc'] * 100:.1f} %) | {d['evals']} | {d['seconds']:.0f} |", flush=True)
        if a.verbose:
            print(r["report"])
    print()
    print("| model | layer inputs (units) | fp32 loss | lowest measured loss | improvement available | sensitivity evals |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        where = "" if "calib_set" not in r else f" (seed {r['train_seed']}, set {r['calib_set']})"
        print(f"| {r['model']}{where} | {r['units']} ({r['unit_kind']}) | {r['fp32']['calib_loss']:.4f} | {r['best_measured_loss']:.4f} | "
              f"{r['improvement_available']:+.4f} ({r['improvement_available_rel'] * 100:+.1f} %) | "
              f"{r['sensitivity_evals']} |")
    if a.seeds > 1 or len(train_seeds) > 1:
        robustness_summary([r for r in rows if r["model"] != "ppocr_rec"], a.seed_dir)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
