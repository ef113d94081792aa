"""Search strategies. Each is a function ``strategy(driver)`` that proposes configs with
``driver.trial(cfg)`` until ``driver.remaining()`` is 0.

* :func:`greedy` and :func:`batched_greedy`: HAGO's tuners, faithfully (bits only,
  edge order, stopping rule, best key = (accuracy, -total bits)). HAGO never
  looked at latency; these are the baseline. With budget left after HAGO's walk
  they walk the space's other choices the same way (SPARQ, multipoint,
  signatures, granularity, per-edge methods), each priced in bits by
  :meth:`SearchSpace.effective_bits` (a SPARQ edge counts its window bits).
* :func:`random_search`: uniform random bits per edge, random float fallbacks, random method,
  and random per-edge/per-node choices.
* :func:`model_based`: hago's own. Per-node sensitivity is computed once; an
  xgboost latency model (and an accuracy model) trained on the trials so far
  rank hundreds of mutated candidates; only the most promising are measured
  (active learning). Candidates whose accuracy (cheap, onnxruntime) misses
  the budget are not measured for latency.
"""
from __future__ import annotations

import numpy as np

from .space import Config


def _hago_key(trial, space):
    return (trial.accuracy if trial.ok else -1.0, -space.effective_bits(trial.config))


def _extra_dimensions(space):
    """The non-bit choices as (field, item, alternatives) in the order the greedy walk visits them."""
    dims = []
    for e, ch in space.sparq_edges.items():
        dims.append(("sparq", e, list(ch)))
    for n, ch in space.multipoint_nodes.items():
        dims.append(("multipoint", n, list(ch)))
    for n, ix in space.signatures.items():
        dims.append(("signatures", n, list(ix[1:])))
    for e in space.granularity:
        dims.append(("per_tensor", e, [True]))
    for e, ms in space.edge_methods.items():
        dims.append(("methods", e, list(ms)))
    return dims


def _set(cfg: Config, space, field: str, item: str, value) -> Config:
    """``cfg`` with one per-edge/per-node choice set (``None``: back to the default)."""
    if field == "per_tensor":
        pt = set(cfg.per_tensor)
        (pt.add if value else pt.discard)(item)
        return cfg.with_(space, per_tensor=pt)
    cur = dict(getattr(cfg, field))
    if value is None:
        cur.pop(item, None)
    else:
        cur[item] = value
    return cfg.with_(space, **{field: cur})


def _greedy_extras(d, best, strategy: str):
    """HAGO's greedy walk over the non-bit choices: try each alternative of each item from the best so far,
    keep it when the HAGO key (accuracy, then fewer effective bits) improves, stop an item when accuracy drops."""
    space = d.space
    for field, item, alts in _extra_dimensions(space):
        for v in alts:
            if d.remaining() <= 0:
                return best
            cfg = _set(best.config, space, field, item, v)
            if cfg == best.config:
                continue
            t = d.trial(cfg, strategy)
            if _hago_key(t, space) > _hago_key(best, space):
                best = t
            if not t.ok or (t.accuracy is not None and best.accuracy is not None and t.accuracy < best.accuracy):
                break
    return best


def greedy(d):
    """HAGO's GreedySearchTuner: walk edges in order, try bits high to low, move on when accuracy drops."""
    space = d.space
    decided: dict[str, int] = {}
    best = d.trial(Config.make({}, (), d.default_method, space), "greedy")
    for e in space.edges:
        if d.remaining() <= 0:
            break
        for b in e.choices[1:]:
            if d.remaining() <= 0:
                break
            t = d.trial(Config.make({**decided, e.name: b}, (), d.default_method, space), "greedy")
            if _hago_key(t, space) > _hago_key(best, space):
                best = t
            if not t.ok or t.accuracy < best.accuracy:
                break
        decided[e.name] = best.config.bits_dict().get(e.name, e.max)
    if d.remaining() > 0 and best is not None:
        _greedy_extras(d, best, "greedy")


