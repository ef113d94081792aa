"""``method="auto"``: pick the activation threshold method whose quantized network is closest to fp32.

Cost, in runs of the model over the calibration batches:

* one float run per batch feeds every observer (min/max and a histogram) and
  keeps the float outputs as the reference;
* each candidate method's ranges come from those histograms (no run);
* the candidates are scored on one QDQ model whose activation quantization
  parameters (scales, zero points, clip bounds, bias codes: what differs between
  candidates) are graph inputs, so a candidate costs feeds, not a model export
  and a session; that session runs onnxruntime's float optimizations (layout,
  fusions) without its QDQ-to-integer fusion: hago's float simulation, faster;
* scoring races the candidates batch by batch: once ``min(16, n/4)`` samples
  are scored, a candidate whose mean error is more than ``RACE_RATIO`` times the
  best one's is dropped (never the reference, below), and scoring ends when one
  is left or after the batches that reach ``SCORE_SAMPLES`` samples (at least
  one; only their float outputs are kept). Candidates with identical parameters
  are scored once.

The error of a sample is the mean squared difference of its model outputs,
normalized by their variance over the batch (an inverse SQNR); for an output that
is a probability distribution (softmax scores), the fraction of its argmax
decisions that changed, with the squared error only breaking ties
(:func:`sample_errors`).

The choice is a paired test, not the bare minimum: auto keeps :data:`REFERENCE`
(percentile:99.99) unless another candidate's per-sample errors are lower by more
than :data:`Z_SWITCH` standard errors of the paired difference (:func:`choose`).
A few calibration samples rank close candidates by chance: on PP-OCRv4 rec (32
calibration lines, ~1,300 decisions) a candidate with a lower mean error by a few
changed decisions read 1.95 points fewer test characters right
(``bench/bench_auto.py`` replays the rules on every candidate's test accuracy).
"""
from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CalibrationError
from ..ir.graph import Graph
from ..runtime import ort as rt

AUTO_METHODS = ("minmax", "percentile:99.99", "percentile:99.9", "mse", "kl")
RACE_RATIO = 1.5
SCORE_SAMPLES = 64


#: the method auto keeps unless another is significantly closer to fp32 (the best single method on average over the
#: calibration draws of docs/BENCHMARKS.md); when it is not among the candidates, the first candidate
REFERENCE = "percentile:99.99"
#: how significant: the paired difference of per-sample errors (reference - candidate) must exceed this many
#: standard errors (a one-sided z statistic)
Z_SWITCH = 2.0

#: weight of the squared error beside the decision error of a distribution output (below one changed decision in a
#: thousand: it only breaks ties)
TIE_WEIGHT = 1e-3


def is_distribution(ref: np.ndarray) -> bool:
    """Whether ``ref`` (an fp32 output) is a probability distribution over its last axis (softmax scores: a
    classifier's, or a CTC recognizer's per time step): non-negative, at least two classes, rows summing to 1."""
    if ref.dtype.kind != "f" or ref.ndim < 2 or ref.shape[-1] < 2 or ref.size == 0:
        return False
    if float(ref.min()) < -1e-6:
        return False
    return bool(np.all(np.abs(ref.sum(axis=-1, dtype=np.float64) - 1.0) < 1e-3))


def sample_errors(refs: list[np.ndarray], outs: list[np.ndarray]) -> np.ndarray:
    """Per-sample error of a batch ``[N]``: over outputs, the sum of ``mean((ref - out)^2) / var(ref)`` (the
    variance over the batch: an inverse SQNR); for an output that is a probability distribution over its last axis,
    the fraction of the sample's rows whose most likely class changed, plus that squared error times
    :data:`TIE_WEIGHT`. What a user of softmax scores reads is their argmax: on PP-OCRv4 rec the squared error of the
    probabilities preferred, on two of five calibration sets, a threshold method that read 1.4 and 3.9 points fewer
    characters right than the one with fewer changed decisions. When the outputs do not share a leading batch axis
    the batch is one unit (``[1]``)."""
    lead = {int(r.shape[0]) if r.ndim else 0 for r in refs}
    n = lead.pop() if len(lead) == 1 else 0
    n = n if n >= 1 else 1  # no common batch axis: the batch is one unit
    err = np.zeros(n)
    for r, o in zip(refs, outs):
        d = (np.asarray(r, np.float64) - o).reshape(n, -1)
        sq = np.mean(d * d, axis=1) / (float(np.var(r)) + 1e-12)
        if is_distribution(r):
            changed = (np.argmax(r, axis=-1) != np.argmax(o, axis=-1)).reshape(n, -1)
            err += changed.mean(axis=1) + TIE_WEIGHT * sq
        else:
            err += sq
    return err


def output_error(refs: list[np.ndarray], outs: list[np.ndarray]) -> float:
    """The mean of :func:`sample_errors` over the batch."""
    return float(np.mean(sample_errors(refs, outs)))


