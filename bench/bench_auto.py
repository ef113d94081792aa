"""How ``method="auto"`` should choose: selection rules replayed on every candidate's test accuracy.

    python bench/bench_auto.py [--models ppocr_rec,mnist_cnn,mnist_mobilenetv2] [--specs x86_avx2,x86_avx512_vnni]
                               [--seeds 5] [--calib 32] [--ocr-lines 150] [--methods m1,m2,...]

For each model, spec and calibration set (the sets and the test data of ``bench_quantize.py``: set k is the k-th
block of training digits, or 32 rendered lines of calibration seed 1 + k), every candidate of
``hago.calibrate.auto.AUTO_METHODS`` is applied to the same statistics, exported, and

* its accuracy on the test data is measured, deployed on onnxruntime (as ``bench_quantize.py`` does);
* its per-sample errors against fp32 are computed on the calibration samples ``auto`` scores (the first batches up
  to ``SCORE_SAMPLES``), with ``auto``'s own :func:`hago.calibrate.auto.sample_errors`.

Then each rule picks a candidate per set from the errors alone, and the table gives the mean test accuracy of its
picks:

* ``lowest mean error``: the candidate with the lowest mean error (``auto`` before the twelfth session);
* ``reference always``: :data:`~hago.calibrate.auto.REFERENCE` on every set;
* ``reference unless z > Z``: :func:`hago.calibrate.auto.choose`, what ``auto`` does now;
* ``oracle``: the candidate with the best test accuracy (not available to a user: the ceiling).

``--methods`` replaces the candidates (default ``AUTO_METHODS``; it must include the reference), e.g. to see what
more candidates do to the rules.

The replay leaves out ``auto``'s race (which only stops scoring candidates far behind the leader), so a pick can
differ from ``hago.quantize(..., method="auto")`` where the race dropped a candidate early.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hago  # noqa: E402
from hago.calibrate import activation_edges, apply_ranges, run_observers  # noqa: E402
from hago.calibrate.auto import AUTO_METHODS, REFERENCE, SCORE_SAMPLES, Z_SWITCH, choose, sample_errors  # noqa: E402
from hago.ir.qdq import to_qdq  # noqa: E402
from hago.passes.annotate import AnnotateOptions, annotate  # noqa: E402
from hago.passes.partition import partition  # noqa: E402
from hago.runtime import ort as rt  # noqa: E402

RULES = ("lowest mean error", "reference always", f"reference unless z > {Z_SWITCH:g}", "oracle")


def candidates_on_set(path, spec, batches, accuracy, methods) -> dict:
    """``{method: (test accuracy, per-sample errors on the scored calibration samples)}`` for one set."""
    g = hago.load(path)
    partition(g, spec)
    annotate(g, spec, AnnotateOptions(activation_method="minmax"))
    sizes = [int(next(iter(b.values())).shape[0]) for b in batches]
    scored = max(1, int(np.searchsorted(np.cumsum(sizes), SCORE_SAMPLES) + 1))  # as calibrate_auto
    names = [v.name for v, _ in activation_edges(g)]
    obs, refs = run_observers(g, batches, names, histogram=True, keep_outputs=scored)
    out = {}
    for m in methods:
        apply_ranges(g, obs, method=m)
        model = to_qdq(g)
        sess = rt.session(model, optimize="basic")
        errs = np.concatenate([sample_errors(refs[i], rt.run(sess, batches[i], None, i)) for i in range(len(refs))])
        out[m] = (float(accuracy(model)[0]), errs)
    return out


def pick(rule: str, cands: dict) -> str:
    methods = list(cands)
    if rule == "lowest mean error":
        return min(methods, key=lambda m: (float(np.mean(cands[m][1])), methods.index(m)))
    if rule == "reference always":
        return REFERENCE
    if rule == "oracle":
        return max(methods, key=lambda m: (cands[m][0], -methods.index(m)))
    return choose({m: c[1] for m, c in cands.items()}, REFERENCE)[0]


def main():
    import bench_quantize as bq

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocr_rec,mnist_cnn,mnist_mobilenetv2")
    ap.add_argument("--specs", default="x86_avx2,x86_avx512_vnni")
    ap.add_argument("--seeds", type=int, default=None, help="calibration sets (default: 5 for ppocr_rec, 10 for MNIST)")
    ap.add_argument("--calib", type=int, default=None, help="samples per set (default: 32 lines, 128 digits)")
    ap.add_argument("--ocr-lines", type=int, default=150)
    ap.add_argument("--methods", default=",".join(AUTO_METHODS), help="the candidates (must include the reference)")
    a = ap.parse_args()
    methods = a.methods.split(",")
    if REFERENCE not in methods:
        raise SystemExit(f"--methods must include the reference {REFERENCE}")
    t_all = time.perf_counter()
    rows = []
    for name in a.models.split(","):
        ocr = name == "ppocr_rec"
        path, g0, calib, accuracy, _, metric = bq.ocr_task(a.ocr_lines) if ocr else bq.mnist_task(name)
        accuracy(g0.to_onnx())  # the fp32 reference predictions
        seeds = a.seeds or (5 if ocr else 10)
        n = a.calib or (32 if ocr else 128)
        for spec_name in a.specs.split(","):
            spec = hago.load_spec(spec_name)
            sets = []
            for k in range(seeds):
                cands = candidates_on_set(path, spec, calib(n, k), accuracy, methods)
                sets.append(cands)
                print(f"  [{name} {spec_name}] set {k}: " + ", ".join(
                    f"{m} {c[0] * 100:.2f} (err {np.mean(c[1]):.4g})" for m, c in cands.items()), flush=True)
            picks = {r: [pick(r, c) for c in sets] for r in RULES}
            means = {r: float(np.mean([c[p][0] for c, p in zip(sets, picks[r])])) * 100 for r in RULES}
            rows.append((name, spec_name, metric, means, picks))
    print(f"\nMean test accuracy of each rule's picks (per-set picks below the table); candidates "
          f"{', '.join(methods)}; reference {REFERENCE}")
    print("| model | spec | metric | " + " | ".join(RULES) + " |")
    print("|" + "---|" * (len(RULES) + 3))
    for name, spec_name, metric, means, _ in rows:
        print(f"| {name} | {spec_name} | {metric} | " + " | ".join(f"{means[r]:.2f}" for r in RULES) + " |")
    print()
    for name, spec_name, _, _, picks in rows:
        for r in RULES:
            print(f"{name} {spec_name} {r}: {' / '.join(picks[r])}")
    print(f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
