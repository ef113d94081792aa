"""SPARQ on real activations: 4-bit windows of 8-bit activations vs plain 4-bit activations.

    python bench/bench_sparq.py [--models mnist_cnn,mnist_resnet,mnist_mobilenetv2] [--calib 256] [--seeds 1]
                                [--train-seeds 0,1,2]

Weights are 8-bit per-channel (x86_avx512_vnni spec). For every activation that
enters a Conv/Gemm/MatMul and is non-negative (zero point 0, e.g. after ReLU):
A8 (reference), plain A4 (4-bit uniform, MSE-calibrated at 4 bits: the strongest
plain baseline), bSPARQ with 5/3/2 window placements, and vSPARQ (5 placements).
Each cell is "top-1 / logit SNR": top-1 on the 1,000 held-out MNIST digits (the QDQ model with bit-exact
trimming runs on onnxruntime) and the SNR in dB of its logits against fp32 on the same digits,
``10 log10(sum y^2 / sum (y_q - y)^2)`` (accuracy moves in steps of one digit; the SNR shows the activation
error each representation leaves). Also the fraction of activation pairs that take
vSPARQ's 8-bit path on the real calibration activations.

``--train-seeds`` repeats everything on independently trained networks of each architecture (seed 0: the
shipped model; others trained once by ``bench/models/train_mnist.py``, needs torch). With several runs the
summary gives, for each of the paper's two orderings, the mean top-1 difference over the runs with its
standard error: one test set of 1,000 digits moves top-1 in 0.1 steps, so single runs cannot rank variants
that differ by a digit.

The paper (Shomron et al., NeurIPS 2021, arXiv 2105.11010): its tables could not be read from this machine;
its abstract says "SPARQ achieves minor accuracy degradation, 2x speedup over widely used hardware
architectures, and a practical hardware implementation", and the reference code (gilshm/sparq README) names the
window placements opt5, opt3 and opt2 used here and works "on top 8-bit models".
hago has no SPARQ kernel: the speed-up appears only in the latency model, flagged as modeled.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hago  # noqa: E402
from hago.algorithms.sparq import vsparq  # noqa: E402
from hago.examples import datasets  # noqa: E402
from hago.runtime import ort as rt  # noqa: E402
from common import add_network_args, mnist_model, network_seeds, paired  # noqa: E402


VARIANTS = ("W8A8", "A4", "b5", "b3", "b2", "v5")
ORDER = (("b5", "A4"), ("v5", "b5"))  # the paper's two claims: bSPARQ > plain 4-bit, vSPARQ > bSPARQ


def logits(model, inp, test) -> np.ndarray:
    sess = rt.session(model, optimize="basic")
    return np.concatenate([sess.run(None, {inp: b[inp]})[0] for b in test], axis=0).astype(np.float64)


def compare(g, inp, calib, test, ref):
    """(top-1 per variant, logit SNR vs ``ref`` (fp32's test logits) per variant, 8-bit-path pair fractions)
    on one calibration set."""
    snr = {}

    def snr_of(qg):
        y = logits(qg.to_qdq(), inp, test)
        return float(10 * np.log10(np.sum(ref * ref) / max(float(np.sum((y - ref) ** 2)), 1e-30)))

    spec = "x86_avx512_vnni"
    base = hago.quantize(g, spec, calib, method="auto", sparq=None)
    res = {"W8A8": base.evaluate(test)}
    snr["W8A8"] = snr_of(base)
    sparq_edges = [v.name for v, ann in base.graph.annotated()
                   if ann.kind == "activation" and int(ann.zero_point) == 0
                   and any(u.node.op_type in ("Conv", "Gemm", "MatMul") for u in v.uses())]
    a4 = hago.quantize(g, spec, calib, method="mse", sparq=None,
                       overrides={e: {"bits": 4} for e in sparq_edges})
    res["A4"] = a4.evaluate(test)
    snr["A4"] = snr_of(a4)
    for label, mode, pl in (("b5", "bsparq", 5), ("b3", "bsparq", 3), ("b2", "bsparq", 2), ("v5", "vsparq", 5)):
        qg = hago.quantize(g, spec, calib, method="auto", sparq=mode)
        for _, ann in qg.graph.annotated():
            if ann.sparq:
                ann.sparq["placements"] = pl
        qg.invalidate()
        res[label] = qg.evaluate(test)
        snr[label] = snr_of(qg)
    # fraction of channel pairs with a zero on the real calibration activations
    model = base.to_qdq()
    # the quantized codes of each SPARQ edge: its QuantizeLinear output, or, where the QDQ export folded a Relu
    # into the quantizer of the Relu's input (zero point 0: the same codes), that quantizer's output
    relu_in = {n.output[0]: n.input[0] for n in g.to_onnx().graph.node if n.op_type == "Relu"}
    q_out = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    qn = [q_out.get(e) or q_out.get(relu_in.get(e, "")) for e in sparq_edges if e != inp]
    qn = [q for q in qn if q]
    outs = rt.session(rt.with_outputs(model, qn), optimize="basic").run(qn, calib[0]) if qn else []
    fr = [vsparq(o, pair_axis=1)[1]["frac_8bit_pairs"] for o in outs if o.ndim >= 2]
    return res, snr, fr


def summary(name: str, runs: list, fp32: list) -> None:
    """Mean row over ``runs`` ((top-1, SNR, fractions) per run), then per ordering of ORDER: top-1 wins / ties
    and SNR wins over the runs, and the mean top-1 difference with its standard error."""
    n = len(runs)
    means = {k: (np.mean([r[0][k] for r in runs]), np.mean([r[1][k] for r in runs])) for k in VARIANTS}
    cells = " | ".join(f"**{means[k][0] * 100:.2f} / {means[k][1]:.1f}**" for k in VARIANTS)
    frm = np.mean([np.mean(r[2]) for r in runs])
    print(f"| {name} **mean of {n}** | {np.mean(fp32) * 100:.2f} | {cells} | {frm * 100:.1f}% |", flush=True)
    parts = []
    for x, y in ORDER:
        d = np.array([r[0][x] - r[0][y] for r in runs]) * 100
        parts.append(f"{x} - {y}: top-1 {paired(d, 3)} points, SNR higher on {sum(r[1][x] > r[1][y] for r in runs)}")
    print(f"|  | over the {n} runs, mean top-1 difference +- standard error (runs above / equal / below): "
          + "; ".join(parts) + " | | | | | | | |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mnist_cnn,mnist_resnet,mnist_mobilenetv2")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=1,
                    help="run on this many disjoint calibration sets of --calib digits; print each and the mean")
    add_network_args(ap)
    a = ap.parse_args()
    train_seeds = network_seeds(a)
    xtr, _ = datasets.mnist("train")
    xte, yte = datasets.mnist("test")
    print("(cells: top-1 % / logit SNR dB vs fp32)")
    print("| model | fp32 | W8A8 | W8 plain A4 | bSPARQ opt5 | bSPARQ opt3 | bSPARQ opt2 | vSPARQ opt5 | 8-bit-path pairs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.models.split(","):
        runs, fp32s = [], []
        for tsd in train_seeds:
            g = hago.load(mnist_model(name, tsd, a.seed_dir))
            inp = g.input_names[0]
            test = list(datasets.batches(xte, 250, inp, yte))
            ref = logits(g.to_onnx(), inp, test)
            fp32 = float(np.mean(ref.argmax(1) == yte))
            for sd in range(a.seeds):
                if (sd + 1) * a.calib > len(xtr):
                    raise SystemExit(f"--seeds {sd + 1} x --calib {a.calib} needs more than {len(xtr)} training digits")
                calib = list(datasets.batches(xtr[sd * a.calib:(sd + 1) * a.calib], 64, inp))
                runs.append(compare(g, inp, calib, test, ref))
                fp32s.append(fp32)
                res, snr, fr = runs[-1]
                cells = " | ".join(f"{res[k] * 100:.2f} / {snr[k]:.1f}" for k in VARIANTS)
                tag = name if a.seeds == 1 else f"{name} (calibration set {sd})"
                if len(train_seeds) > 1:
                    tag = f"{name} (training seed {tsd}, calibration set {sd})"
                print(f"| {tag} | {fp32 * 100:.2f} | {cells} | {np.mean(fr) * 100:.1f}% |", flush=True)
        if len(runs) > 1:
            summary(name, runs, fp32s)

if __name__ == "__main__":
    main()