def paired_z(ref: np.ndarray, cand: np.ndarray) -> float:
    """One-sided z statistic of ``mean(ref - cand)`` over paired per-sample errors: how many standard errors the
    candidate is better by. With one sample, or no spread, any improvement counts (``inf``)."""
    d = np.asarray(ref, np.float64) - np.asarray(cand, np.float64)
    m = float(d.mean()) if d.size else 0.0
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    if sd <= 1e-15 * max(1.0, float(np.abs(ref).max(initial=0.0))):
        return float("inf") if m > 0 else 0.0
    return m / (sd / np.sqrt(d.size))


def choose(errors: dict, reference, z_switch: float = Z_SWITCH) -> tuple[object, dict]:
    """The candidate to keep: among those whose per-sample ``errors`` are lower than the ``reference``'s by more
    than ``z_switch`` standard errors (:func:`paired_z`), the one with the lowest mean error; else the reference.
    A candidate whose errors are not all finite (NaN outputs) is never picked; one whose are beats a reference whose
    are not. Returns ``(key, {key: z})``."""
    ref = np.asarray(errors[reference], np.float64)
    finite = {k for k, e in errors.items() if np.all(np.isfinite(e))}
    if reference not in finite:  # the reference's outputs went NaN/Inf: any candidate with finite errors is better
        z = {k: (float("inf") if k in finite else 0.0) for k in errors}
    else:
        z = {k: (0.0 if k == reference or k not in finite else paired_z(ref, e)) for k, e in errors.items()}
    better = [k for k in errors if k != reference and k in finite and z[k] > z_switch]
    if not better:
        return reference, z
    return min(better, key=lambda k: float(np.mean(errors[k]))), z


def quant_params(graph: Graph) -> dict[str, np.ndarray]:
    """The initializers :func:`hago.ir.qdq.to_qdq` writes for activation and bias quantizers (the ones that
    depend on activation ranges), computed without exporting the model."""
    from ..ir.annotation import DTYPES, quantize_array
    from ..ir.qdq import _NP_DTYPE, _Q_DTYPES, _scale_zp

    out: dict[str, np.ndarray] = {}
    for v, a in graph.annotated():
        name = v.name
        if a.kind == "weight":
            continue
        if a.kind == "bias":
            b = Graph.const(v)
            if b is None or a.dtype not in _NP_DTYPE:
                continue
            scale, zp = _scale_zp(a, name, a.dtype)
            out[name + "__q"] = quantize_array(np.asarray(b, np.float32), a).astype(_NP_DTYPE[a.dtype])
            out[name + "__scale"], out[name + "__zp"] = scale, zp
            continue
        if a.dtype in ("int4", "uint4"):
            continue
        scale, zp = _scale_zp(a, name, a.dtype)
        if a.dtype in _Q_DTYPES:
            if not (a.bits == DTYPES[a.dtype][1] and not a.narrow):
                out[name + "__lo"] = np.array(np.float32((a.qmin - float(zp)) * float(scale)), np.float32)
                out[name + "__hi"] = np.array(np.float32((a.qmax - float(zp)) * float(scale)), np.float32)
            out[name + "__scale"], out[name + "__zp"] = scale, zp
        else:
            out[name + "__scale"], out[name + "__zp"] = scale, np.asarray(zp, np.float32)
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def scoring_session(base: onnx.ModelProto, params: list[dict[str, np.ndarray]], threads=None,
                    source: str = "<model>", optimize: bool | str = True):
    """One session for QDQ models that differ only in some initializer values.

    ``base`` is one of them; ``params[i]`` maps initializer names to model
    ``i``'s values. The names whose values differ between models become graph
    inputs. Returns ``(session, feeds)`` with ``feeds[i]`` the inputs for model ``i``.
    ``optimize=True``: onnxruntime's float optimizations without its QDQ fusion
    (float kernels may round differently from ``"basic"``, hago's reference
    simulation, by float32 ulps that can move a value to the next code).
    """
    import onnxruntime as ort

    variable = [k for k in params[0] if any(not _same(p[k], params[0][k]) for p in params[1:])]
    model = onnx.ModelProto()
    model.CopyFrom(base)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    var = set(variable)
    keep = [t for t in g.initializer if t.name not in var]
    del g.initializer[:]
    g.initializer.extend(keep)
    for k in variable:
        t = inits[k]
        g.input.append(helper.make_tensor_value_info(k, t.data_type, list(t.dims)))
    feeds = [{k: p[k] for k in variable} for p in params]
    if optimize != True:  # noqa: E712
        return rt.session(model, threads=threads, optimize=optimize, source=source), feeds
    rt._quiet()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.disable_quant_qdq", "1")  # float simulation, no integer kernels
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # pragma: no cover - a model an optimization cannot take: the plain simulation
        sess = rt.session(model, threads=threads, optimize="basic", source=source)
    return sess, feeds