def batched_greedy(d):
    """HAGO's BatchedGreedySearchTuner: for each edge, try all its choices, fix the best."""
    space = d.space
    decided: dict[str, int] = {}
    best = None
    for e in space.edges:
        if d.remaining() <= 0:
            break
        batch = []
        for b in e.choices:
            if d.remaining() <= 0:
                break
            batch.append(d.trial(Config.make({**decided, e.name: b}, (), d.default_method, space), "batched_greedy"))
        for t in batch:
            if best is None or _hago_key(t, space) > _hago_key(best, space):
                best = t
        decided[e.name] = best.config.bits_dict().get(e.name, e.max) if best else e.max
    if d.remaining() > 0 and best is not None:
        _greedy_extras(d, best, "batched_greedy")


def _pick(rs, seq):
    return seq[rs.randint(len(seq))]


def _random_extras(space, rs, p: float) -> dict:
    """Random per-edge/per-node choices: each item deviates from its default with probability ``p``."""
    return {"sparq": {e: _pick(rs, ch) for e, ch in space.sparq_edges.items() if rs.rand() < max(p, 0.5)},
            "multipoint": {n: _pick(rs, ch) for n, ch in space.multipoint_nodes.items() if rs.rand() < p},
            "signatures": {n: _pick(rs, ix) for n, ix in space.signatures.items() if rs.rand() < max(p, 0.5)},
            "per_tensor": [e for e in space.granularity if rs.rand() < p],
            "methods": {e: _pick(rs, ms) for e, ms in space.edge_methods.items() if rs.rand() < p}}


def random_search(d, p_float: float = 0.25, p_extra: float = 0.2):
    space, rs = d.space, d.rng
    while d.remaining() > 0:
        bits = {e.name: int(rs.choice(e.choices)) for e in space.edges}
        fl = [n for n in space.nodes if rs.rand() < p_float]
        method = str(rs.choice(space.methods))
        d.trial(Config.make(bits, fl, method, space, **_random_extras(space, rs, p_extra)), "random")


