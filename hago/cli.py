"""The ``hago`` command line.

    hago quantize MODEL.onnx --spec SPEC.json --calib DATA.npz --out OUT.onnx
    hago inspect MODEL.onnx [--spec SPEC.json]
    hago spec check SPEC.json | hago spec list
    hago compile MODEL.onnx --spec SPEC.json --out DIR [--tune-trials N]
    hago search MODEL.onnx --spec SPEC.json --calib DATA.npz [--eval DATA.npz] --out DIR

User errors (a broken spec, a corrupt model, bad calibration data) print one
clear line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from .errors import CalibrationError, HagoError


def load_npz_batches(path: str, input_names: list[str], batch_size: int = 16, limit: int | None = None,
                     keep_labels: bool = False) -> list[dict]:
    """Batches ``{input_name: array}`` from an .npz file holding one array per input (first axis = samples)."""
    if not os.path.exists(path):
        raise CalibrationError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CalibrationError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    keys = list(data.keys())
    names = list(input_names)
    if len(names) == 1 and names[0] not in keys:
        cand = [k for k in keys if k != "label"]
        if len(cand) == 1:  # a single unnamed array (arr_0) feeds the single input
            data = {names[0]: data[cand[0]], **({"label": data["label"]} if "label" in keys else {})}
            keys = list(data.keys())
    missing = [n for n in names if n not in keys]
    if missing:
        raise CalibrationError(f"{path}: missing array(s) for model input(s) {missing}; the file has {keys}")
    n = min(len(data[k]) for k in names)
    if limit:
        n = min(n, limit)
    out = []
    for s in range(0, n, batch_size):
        b = {k: np.asarray(data[k][s:s + batch_size]) for k in names}
        if keep_labels and "label" in keys:
            b["label"] = np.asarray(data["label"][s:s + batch_size])
        out.append(b)
    return out


class _Progress:
    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False)
        except ImportError:  # pragma: no cover
            self.bar = None

    def __call__(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def cmd_quantize(args) -> int:
    import hago

    graph = hago.load(args.model)
    spec = hago.load_spec(args.spec)
    calib = load_npz_batches(args.calib, graph.input_names, args.batch_size, args.samples)
    prog = _Progress(len(calib) * 2, "calibrating")
    t0 = time.perf_counter()
    qg = hago.quantize(graph, spec, calib, weight_bits=args.weight_bits, activation_bits=args.activation_bits,
                       per_channel=not args.per_tensor, method=args.method, progress=prog)
    prog.close()
    out = args.out or os.path.splitext(args.model)[0] + ".qdq.onnx"
    qg.save(out)
    print(qg.summary())
    if args.eval:
        ev = load_npz_batches(args.eval, graph.input_names, args.batch_size, None, keep_labels=True)
        if "label" in ev[0]:
            from .pipeline import evaluate, float_runner

            fp = evaluate(float_runner(graph), ev)
            q = qg.evaluate(ev)
            print(f"accuracy: fp32 {fp * 100:.2f}%  quantized {q * 100:.2f}%  (drop {(fp - q) * 100:.2f} points)")
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_inspect(args) -> int:
    import hago

    graph = hago.load(args.model)
    if args.spec:
        from .passes.partition import partition

        spec = hago.load_spec(args.spec)
        partition(graph, spec)
        n_int = sum(1 for n in graph.nodes() if graph.region(n) == "int")
        print(f"{graph.source}: {len(graph.nodes())} nodes, {n_int} integer under {spec.name}")
        for fb in graph.fallbacks:
            print(f"  float: {fb.node} ({fb.op_type}): {fb.reason}")
    print(graph.table(max_rows=args.rows))
    print("passes: " + "; ".join(graph.history))
    return 0


def cmd_spec(args) -> int:
    import hago
    from .hwspec import list_shipped_specs

    if args.action == "list":
        for n in list_shipped_specs():
            s = hago.load_spec(n)
            print(f"{n:<26} {s.target.get('kind'):<6} {s.description[:90]}")
        return 0
    for path in args.files:
        s = hago.load_spec(path)
        print(f"{path}: ok ({s.name}, {len(s.ops)} ops)")
        if args.verbose:
            print(s.describe())
    return 0


def cmd_compile(args) -> int:
    import hago

    graph = hago.load(args.model)
    spec = hago.load_spec(args.spec)
    model = graph
    if args.calib:
        calib = load_npz_batches(args.calib, graph.input_names, args.batch_size, args.samples)
        model = hago.quantize(graph, spec, calib, method=args.method)
    art = hago.compile(model, spec, tune_trials=args.tune_trials, cache_dir=args.cache_dir)
    path = art.export(args.out)
    print(f"wrote {path}")
    return 0


def cmd_search(args) -> int:
    return _run_search_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hago", description="hardware-aware post-training quantization compiler")
    p.add_argument("--version", action="version", version="hago 0.1.0")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model for a hardware spec and write a QDQ ONNX model")
    q.add_argument("model")
    q.add_argument("--spec", required=True, help="spec JSON file or shipped spec name (hago spec list)")
    q.add_argument("--calib", required=True, help=".npz with one array per model input (first axis = samples)")
    q.add_argument("--eval", help=".npz with inputs and 'label' to report fp32 vs quantized top-1")
    q.add_argument("--out", help="output QDQ ONNX path (default MODEL.qdq.onnx)")
    q.add_argument("--method", default="auto", help="activation calibration: auto, minmax, avg_range, percentile[:p], kl, mse, lp:<p>")
    q.add_argument("--weight-bits", type=int)
    q.add_argument("--activation-bits", type=int)
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel where the spec allows)")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--samples", type=int, help="use at most this many calibration samples")
    q.set_defaults(fn=cmd_quantize)

    i = sub.add_parser("inspect", help="print a model's graph (and its integer/float partition under a spec)")
    i.add_argument("model")
    i.add_argument("--spec")
    i.add_argument("--rows", type=int, default=200)
    i.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("spec", help="validate or list hardware specs")
    s.add_argument("action", choices=["check", "list"])
    s.add_argument("files", nargs="*")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(fn=cmd_spec)

    c = sub.add_parser("compile", help="compile a model (quantized with --calib) for the spec's target")
    c.add_argument("model")
    c.add_argument("--spec", required=True)
    c.add_argument("--calib")
    c.add_argument("--method", default="auto")
    c.add_argument("--out", required=True)
    c.add_argument("--tune-trials", type=int, default=0)
    c.add_argument("--cache-dir")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--samples", type=int)
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("search", help="search bits/scales against accuracy and measured latency")
    r.add_argument("model")
    r.add_argument("--spec", required=True)
    r.add_argument("--calib", required=True)
    r.add_argument("--eval")
    r.add_argument("--max-drop", type=float, default=1.0, help="accuracy drop budget in points")
    r.add_argument("--strategy", default="model")
    r.add_argument("--trials", type=int, default=32)
    r.add_argument("--target-rpc", help="HOST:PORT:KEY of a TVM RPC tracker")
    r.add_argument("--measure", default="tvm", help="tvm | onnxruntime")
    r.add_argument("--resume", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--hago-space", action="store_true",
                   help="search HAGO's space only (bits, float fallbacks, one threshold method): no per-edge methods, "
                        "granularity, signatures, SPARQ or multipoint choices")
    r.add_argument("--no-artifact", action="store_true", help="do not compile the TVM artifact of the best model")
    r.add_argument("--out", required=True)
    r.add_argument("--batch-size", type=int, default=16)
    r.set_defaults(fn=cmd_search)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except HagoError as e:
        print(f"hago: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hago: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


def _run_search_command(args) -> int:
    import hago

    graph = hago.load(args.model)
    spec = hago.load_spec(args.spec)
    calib = load_npz_batches(args.calib, graph.input_names, args.batch_size)
    ev = load_npz_batches(args.eval, graph.input_names, args.batch_size, keep_labels=True) if args.eval else None
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "search.jsonl")
    measure = args.measure
    if args.target_rpc:
        measure = "rpc://" + args.target_rpc
    result = hago.search(graph, spec, calib, ev, max_drop=args.max_drop, strategy=args.strategy, budget=args.trials,
                         measure=measure, log=log, resume=args.resume, seed=args.seed,
                         extras=not getattr(args, "hago_space", False))
    print(result.summary())
    result.save(os.path.join(args.out, "result.json"))
    if result.best is None:
        print("no configuration succeeded; see the log")
        return 1
    qg = result.apply(graph, spec)
    qg.save(os.path.join(args.out, "best.qdq.onnx"))
    from .search.report import write_report

    art = None
    if not getattr(args, "no_artifact", False):
        try:  # the deployable TVM library for the spec's target (tuning records of the search are reused)
            opts = {}
            if measure != "onnxruntime":  # compiled as the search measured it (border kernels of their own)
                from .search.latency import TvmLatency

                opts = dict(TvmLatency.compile_options)
            art = hago.compile(qg, spec, progress=False, **opts)
            art.export(os.path.join(args.out, "artifact"))
        except Exception as e:  # the QDQ model and the report are still useful
            print(f"note: could not compile the artifact: {type(e).__name__}: {e}")
    breakdown, source = None, ""
    try:  # where the best model's time goes, on what the search measured
        if measure == "onnxruntime":
            from .runtime.ort import profile_nodes

            breakdown, source = profile_nodes(qg.to_qdq(), runs=5), "onnxruntime profiler (QDQ model, 1 thread)"
        elif art is not None and art.runnable()[0]:
            from .backend.measure import profile

            breakdown, source = profile(art, runs=5), "TVM Relax VM, per kernel call"
    except Exception as e:  # noqa: BLE001 - the report is still useful without it
        print(f"note: no latency breakdown: {type(e).__name__}: {e}")
    rep = write_report(result, args.out, qgraph=qg, breakdown=breakdown, breakdown_source=source)
    print(f"wrote {args.out}/best.qdq.onnx, {log}, {rep}")
    return 0