def _candidate_models(g: Graph, obs: dict, methods) -> tuple[onnx.ModelProto, list[dict]]:
    """The QDQ model of the first method and every method's activation/bias quantizer initializers."""
    from ..ir.qdq import to_qdq
    from . import apply_ranges

    apply_ranges(g, obs, method=methods[0])
    base = to_qdq(g)
    inits = {t.name: t for t in base.graph.initializer}
    params = [quant_params(g)]
    mirrored = all(k in inits and _same(numpy_helper.to_array(inits[k]), v) for k, v in params[0].items())
    for m in methods[1:]:
        apply_ranges(g, obs, method=m, weights=False)
        if mirrored:
            params.append(quant_params(g))
        else:  # export each candidate and compare what quantize_params does not know
            model = to_qdq(g)
            if [n.input for n in model.graph.node] != [n.input for n in base.graph.node]:
                raise RuntimeError("auto calibration: candidate QDQ models differ in structure")
            params.append({t.name: numpy_helper.to_array(t) for t in model.graph.initializer})
    if not mirrored:
        weights = {v.name for v, a in g.annotated() if a.kind == "weight"}
        first = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer
                 if t.name.split("__")[0] not in weights}
        params[0] = first
        params[1:] = [{k: p[k] for k in first} for p in params[1:]]
    return base, params


def calibrate_auto(g: Graph, calib_data, threads=None, progress=None, methods=AUTO_METHODS,
                   race_ratio: float = RACE_RATIO, score_samples: int = SCORE_SAMPLES, observers: dict | None = None,
                   reference: str | None = None, z_switch: float = Z_SWITCH):
    """Set every activation range with the method of ``methods`` whose outputs are closest to fp32: ``reference``
    (default :data:`REFERENCE`, or the first method when that is not among ``methods``) unless another is
    significantly closer (:func:`choose`).

    ``observers``: histogram observers of these batches that the caller already has (the search's evaluator), so the
    statistics pass is not run again; only the scored batches' float outputs are computed then."""
    from . import CalibrationReport, _materialize, activation_edges, apply_ranges, run_observers

    t0 = time.perf_counter()
    methods = list(methods)
    reference = reference or (REFERENCE if REFERENCE in methods else methods[0])
    if reference not in methods:
        raise CalibrationError(f"auto calibration: reference method {reference!r} is not among {methods}")
    batches = _materialize(calib_data, g.input_names)
    names = [v.name for v, _ in activation_edges(g)]
    sizes = [int(next(iter(b.values())).shape[0]) for b in batches]
    total = sum(sizes)
    budget = max(1, int(np.searchsorted(np.cumsum(sizes), score_samples) + 1))  # batches reaching the budget
    if observers is None:
        obs, refs = run_observers(g, batches, names, histogram=True, threads=threads, progress=progress,
                                  keep_outputs=budget)
    else:
        obs = observers
        refs = run_observers(g, batches[:budget], [], threads=threads, keep_outputs=True)[1]
    base, params = _candidate_models(g, obs, methods)
    # candidates with identical parameters share one score
    keys = [tuple((k, v.tobytes()) for k, v in sorted(f.items())) for f in params]
    first: dict = {}
    owner = [first.setdefault(k, i) for i, k in enumerate(keys)]
    ref = owner[methods.index(reference)]
    alive = sorted(set(owner))
    errs: dict[int, list[np.ndarray]] = {i: [] for i in alive}
    if len(alive) > 1:
        sess, feeds = scoring_session(base, params, threads=threads, source=g.source)
    warmup = min(16, total / 4)
    seen = 0
    for bi, b in enumerate(batches):
        if len(alive) == 1 or bi >= budget:
            break
        for i in alive:
            errs[i].append(sample_errors(refs[bi], rt.run(sess, {**b, **feeds[i]}, None, bi)))
        seen += sizes[bi]
        if progress:
            progress(1)
        if seen >= warmup and len(alive) > 1:  # the reference always stays: the others are tested against it
            means = {i: float(np.mean(np.concatenate(errs[i]))) for i in alive}
            lead = min([v for v in means.values() if np.isfinite(v)], default=np.inf)
            alive = [i for i in alive if i == ref or (np.isfinite(means[i]) and means[i] <= race_ratio * lead)]
    per_sample = {i: np.concatenate(e) if e else np.zeros(1) for i, e in errs.items()}
    mean = {i: float(np.mean(e)) for i, e in per_sample.items()}
    pick, z = choose({i: per_sample[i] for i in alive}, ref, z_switch)
    best = reference if pick == ref else methods[pick]
    apply_ranges(g, obs, method=best, weights=False)
    scores = {m: mean[owner[i]] for i, m in enumerate(methods)}
    scored = {m: len(errs[owner[i]]) for i, m in enumerate(methods)}
    zs = {m: z[owner[i]] for i, m in enumerate(methods) if owner[i] in z}
    g.history.append("calibrate auto: " + ", ".join(f"{m} {scores[m]:.3g} ({scored[m]} batches)" for m in methods)
                     + f" -> {best}" + (f" ({z[pick]:.1f} standard errors better than {reference})"
                                        if best != reference else f" (the reference: no other is {z_switch:g} "
                                                                  f"standard errors better)"))
    return CalibrationReport(batches=len(batches), samples=total, seconds=time.perf_counter() - t0,
                             edges=len(names), histogram=True, method=best, candidates=scores,
                             scored_batches=scored, reference=reference, z=zs)