def _sensitive_fallback(d, order: list, tag: str = "model:fallback") -> None:
    """Where no configuration tried so far meets the accuracy budget with an integer node left (all-INT8 breaks it,
    and so do the seeds that float the 1-8 most sensitive nodes), float the most sensitive nodes in doubling numbers
    until one meets it, then bisect the count down to within an eighth: a mixed configuration that meets the budget
    with few float nodes, for the evolutionary phase to start from. The threshold method is the one of the most
    accurate all-integer trial. Configurations below the budget are not timed (no measured trial spent on them)."""
    nodes, floor = len(order), d.accuracy_floor()
    if nodes < 2 or any(t.accuracy is not None and t.accuracy >= floor and len(t.config.float_nodes) < nodes
                        for t in d.history):
        return
    whole = [t for t in d.history if t.accuracy is not None and not t.config.float_nodes]
    method = max(whole, key=lambda t: t.accuracy).config.method if whole else d.default_method
    tried = sorted(len(t.config.float_nodes) for t in d.history if t.accuracy is not None and t.accuracy < floor
                   and t.config.float_nodes == frozenset(order[:len(t.config.float_nodes)]))
    lo = tried[-1] if tried else 0  # the largest count known to break the budget
    hi = None

    def meets(k: int) -> bool:
        t = d.trial(Config.make({}, order[:k], method, d.space), tag)
        return t.accuracy is not None and t.accuracy >= floor

    k = max(2 * lo, 1)
    while hi is None and d.remaining() > 0:
        k = min(k, nodes)
        if meets(k):
            hi = k
        elif k >= nodes:
            return
        else:
            lo, k = k, 2 * k
    while hi is not None and hi - lo > max(1, hi // 8) and d.remaining() > 0:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid


def model_based(d, pool: int = 400, explore: float = 0.15):
    """Evolutionary proposals ranked by xgboost latency/accuracy models; measure the best predicted."""
    space, rs = d.space, d.rng
    nodes = list(space.nodes)
    sens = d.sensitivity()  # node -> output error when only that node is integer
    order = sorted(nodes, key=lambda n: -sens.get(n, 0.0))
    macs = d.features.macs
    cheap = sorted(nodes, key=lambda n: macs.get(n, 0.0))
    base = Config.make({}, (), d.default_method, space)
    seeds = [base, Config.make({}, nodes, d.default_method, space)]
    if space.sparq_edges:  # SPARQ on every edge that allows it: the spec's own proposal (vSPARQ where pairs exist)
        seeds.insert(1, base.with_(space, sparq={e: ch[-1] for e, ch in space.sparq_edges.items()}))
        seeds.insert(2, base.with_(space, sparq={e: ch[0] for e, ch in space.sparq_edges.items()}))
    for k in (1, 2, 4, 8):
        if k < len(nodes):
            seeds.append(Config.make({}, order[:k], d.default_method, space))
    for frac in (0.25, 0.5):
        seeds.append(Config.make({}, cheap[: int(len(cheap) * frac)], d.default_method, space))
    for m in space.methods:
        if m != d.default_method:
            seeds.append(Config.make({}, (), m, space))
    for cfg in seeds:
        if d.remaining() <= 0:
            return
        d.trial(cfg, "model:seed")
    _sensitive_fallback(d, order)

    dims = _extra_dimensions(space)

    def mutate_extra(cfg: Config) -> Config:
        field, item, alts = dims[rs.randint(len(dims))]
        if field == "per_tensor":
            return _set(cfg, space, field, item, item not in cfg.per_tensor)
        opts = [None] + [a for a in alts if a != dict(getattr(cfg, field)).get(item)]
        return _set(cfg, space, field, item, opts[rs.randint(len(opts))])

    def mutate(cfg: Config) -> Config:
        fl = set(cfg.float_nodes)
        ex = cfg
        for _ in range(1 + rs.randint(3)):
            if dims and rs.rand() < 0.3:  # a per-edge/per-node choice (SPARQ, multipoint, signature, granularity, method)
                ex = mutate_extra(ex)
                continue
            r = rs.rand()
            if r < 0.35 and len(fl) < len(nodes):  # fall back a sensitive or cheap node
                src = order if rs.rand() < 0.5 else cheap
                cand = [n for n in src[: max(4, len(src) // 3)] if n not in fl]
                if cand:
                    fl.add(cand[rs.randint(len(cand))])
            elif r < 0.7 and fl:  # bring a node back to integer
                fl.discard(sorted(fl)[rs.randint(len(fl))])
            elif r < 0.85:
                n = nodes[rs.randint(len(nodes))]
                fl.symmetric_difference_update({n})
            else:
                return ex.with_(space, float_nodes=fl, method=str(rs.choice(space.methods)))
        return ex.with_(space, float_nodes=fl)

    while d.remaining() > 0:
        done = d.measured()
        parents = d.pareto_trials() or done
        cands = {}
        for _ in range(pool):
            p = parents[rs.randint(len(parents))].config
            c = mutate(p)
            if not d.seen(c):
                cands[c.key()] = c
        if not cands:
            cands = {c.key(): c for c in (mutate(Config.make({}, (), d.default_method, space)) for _ in range(pool))
                     if not d.seen(c)}
            if not cands:
                return
        cl = list(cands.values())
        if rs.rand() < explore:
            pick = cl[rs.randint(len(cl))]
        else:
            lat = d.predict_latency(cl)
            acc = d.predict_accuracy(cl)
            feasible = acc >= d.accuracy_floor() + 0.002
            score = np.where(feasible, lat, np.inf)
            pick = cl[int(np.argmin(score))] if np.isfinite(score).any() else cl[int(np.argmax(acc))]
        d.trial(pick, "model")


def mixed_precision(d):
    """Cheng and Chen's per-layer precision with calibration loss not above fp32 (hago.algorithms.mixed_precision)."""
    from ..algorithms.mixed_precision import search_strategy

    return search_strategy(d)


STRATEGIES = {"greedy": greedy, "batched_greedy": batched_greedy, "random": random_search, "model": model_based,
              "mixed_precision": mixed_precision}
