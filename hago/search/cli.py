"""``hago search`` command: run a search and write the best QDQ model, the compiled artifact, the log and a report."""
from __future__ import annotations

import os


def run_search_command(args) -> int:
    import hago

    from ..cli import load_npz_batches

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
    from .report import write_report

    art = None
    if not getattr(args, "no_artifact", False):
        try:  # the deployable TVM library for the spec's target (tuning records of the search are reused)
            art = hago.compile(qg, spec, progress=False)
            art.export(os.path.join(args.out, "artifact"))
        except Exception as e:  # the QDQ model and the report are still useful
            print(f"note: could not compile the artifact: {type(e).__name__}: {e}")
    breakdown, source = None, ""
    try:  # where the best model's time goes, on what the search measured
        if measure == "onnxruntime":
            from ..runtime.ort import profile_nodes

            breakdown, source = profile_nodes(qg.to_qdq(), runs=5), "onnxruntime profiler (QDQ model, 1 thread)"
        elif art is not None and art.runnable()[0]:
            from ..backend.measure import profile

            breakdown, source = profile(art, runs=5), "TVM Relax VM, per kernel call"
    except Exception as e:  # noqa: BLE001 - the report is still useful without it
        print(f"note: no latency breakdown: {type(e).__name__}: {e}")
    rep = write_report(result, args.out, qgraph=qg, breakdown=breakdown, breakdown_source=source)
    print(f"wrote {args.out}/best.qdq.onnx, {log}, {rep}")
    return 0
