"""``hago.search``: tune per-edge bits, float fallbacks and thresholds against accuracy and measured latency.

The space (:mod:`hago.search.space`) also holds, where the spec allows them,
per-edge threshold methods, per-tensor vs per-channel weights, the signature of
each op, SPARQ per activation edge entering a multiplier and multipoint
weights per layer. A SPARQ trial's latency is modeled (see
:class:`hago.search.latency.SparqLatencyTerm`) when no SPARQ kernel exists.

    result = hago.search(graph, spec, calib, eval_data, max_drop=1.0, strategy="model", budget=32,
                         measure="tvm" | "onnxruntime" | "rpc://host:port:key", log="search.jsonl")
    result.best, result.pareto, result.history; qg = result.apply(graph); result.save("result.json")

Accuracy comes from onnxruntime running the QDQ model (exact simulation); latency
from the target (a TVM-compiled artifact, locally or over RPC) or onnxruntime.
Every trial is appended to a JSON-lines log; ``resume=True`` continues a killed
search, reusing logged trials. Measurement failures mark the trial failed and
the search goes on. Ctrl-C stops cleanly with the best so far.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np

from ..errors import HagoError, SearchError
from ..hwspec import load_spec
from ..ir import Graph, load
from ..ir.annotation import EdgeAnnotation
from .evaluate import Evaluator, multipoint_weights, prepare
from .latency import (FeatureMap, KernelProfilePrior, LatencyDB, LatencyModel, ProfilePrior, SparqLatencyTerm,
                      bound_shapes, latency_inputs, make_measurer)
from .log import TrialLog, read_log
from .space import Config, build_space
from .strategies import STRATEGIES


@dataclasses.dataclass
class Trial:
    index: int
    strategy: str
    config: Config
    accuracy: float | None = None
    latency_ms: float | None = None
    status: str = "ok"  # ok | failed | infeasible (accuracy below budget: latency not measured)
    error: str = ""
    seconds: float = 0.0
    predicted_ms: float | None = None
    measured_ms: float | None = None  # what the measurer returned, when latency_ms is modeled from it
    modeled: str = ""  # "sparq": latency_ms = measured_ms of the plain 8-bit config with the modeled SPARQ speed-up
    confirmed: int = 0  # latency_ms is the median of this many measurements (the final confirmation round)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return {"index": self.index, "strategy": self.strategy, "config": self.config.to_dict(), "key": self.config.key(),
                "accuracy": self.accuracy, "latency_ms": self.latency_ms, "status": self.status, "error": self.error,
                "seconds": round(self.seconds, 3), "predicted_ms": self.predicted_ms, "measured_ms": self.measured_ms,
                "modeled": self.modeled, "confirmed": self.confirmed}

    @staticmethod
    def from_dict(d: dict) -> "Trial":
        return Trial(d["index"], d["strategy"], Config.from_dict(d["config"]), d.get("accuracy"), d.get("latency_ms"),
                     d.get("status", "ok"), d.get("error", ""), d.get("seconds", 0.0), d.get("predicted_ms"),
                     d.get("measured_ms"), d.get("modeled", ""), d.get("confirmed", 0))


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """Trials not dominated in (higher accuracy, lower latency), sorted by latency."""
    ok = sorted((t for t in trials if t.ok and t.latency_ms is not None), key=lambda t: (t.latency_ms, -t.accuracy))
    front, best_acc = [], -np.inf
    for t in ok:
        if t.accuracy > best_acc:
            front.append(t)
            best_acc = t.accuracy
    return front


@dataclasses.dataclass
class SearchResult:
    best: Trial | None
    pareto: list[Trial]
    history: list[Trial]
    fp32_accuracy: float
    fp32_latency_ms: float | None
    objective: dict
    space: dict
    annotations: dict  # edge name -> EdgeAnnotation dict of the best config (to rebuild it without calibration data)
    model_hash: str
    spec_name: str
    spec_hash: str
    interrupted: bool = False
    latency_model: dict = dataclasses.field(default_factory=dict)  # {"sparq": {...}}: how SPARQ latency was obtained
    choices: dict = dataclasses.field(default_factory=dict)  # {"multipoint": {node: {"bits", "n_points"}}} of the best

    def apply(self, graph, spec=None):
        """The best configuration as a QuantizedGraph (no calibration data needed)."""
        from ..pipeline import QuantizedGraph

        if self.best is None:
            raise SearchError("the search found no successful configuration")
        g = graph.clone() if isinstance(graph, Graph) else load(graph)
        if g.hash() != self.model_hash:
            raise SearchError(f"this result is for model {self.model_hash}, not {g.hash()} ({g.source})")
        spec = load_spec(spec or self.spec_name)
        cfg = self.best.config
        plans = self.choices.get("multipoint", {})
        mps = {n: multipoint_weights(g.node(n), p["bits"], p["n_points"]) for n, p in plans.items()}
        g = prepare(g, spec, cfg, multipoint=mps)
        for v, a in g.annotated():
            d = self.annotations.get(v.name)
            if d is not None:
                g.annotate(v, EdgeAnnotation.from_dict(d))
        return QuantizedGraph(g, spec, {"method": cfg.method, "float_nodes": sorted(cfg.float_nodes), "config": cfg.to_dict(),
                                        "multipoint": plans})

    def to_dict(self) -> dict:
        return {"best": self.best.to_dict() if self.best else None, "pareto": [t.to_dict() for t in self.pareto],
                "history": [t.to_dict() for t in self.history], "fp32_accuracy": self.fp32_accuracy,
                "fp32_latency_ms": self.fp32_latency_ms, "objective": self.objective, "space": self.space,
                "annotations": self.annotations, "model_hash": self.model_hash, "spec_name": self.spec_name,
                "spec_hash": self.spec_hash, "interrupted": self.interrupted, "latency_model": self.latency_model,
                "choices": self.choices}

    def save(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    def summary(self) -> str:
        lines = [f"search: {len(self.history)} trials ({sum(1 for t in self.history if t.latency_ms is not None)} measured), "
                 f"fp32 accuracy {self.fp32_accuracy * 100:.2f}%"
                 + (f", fp32 latency {self.fp32_latency_ms:.3f} ms" if self.fp32_latency_ms else "")]
        if self.best:
            b = self.best
            lines.append(f"best: accuracy {b.accuracy * 100:.2f}%, latency {b.latency_ms:.3f} ms"
                         + (" (SPARQ speed-up modeled, not measured)" if b.modeled else "") + f", {b.config.describe()}")
        lines.append("pareto: " + ", ".join(f"({t.accuracy * 100:.2f}%, {t.latency_ms:.3f} ms)" for t in self.pareto))
        if self.interrupted:
            lines.append("interrupted: the best so far is kept")
        return "\n".join(lines)


def load_result(path: str) -> SearchResult:
    with open(path) as f:
        d = json.load(f)
    hist = [Trial.from_dict(t) for t in d["history"]]
    return SearchResult(best=Trial.from_dict(d["best"]) if d["best"] else None, pareto=[Trial.from_dict(t) for t in d["pareto"]],
                        history=hist, fp32_accuracy=d["fp32_accuracy"], fp32_latency_ms=d["fp32_latency_ms"],
                        objective=d["objective"], space=d["space"], annotations=d["annotations"], model_hash=d["model_hash"],
                        spec_name=d["spec_name"], spec_hash=d["spec_hash"], interrupted=d.get("interrupted", False),
                        latency_model=d.get("latency_model", {}), choices=d.get("choices", {}))


class Driver:
    """State of one search: the space, the evaluator, the measurer, the models and the log."""

    def __init__(self, graph: Graph, spec, evaluator: Evaluator, measurer, *, budget: int, objective: dict, seed: int,
                 log: TrialLog, previous: list[dict], db: LatencyDB | None, progress: bool, method: str,
                 min_bits: int, extras: bool = True, prior: bool = True, shaped: Graph | None = None):
        """``shaped``: ``graph`` with the value shapes of the inputs the measurer times on (:func:`bound_shapes`,
        for a model with symbolic dims), for the latency features."""
        self.graph, self.spec, self.ev, self.measurer = graph, spec, evaluator, measurer
        self.space = build_space(graph, spec, min_bits=min_bits, per_channel=evaluator.per_channel,
                                 nonnegative=evaluator.nonnegative(), extras=extras)
        self.features = FeatureMap(shaped if shaped is not None else graph, self.space)
        self.sparq_term = SparqLatencyTerm(graph, self.space, spec, measurer)
        vs = {e: self.space.sparq_axis[e] for e, ch in self.space.sparq_edges.items() if any(c.startswith("vsparq") for c in ch)}
        if self.sparq_term.active and vs:
            self.sparq_term.f8.update(evaluator.default_frac_8bit_pairs(vs))
        self.budget, self.objective, self.log, self.db = budget, objective, log, db
        self.rng = np.random.RandomState(seed)
        self.default_method = method
        self.history: list[Trial] = []
        self._by_key: dict[str, Trial] = {}
        self._previous = {r["key"]: r for r in previous}
        self.max_evals = budget * 6
        self._sens = None
        self._prior_done = not prior  # the profile prior of the latency model: built on first use
        self.prior_info: dict = {}
        self._lat_model = None
        self._acc_model = None
        self._bar = None
        if progress:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=budget, desc="search", unit="trial", file=sys.stderr)
            except ImportError:  # pragma: no cover
                pass

    # -- budget ---------------------------------------------------------------------
    def measured(self) -> list[Trial]:
        return [t for t in self.history if t.latency_ms is not None]

    def remaining(self) -> int:
        return min(self.budget - len([t for t in self.history if t.status != "infeasible"]),
                   self.max_evals - len(self.history))

    def seen(self, cfg: Config) -> bool:
        return cfg.key() in self._by_key

    def accuracy_floor(self) -> float:
        return self.ev.fp32_accuracy - self.objective["max_drop"]

    # -- one trial ------------------------------------------------------------------
    def trial(self, cfg: Config, strategy: str) -> Trial:
        key = cfg.key()
        if key in self._by_key:
            return self._by_key[key]
        t0 = time.perf_counter()
        prev = self._previous.get(key)
        if prev is not None:  # resumed: reuse the logged result
            t = Trial.from_dict(prev)
            t.index = len(self.history)
        else:
            t = Trial(len(self.history), strategy, cfg)
            try:
                qg = self.ev.build(cfg)
                t.accuracy = self.ev.accuracy(qg)
                if strategy.startswith("model") and strategy != "model:seed" and t.accuracy < self.accuracy_floor():
                    t.status = "infeasible"
                else:
                    if self._lat_model is not None:
                        t.predicted_ms = float(self.predict_latency([cfg])[0])
                    applied = qg.options.get("sparq") or {}
                    modeled = self.sparq_term.active and bool(applied)
                    mcfg, mqg = (cfg.without_sparq(), None) if modeled else (cfg, qg)
                    cached = self.db.get(mcfg) if self.db else None
                    if cached is None:
                        if mqg is None:  # no SPARQ kernel: measure the same config with plain 8-bit activations
                            mqg = self.ev.build(mcfg)
                        ms = float(self.measurer(mqg))
                        if self.db:
                            self.db.add(mcfg, ms)
                    else:
                        ms = cached
                    if modeled:
                        self.sparq_term.f8.update({e: a.get("frac_8bit_pairs", 1.0) for e, a in applied.items()})
                        t.measured_ms, t.modeled = ms, "sparq"
                        t.latency_ms = self.sparq_term.adjust(ms, cfg, applied)
                    else:
                        t.latency_ms = ms
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a kernel that fails to compile, a board that disconnects, a timeout
                t.status, t.error = "failed", f"{type(e).__name__}: {str(e)[:300]}"
            t.seconds = time.perf_counter() - t0
            self.log.append(t.to_dict())
        self.history.append(t)
        self._by_key[key] = t
        self._lat_model = self._acc_model = None  # refit lazily
        if self._bar is not None and t.status != "infeasible":
            b = self.best()
            self._bar.set_postfix_str(f"best {b.accuracy * 100:.2f}% {b.latency_ms:.2f}ms" if b else "")
            self._bar.update(1)
        return t

    def confirm(self, k: int = 4, rounds: int = 3) -> list[Trial]:
        """Re-measure the ``k`` fastest configurations that meet the objective, the all-float reference and the
        all-integer one (when it meets the objective), interleaved over ``rounds`` rounds, and keep the median of all their measurements as their latency.

        One measurement per configuration decides nothing when two candidates are a few percent apart and the
        machine drifts; measuring the finalists side by side, in turn, makes "never slower than FP32" and "at least
        as fast as all-INT8" hold up to the noise of a median rather than of a single sample. Trials whose latency
        is modeled (SPARQ) keep it. Returns the re-measured trials (each logged again with ``confirmed``)."""
        if rounds < 1:
            return []
        ok = [t for t in self.history if t.ok and t.latency_ms is not None and not t.modeled]
        if self.objective["kind"] == "accuracy":
            lim = self.objective.get("latency_budget_ms")
            feas = sorted([t for t in ok if lim is None or t.latency_ms <= lim * 1.1], key=lambda t: -t.accuracy)[:k]
        else:
            feas = sorted([t for t in ok if t.accuracy >= self.accuracy_floor() - 1e-12], key=lambda t: t.latency_ms)[:k]
        all_int = Config.make({}, (), self.default_method, self.space).key()  # the all-integer reference
        refs = [t for t in ok if t.strategy == "fp32"
                or (t.config.key() == all_int and t.accuracy >= self.accuracy_floor() - 1e-12)]
        cands = list({t.config.key(): t for t in feas + refs}.values())
        if len(cands) < 2:
            return []
        qgs, samples = {}, {}
        for t in cands:
            try:
                qgs[t.config.key()] = self.ev.build(t.config)
                samples[t.config.key()] = [t.latency_ms]
            except Exception:  # noqa: BLE001 - keep its first measurement
                pass
        for _ in range(rounds):
            for t in cands:
                key = t.config.key()
                if key in qgs:
                    try:
                        samples[key].append(float(self.measurer(qgs[key])))
                    except KeyboardInterrupt:
                        raise
                    except Exception:  # noqa: BLE001 - a failed re-measurement leaves the others
                        pass
        out = []
        for t in cands:
            key = t.config.key()
            if key in samples and len(samples[key]) > 1:
                t.latency_ms, t.confirmed = float(np.median(samples[key])), len(samples[key])
                self.log.append(t.to_dict(), kind="confirm")
                out.append(t)
        return out

    # -- objective ------------------------------------------------------------------
    def best(self) -> Trial | None:
        ok = [t for t in self.history if t.ok and t.latency_ms is not None]
        if not ok:
            return None
        if self.objective["kind"] == "accuracy":
            lim = self.objective.get("latency_budget_ms")
            feas = [t for t in ok if lim is None or t.latency_ms <= lim]
            return max(feas or ok, key=lambda t: (t.accuracy, -t.latency_ms))
        feas = [t for t in ok if t.accuracy >= self.accuracy_floor() - 1e-12]
        if feas:
            return min(feas, key=lambda t: (t.latency_ms, -t.accuracy))
        return max(ok, key=lambda t: (t.accuracy, -t.latency_ms))

    def pareto_trials(self) -> list[Trial]:
        return pareto_front(self.history)

    # -- models ---------------------------------------------------------------------
    def sensitivity(self) -> dict[str, float]:
        """Output error when only one node is integer (computed once, reused to order and prune)."""
        if self._sens is None:
            self._sens = {}
            nodes = self.space.nodes
            for n in nodes:
                cfg = Config.make({}, [m for m in nodes if m != n], self.default_method, self.space)
                try:
                    self._sens[n] = self.ev.output_error(self.ev.build(cfg), batches=1)
                except Exception:
                    self._sens[n] = float("inf")
        return self._sens

    def _X(self, cfgs, latency: bool = False) -> np.ndarray:
        """Features; for the latency model the SPARQ choices are left out where SPARQ latency is modeled (the model
        learns measured latencies only; the SPARQ term is applied on top)."""
        sens = self._sens or {}
        if latency and self.sparq_term.active:
            cfgs = [c.without_sparq() for c in cfgs]
        X = np.stack([self.features(c) for c in cfgs])
        s = np.array([[sum(v for n, v in sens.items() if n not in c.float_nodes and np.isfinite(v))] for c in cfgs])
        return np.hstack([X, s])

    def latency_prior(self) -> None:
        """Once per search, where the measurer can profile: the profile-composed prior of the latency model.
        onnxruntime profiles per node (:class:`ProfilePrior`, 8 profiled configs); local TVM per kernel
        (:class:`KernelProfilePrior`, the all-float and all-integer artifacts). Neither is counted as a trial.
        Without one (a custom measurer, TVM over RPC) the model works on the config features alone."""
        if self._prior_done:
            return
        self._prior_done = True
        prof = getattr(self.measurer, "profile", None)
        kprof = getattr(self.measurer, "kernel_profile", None) if getattr(self.measurer, "rpc", None) is None else None
        if prof is None and kprof is None:
            return
        t0 = time.perf_counter()
        try:
            if prof is not None:
                pr = ProfilePrior.measure(self.graph, self.space, self.ev.build, prof, method=self.default_method,
                                          regions=self.features.regions)
            else:
                pr = KernelProfilePrior.measure(self.graph, self.space, self.ev.build, kprof,
                                                method=self.default_method, regions=self.features.regions)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a profile that fails leaves the model without its prior
            self.prior_info = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            return
        self.features.set_prior(pr)
        self.prior_info = {"kind": type(pr).__name__, "profiled_configs": pr.profiled_configs,
                           "seconds": round(time.perf_counter() - t0, 2)}
        self._lat_model = None

    def predict_latency(self, cfgs) -> np.ndarray:
        self.latency_prior()
        data = self.measured()
        if self._lat_model is None and len(data) >= 2:
            y = np.array([t.measured_ms if t.modeled and t.measured_ms is not None else t.latency_ms for t in data])
            pc = self.features.prior_index if self.features.prior is not None else None
            self._lat_model = LatencyModel(seed=0).fit(self._X([t.config for t in data], latency=True), y, prior_col=pc)
        if self._lat_model is None:
            return np.zeros(len(cfgs))
        base = self._lat_model.predict(self._X(cfgs, latency=True))
        return np.array([b * (1.0 - self.sparq_term.saved_fraction(c)) for b, c in zip(base, cfgs)])

    def predict_accuracy(self, cfgs) -> np.ndarray:
        data = [t for t in self.history if t.accuracy is not None]
        if self._acc_model is None and len(data) >= 2:
            import xgboost as xgb

            self._acc_model = xgb.XGBRegressor(n_estimators=100, max_depth=3, learning_rate=0.1, random_state=0,
                                               n_jobs=1, verbosity=0)
            self._acc_model.fit(self._X([t.config for t in data]), np.array([t.accuracy for t in data]))
        if self._acc_model is None:
            return np.full(len(cfgs), self.ev.fp32_accuracy)
        return self._acc_model.predict(self._X(cfgs))


def _auto_method(ev: Evaluator) -> str:
    """The threshold method ``method="auto"`` calibration picks for the all-integer configuration (the model
    :func:`hago.quantize` gives by default), on the statistics the evaluator already collected."""
    from ..calibrate.auto import calibrate_auto

    qg = ev.build(Config.make({}, (), "mse"))
    return str(calibrate_auto(qg.graph, ev.calib, threads=ev.threads, observers=ev.observers)["method"])


def search(graph, spec, calib_data, eval_data=None, metric=None, *, objective: str = "latency", max_drop: float = 1.0,
           relative: bool = False, latency_budget_ms: float | None = None, strategy: str = "model", budget: int = 32,
           measure="onnxruntime", log: str | None = None, resume: bool | str = False, seed: int = 0,
           threads: int | None = None, tune_trials: int = 0, cache_dir: str | None = None, method: str = "auto",
           min_bits: int = 4, progress: bool = True, per_channel: bool = True, extras: bool = True,
           confirm: int = 3) -> SearchResult:
    """Search bits, float fallbacks and thresholds (see the module docstring).

    ``extras=False`` limits the space to HAGO's (bits, float fallbacks, one method for all edges): no per-edge
    methods, granularity, signatures, SPARQ or multipoint choices.

    ``method``: the threshold method of every edge that a config does not set otherwise; ``"auto"`` (default)
    takes the one :func:`hago.quantize`'s default picks for the all-integer model, so the search starts from the model
    ``hago.quantize`` gives.

    ``confirm``: rounds of the final side-by-side re-measurement of the finalists and the all-float reference
    (:meth:`Driver.confirm`; 0 turns it off).

    ``objective``: ``"latency"`` (minimize latency with accuracy drop <= ``max_drop``
    points, or ``max_drop`` percent of fp32 with ``relative=True``), ``"accuracy"``
    (maximize accuracy with latency <= ``latency_budget_ms``) or ``"pareto"``
    (same as latency; look at ``result.pareto``). ``budget`` counts trials measured
    on the target. ``resume`` is True (continue ``log``) or a log path.
    """
    g = graph if isinstance(graph, Graph) else load(graph)
    spec = load_spec(spec)
    if strategy not in STRATEGIES:
        raise HagoError(f"unknown strategy {strategy!r}; use one of {sorted(STRATEGIES)}")
    if objective not in ("latency", "accuracy", "pareto"):
        raise HagoError(f"unknown objective {objective!r}; use latency, accuracy or pareto")
    log_path = resume if isinstance(resume, str) else log
    model_hash, spec_hash = g.hash(), spec.hash
    previous = read_log(log_path, model_hash, spec_hash) if (resume and log_path) else []
    ev = Evaluator(g, spec, calib_data, eval_data, metric, per_channel=per_channel, threads=threads)
    if method == "auto":
        method = _auto_method(ev)
    drop = max_drop / 100.0 if not relative else ev.fp32_accuracy * max_drop / 100.0
    obj = {"kind": "accuracy" if objective == "accuracy" else "latency", "max_drop": drop,
           "max_drop_points": max_drop, "relative": relative, "latency_budget_ms": latency_budget_ms, "name": objective}
    # a model with symbolic input dims (a text line of any width) is timed on a real calibration sample
    li = latency_inputs(g, ev.calib[0])
    measurer = make_measurer(measure, spec, inputs=li, threads=threads, tune_trials=tune_trials, cache_dir=cache_dir)
    header = {"model_hash": model_hash, "spec": spec.name, "spec_hash": spec_hash, "strategy": strategy, "seed": seed,
              "budget": budget, "objective": obj, "measure": getattr(measurer, "name", "custom"), "source": g.source,
              "method": method}
    tlog = TrialLog(log_path, header, append=bool(resume))
    db = LatencyDB(cache_dir, getattr(measurer, "target_key", "custom"), model_hash) if not callable(measure) or hasattr(measurer, "target_key") else None
    d = Driver(g, spec, ev, measurer, budget=budget, objective=obj, seed=seed, log=tlog, previous=previous, db=db,
               progress=progress, method=method, min_bits=min_bits, extras=extras,
               shaped=bound_shapes(g, li) if li else None)
    interrupted = False
    fp32_ms = None
    try:
        fp32 = d.trial(Config.make({}, d.space.nodes, method, d.space), "fp32")  # the all-float reference point
        fp32_ms = fp32.latency_ms
        STRATEGIES[strategy](d)
        d.confirm(rounds=confirm)
        fp32_ms = fp32.latency_ms
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if d._bar is not None:
            d._bar.close()
    best = d.best()
    annotations, choices = {}, {}
    if best is not None:
        qg = ev.build(best.config)
        annotations = {v.name: a.to_dict() for v, a in qg.graph.annotated()}
        if qg.options.get("multipoint"):
            choices["multipoint"] = qg.options["multipoint"]
    return SearchResult(best=best, pareto=d.pareto_trials(), history=d.history, fp32_accuracy=ev.fp32_accuracy,
                        fp32_latency_ms=fp32_ms, objective=obj, space=d.space.to_dict(),
                        annotations=annotations, model_hash=model_hash, spec_name=spec.path or spec.name,
                        spec_hash=spec_hash, interrupted=interrupted,
                        latency_model=({"sparq": d.sparq_term.describe()} if d.sparq_term.declared else {})
                        | ({"prior": d.prior_info} if d.prior_info else {}),
                        choices=choices)
