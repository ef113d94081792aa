"""Search strategies. Each is a function ``strategy(driver)`` that proposes configs with
``driver.trial(cfg)`` until ``driver.remaining()`` is 0.

* :func:`greedy` and :func:`batched_greedy`: HAGO's tuners, faithfully (bits only,
  edge order, stopping rule, best key = (accuracy, -total bits)). HAGO never
  looked at latency; these are the baseline.
* :func:`random_search`: uniform random bits per edge, random float fallbacks, random method.
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
    return (trial.accuracy if trial.ok else -1.0, -space.total_bits(trial.config))


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


def random_search(d, p_float: float = 0.25):
    space, rs = d.space, d.rng
    while d.remaining() > 0:
        bits = {e.name: int(rs.choice(e.choices)) for e in space.edges}
        fl = [n for n in space.nodes if rs.rand() < p_float]
        d.trial(Config.make(bits, fl, str(rs.choice(space.methods)), space), "random")


def model_based(d, pool: int = 400, explore: float = 0.15):
    """Evolutionary proposals ranked by xgboost latency/accuracy models; measure the best predicted."""
    space, rs = d.space, d.rng
    nodes = list(space.nodes)
    sens = d.sensitivity()  # node -> output error when only that node is integer
    order = sorted(nodes, key=lambda n: -sens.get(n, 0.0))
    macs = d.features.macs
    cheap = sorted(nodes, key=lambda n: macs.get(n, 0.0))
    seeds = [Config.make({}, (), d.default_method, space), Config.make({}, nodes, d.default_method, space)]
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

    def mutate(cfg: Config) -> Config:
        fl = set(cfg.float_nodes)
        for _ in range(1 + rs.randint(3)):
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
                return Config.make(cfg.bits_dict(), fl, str(rs.choice(space.methods)), space)
        return Config.make(cfg.bits_dict(), fl, cfg.method, space)

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
