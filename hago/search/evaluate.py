"""Build the quantized graph of a Config quickly, and measure its accuracy on onnxruntime.

Statistics of every float activation edge are collected once (one min/max
pass and one histogram pass); a Config then costs a clone, a partition, an
annotation and a QDQ export, with no new calibration run.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..calibrate import _materialize, apply_ranges, collect_stats
from ..errors import HagoError
from ..hwspec import HardwareSpec
from ..ir.graph import Graph
from ..passes.annotate import AnnotateOptions, annotate
from ..passes.partition import partition
from ..pipeline import QuantizedGraph, evaluate, float_runner, top1
from ..runtime import ort as rt
from .space import Config


def agreement(outputs, batch) -> float:
    """Top-1 agreement with the float model (``batch['_ref']`` holds the float outputs)."""
    ref = batch["_ref"]
    a = outputs[0].reshape(outputs[0].shape[0], -1).argmax(1)
    b = ref.reshape(ref.shape[0], -1).argmax(1)
    return float(np.mean(a == b))


class Evaluator:
    def __init__(self, graph: Graph, spec: HardwareSpec, calib, eval_data=None, metric: Callable | None = None, *,
                 per_channel: bool = True, threads: int | None = None):
        self.graph, self.spec, self.per_channel, self.threads = graph, spec, per_channel, threads
        self.calib = _materialize(calib, graph.input_names)
        self.eval = [dict(b) for b in (eval_data if eval_data is not None else self.calib)]
        if not self.eval:
            raise HagoError("the evaluation data is empty")
        run_fp = float_runner(graph, threads)
        if metric is None:
            if all("label" in b for b in self.eval):
                metric = top1
            else:  # no labels: top-1 agreement with the float model
                for b in self.eval:
                    b["_ref"] = run_fp({k: v for k, v in b.items() if not k.startswith("_") and k != "label"})[0]
                metric = agreement
        self.metric = metric
        names = [v.name for v in graph.values() if v.producer() is not None or v.is_graph_input()]
        names = [n for n in names if self._is_float(graph.value(n))]
        self.observers = collect_stats(graph, self.calib, names, histogram=True, threads=threads)
        self.fp32_accuracy = self._evaluate(run_fp)

    @staticmethod
    def _is_float(v) -> bool:
        import onnx_ir as ir

        return v.dtype in (ir.DataType.FLOAT, None) and v.const_value is None

    def build(self, cfg: Config) -> QuantizedGraph:
        g = self.graph.clone()
        partition(g, self.spec, force_float=cfg.float_nodes)
        opts = AnnotateOptions(per_channel=self.per_channel, activation_method=cfg.method,
                               overrides={k: {"bits": b} for k, b in cfg.bits})
        annotate(g, self.spec, opts)
        apply_ranges(g, self.observers)
        return QuantizedGraph(g, self.spec, {"method": cfg.method, "float_nodes": sorted(cfg.float_nodes)})

    def _evaluate(self, run) -> float:
        data = [{k: v for k, v in b.items() if k != "_ref"} | ({"_ref": b["_ref"]} if "_ref" in b else {}) for b in self.eval]

        def run_inputs(feeds):
            return run({k: v for k, v in feeds.items() if not k.startswith("_") and k != "label"})

        return evaluate(run_inputs, data, self.metric)

    def accuracy(self, qg: QuantizedGraph) -> float:
        sess = rt.session(qg.to_qdq(), threads=self.threads, optimize="basic", source=self.graph.source)
        names = [i.name for i in sess.get_inputs()]
        return self._evaluate(lambda feeds: rt.run(sess, rt.check_batch(feeds, names, 0)))

    def output_error(self, qg: QuantizedGraph, batches: int = 2) -> float:
        """Mean normalized squared error of the outputs vs fp32 on a few calibration batches (inverse SQNR)."""
        sess = rt.session(qg.to_qdq(), threads=self.threads, optimize="basic")
        ref = rt.session(self.graph.to_onnx(), threads=self.threads)
        err = 0.0
        for i, b in enumerate(self.calib[:batches]):
            for r, o in zip(rt.run(ref, b), rt.run(sess, b)):
                err += float(np.mean((r - o) ** 2) / (np.var(r) + 1e-12))
        return err / min(batches, len(self.calib))
