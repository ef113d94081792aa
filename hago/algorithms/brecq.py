"""BRECQ: post-training quantization by block reconstruction (Li, Gong, Tan, Yang, Hu, Zhang, Yu,
Wang, Gu; ICLR 2021, arXiv 2102.05426; reference code github.com/yhhhli/BRECQ).

The network is cut into *blocks* and reconstructed one block at a time, in topological
order: the weight rounding of every layer in a block is learned with AdaRound
(:mod:`hago.algorithms.adaround`) so that the quantized block's output matches the
fp32 block's output on calibration data. Blocks are the paper's middle ground between
layer-wise reconstruction (AdaRound: ignores the dependencies between the layers of a
block) and network-wise reconstruction (over-fits the small calibration set).

What hago does, and where it follows the reference code:

* **Blocks** (``granularity="block"``, :func:`find_blocks`): a value is a *cut* when, at
  that point of the topological order, it is the only live activation (everything
  later depends on the model inputs only through it). The nodes between two
  consecutive cuts form a segment; in a residual network the segment from the input of
  a residual ``Add``'s branches to the ``Add`` (and its ReLU) is one residual block, in
  a plain chain every layer is its own segment. Activation-only segments (ReLU, Clip)
  join the preceding layer, other weightless segments (pooling, Flatten) the following
  one. Only per-sample float values count (shape arithmetic, ``Shape`` -> ``Slice`` ->
  ``Reshape``, is recomputed inside the block that needs it). A segment whose cuts are hidden
  by a long skip connection (PP-OCR's SVTR neck: its input is concatenated with its output,
  around two transformer layers) is split at the cuts that ignore that skip, when a part
  then holds a residual structure of its own: the neck gives one block per attention
  (+ residual) and per MLP (+ residual); a ResNet block's body stays whole. A unit is a
  ``"block"`` when it has several weights or a merge of a path through a layer with a path
  around it (not a HardSwish's ``x * clip(x + 3)``). ``granularity="layer"`` is AdaRound layer by layer: one block per Conv / Gemm /
  MatMul with its following activation (the reference code's ``QuantModule`` with its
  ``activation_function``; a convolution that feeds a residual ``Add`` ends at its own
  output). ``blocks=[(inputs, outputs), ...]`` gives the blocks explicitly.
* **Reconstruction data** (the reference code's ``asym=True``, its ``main_imagenet.py``
  default): each block's input is computed by the model whose previous blocks are
  already quantized (hard-rounded weights), its target is the fp32 model's block
  output on the same calibration images. Both are computed incrementally: the values
  live at the current point of the topological order are kept for all calibration
  samples (one forward pass in all, not one per block). 1,024 calibration samples by default
  (``num_samples``), mini-batches of 32 drawn at random every iteration.
* **Loss**: AdaRound's (see :mod:`hago.algorithms.adaround`), ``lam=0.01``, beta 20 -> 2,
  warm-up 0.2, Adam lr 1e-3 on the rounding variables. ``fisher=True`` weights the
  squared error by the squared gradient of the task loss w.r.t. the block output
  (diagonal Fisher): as in the reference code's ``save_grad_data``, the loss is the KL
  divergence between the output of the model quantized up to and including this block
  and the fp32 output (a distillation target: no labels needed), per prediction over the
  output's last axis (the classes; per time step for a sequence output such as PP-OCR's
  ``[N, T, 6625]``), taking the output as probabilities when the graph ends in a Softmax
  (cross-entropy on the labels instead when the calibration batches carry ``"label"``
  and ``fisher_loss="ce"``), gradients of batches of ``batch_size`` samples, damped as
  ``|g| + 1``. Off by default (``fisher=False``: plain squared error of the block output).
* **Activations** (``a_bits``): after all weights are reconstructed, every activation
  that enters a Conv / Gemm / MatMul or a residual ``Add`` / ``Sub`` / ``Mul`` / ``Concat``
  gets a per-tensor asymmetric ``a_bits`` fake-quantizer, initialised on 256 samples by the
  Lp (p = 2.4) range search. Then, as in the reference code's second pass, steps are learned
  block by block (LSQ; Adam lr 4e-4, cosine decay, ``iters_a`` iterations, p = 2.4, block
  input from the quantized model, fp32 target) -- only those of the quantizers in front of the
  block's weight layers (each with the first block that reads it). These are the values the
  reference code's quantizers sit on (a ``QuantModule``'s output after its activation function,
  a block's output, both feeding the next layer). hago also quantizes values the reference code
  leaves in float (inside an activation function or a block: HardSwish / Swish / squeeze-excite
  gates, LayerNorm statistics, attention q / k / probabilities, the operands of a residual
  ``Add``); those keep their Lp initialisation. Measured on PP-OCRv4 rec, W4A8
  (``bench/bench_brecq.py --model ppocr_rec --wbits 4 --iters 100``, docs/BENCHMARKS.md): with
  ``--iters-a 20`` learning every quantizer a block reads gave 38.1 %, this rule 97.3 %
  (AdaRound layer by layer 95.3 %); ``--iters-a 0`` (every step at its Lp init) 98.6 %. With few
  iterations each step moves by about its Adam rate (capped at 1 % per iteration, see
  :mod:`hago.algorithms.adaround`) along the sign of a straight-through gradient taken at the
  kink the Lp init sits on (it sees the rounding error, not the clipping), so training the
  quantizers inside blocks shrinks them all together.
* **First and last layer at 8 bits** (``first_last_8bit=True``, the reference code's
  default): their weights and their input activations use 8 bits, and the first layer,
  when it is a block of its own, is rounded to nearest (the reference code skips its
  reconstruction).
* **Weights** are hago's signed, by default symmetric, per-channel grid with the
  reference code's Lp clipping search (:func:`hago.algorithms.adaround.init_weight_scale`).

Results are returned as a :class:`BrecqResult`: for every quantized initializer its
float32 values exactly on the grid (``W_q = s * (q - zp)``; ``rint(W_q / s) + zp`` gives
back the integer codes, checked), the scales, zero points, axes and codes, and for
activations the scales / zero points / real ranges, so the values can be written back
into hago's annotated graph (nearest rounding in the QDQ export reproduces the codes).

Deviations from the reference code, documented: hago's weight grid is symmetric signed
by default (the reference code's is asymmetric); activation ranges always contain 0; the
network input is quantized like hago's QDQ models do (the reference code leaves the image
unquantized); the activation pass learns only the steps in front of weight layers (above);
fewer iterations by default (``iters=2000``; the paper uses 20,000).

torch is an optional dependency (``pip install hago[train]``, torch==2.13.0), imported only
when :func:`brecq`, :func:`rtn` or :func:`simulate` run.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import CalibrationError, HagoError, ModelError
from .adaround import (
    act_quantizer,
    adaround_quantizer,
    channel_axis,
    check_on_grid,
    dequantize,
    fixed_quantizer,
    init_weight_scale,
    quantize_nearest,
    reconstruct,
    weight_qrange,
)
from .torch_bridge import WEIGHT_OPS, require_torch, to_torch, weight_inputs

__all__ = ["brecq", "rtn", "adaround", "find_blocks", "simulate", "Block", "BrecqResult", "act_values"]

ACT_OPS = ("Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "Identity", "Dropout")
MERGE_OPS = ("Add", "Sub", "Mul", "Concat")


@dataclasses.dataclass
class Block:
    """A part of the graph reconstructed at once: node indices (topological), boundary values, weights."""

    name: str
    nodes: list[int]
    inputs: list[str]
    outputs: list[str]
    weights: list[str]
    kind: str  # "block" (several layers / a residual merge) or "layer"

    def describe(self) -> str:
        return f"{self.name} [{self.kind}] {self.inputs} -> {self.outputs} weights={self.weights}"


@dataclasses.dataclass
class BrecqResult:
    """Quantized weights on their integer grid, and activation quantization parameters."""

    method: str
    weights: dict[str, np.ndarray]  # initializer name -> float32 values on the grid (s * (q - zp))
    scales: dict[str, np.ndarray]  # -> float32, 1-D (per channel) or 0-d
    zero_points: dict[str, np.ndarray]  # -> int64, same shape as the scale
    codes: dict[str, np.ndarray]  # -> int64 integer codes
    axes: dict[str, int | None]  # -> channel axis, None per tensor
    bits: dict[str, int]
    act_scales: dict[str, np.float32] = dataclasses.field(default_factory=dict)
    act_zero_points: dict[str, np.int64] = dataclasses.field(default_factory=dict)
    act_bits: dict[str, int] = dataclasses.field(default_factory=dict)
    act_ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    blocks: list[Block] = dataclasses.field(default_factory=list)
    log: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` whose quantized initializers hold the on-grid float32 weights."""
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in m.graph.initializer:
            if t.name in self.weights:
                t.CopyFrom(numpy_helper.from_array(self.weights[t.name].astype(np.float32), t.name))
        return m


# ---------------------------------------------------------------------------------------------
# Graph analysis
# ---------------------------------------------------------------------------------------------

def _float_init(mod, name: str) -> bool:
    if name not in mod._key:  # float initializers are parameters or float buffers
        return False
    return True


def _weighted(mod, weight_names: Iterable[str] | None = None) -> list[tuple[int, str]]:
    """``(node index, weight initializer)`` of the quantizable Conv / Gemm / MatMul weights, topological."""
    wanted = None if weight_names is None else set(weight_names)
    out = []
    seen = set()
    for idx, node in enumerate(mod.nodes):
        if node.op_type not in WEIGHT_OPS:
            continue
        for _, w in weight_inputs(node, mod.initializer_names):
            if not _float_init(mod, w) or (wanted is not None and w not in wanted):
                continue
            if w in seen:
                continue
            seen.add(w)
            out.append((idx, w))
    if wanted is not None:
        missing = sorted(wanted - seen)
        if missing:
            raise ModelError(f"weight_names {missing} are not Conv/Gemm/MatMul weight initializers of the model")
    return out


def _node_label(mod, idx: int) -> str:
    n = mod.nodes[idx]
    return n.name or f"{n.op_type}#{idx}"


def _boundary(mod, nodes: Sequence[int]) -> tuple[list[str], list[str]]:
    """Values a node set reads from outside / produces for outside. Integer values (shape arithmetic)
    are never outputs; :func:`_make_block` pulls their producers into the block instead of reading them."""
    inside = set(nodes)
    produced = {o for i in nodes for o in mod.nodes[i].output if o}
    inputs, outputs = [], []
    for i in sorted(nodes):
        for v in mod.nodes[i].input:
            if v and v not in produced and not mod.is_initializer(v) and v not in inputs:
                inputs.append(v)
    graph_out = set(mod.output_names)
    for i in sorted(nodes):
        for o in mod.nodes[i].output:
            if not o or not mod.is_data(o):
                continue
            used_outside = any(c not in inside for c in mod._consumers.get(o, []))
            if (used_outside or o in graph_out) and o not in outputs:
                outputs.append(o)
    return inputs, outputs


def _with_shape_sources(mod, nodes: Sequence[int]) -> list[int]:
    """``nodes`` plus the producers of the integer (shape) values they read, back to float values.

    A transformer block reshapes with ``Shape`` of a tensor computed before it; the block then
    recomputes that shape from the (cached, per-sample) float tensor rather than reading the
    integer value, which has no sample axis."""
    out = set(nodes)
    while True:
        inputs, _ = _boundary(mod, sorted(out))
        add = {mod._producer[v] for v in inputs if not mod.is_data(v) and v in mod._producer}
        if not add - out:
            return sorted(out)
        out |= add


def _weighted_ancestors(mod, nodes: Sequence[int], weighted: dict[int, str], taint: set[str] = frozenset()):
    """For every value produced in ``nodes``: (weighted nodes of ``nodes`` it depends on, whether it
    depends on a value of ``taint``), following the data flow inside ``nodes`` only."""
    info: dict[str, tuple[frozenset, bool]] = {}
    for i in sorted(nodes):
        node = mod.nodes[i]
        ws, t = set(), False
        for v in node.input:
            if not v or mod.is_initializer(v):
                continue
            if v in info:
                ws |= info[v][0]
                t = t or info[v][1]
            elif v in taint:
                t = True
        if i in weighted:
            ws.add(i)
        for o in node.output:
            if o:
                info[o] = (frozenset(ws), t)
    return info


def _merges(mod, nodes: Sequence[int], weighted: dict[int, str], taint: set[str] = frozenset()) -> bool:
    """Whether a merge (Add / Sub / Mul / Concat of two float values) in ``nodes`` joins a path through
    a weighted layer with a path around it (a residual or gating connection), ignoring merges that read
    (through ``nodes``) a value of ``taint``. ``x * clip(x + 3) / 6`` (HardSwish) is no merge: both
    operands come through the same layers."""
    info = _weighted_ancestors(mod, nodes, weighted, taint)
    for i in nodes:
        node = mod.nodes[i]
        if node.op_type not in MERGE_OPS:
            continue
        ops = [v for v in node.input if v and not mod.is_initializer(v) and mod.is_data(v)]
        if len(ops) < 2:
            continue
        sets = [info.get(v, (frozenset(), v in taint)) for v in ops]
        if any(t for _, t in sets):
            continue
        if len({w for w, _ in sets}) > 1:
            return True
    return False


def _make_block(mod, nodes: list[int], weighted: dict[int, str], name: str) -> Block:
    nodes = _with_shape_sources(mod, nodes)
    inputs, outputs = _boundary(mod, nodes)
    weights = [weighted[i] for i in nodes if i in weighted]
    if weights:  # outputs no weight of the block affects (a pooled skip passing through) are no targets
        info = _weighted_ancestors(mod, nodes, weighted)
        outputs = [o for o in outputs if info.get(o, (frozenset(), False))[0]] or outputs
    kind = "block" if (len(weights) > 1 or _merges(mod, nodes, weighted)) else "layer"
    return Block(name=name, nodes=nodes, inputs=inputs, outputs=outputs, weights=weights, kind=kind)


def _last_uses(mod, data_only: bool) -> dict[str, int]:
    """Float value -> index of its last reader. ``data_only``: only readers that compute float data
    count (a ``Shape`` of a tensor does not keep it alive as a block boundary); otherwise a value
    also lives as long as the integer values computed from it (they are recomputed from it)."""
    n = len(mod.nodes)
    last: dict[str, int] = {}
    for o in mod.output_names:
        last[o] = n
    for idx in range(n - 1, -1, -1):
        node = mod.nodes[idx]
        outs_float = any(o and mod.is_data(o) for o in node.output)
        reach = idx
        if not outs_float:
            if data_only:
                continue
            reach = max([idx] + [last.get(o, idx) for o in node.output if o])
        for v in node.input:
            if v and not mod.is_initializer(v):
                last[v] = max(last.get(v, -1), reach)
    return {v: u for v, u in last.items() if mod.is_data(v)}


def _cut_segments(mod, nodes: Sequence[int] | None = None, ignore: set[str] = frozenset()) -> list[list[int]]:
    """Split the topological node list (or the contiguous run ``nodes``) after every point where one
    float value is live (``ignore``: values not counted)."""
    n = len(mod.nodes)
    nodes = list(range(n)) if nodes is None else sorted(nodes)
    last_use = _last_uses(mod, data_only=True)
    first = nodes[0]
    live = {v for v, u in last_use.items() if u >= first and v not in ignore
            and (mod._producer.get(v, -1) < first)}
    segments, cur = [], []
    for k, idx in enumerate(nodes):
        node = mod.nodes[idx]
        cur.append(idx)
        for v in node.input:
            if v in live and last_use[v] == idx:
                live.discard(v)
        for o in node.output:
            if o and last_use.get(o, -1) > idx and o not in ignore:
                live.add(o)
        if len(live) == 1 and k < len(nodes) - 1:
            segments.append(cur)
            cur = []
    if cur:
        segments.append(cur)
    return segments


def _split_long_skips(mod, seg: list[int], weighted: dict[int, str]) -> list[list[int]]:
    """Split a segment whose only single-value cuts are hidden by a long skip connection.

    ``skips``: float values the segment reads from before it that stay live up to or past its last
    weighted layer (the shortcut of a residual block, or a skip around a whole stage, as the input of
    PP-OCR's SVTR neck concatenated with its output). Ignoring them, the segment splits at its inner
    single-value cuts; the split is kept only when an inner part holds a residual structure of its own
    (a merge of a path through a layer with a path around it, not fed by the skip), as the transformer
    layers inside the SVTR neck. A residual block's own body (conv, ReLU, conv) has no such inner
    merge and stays one block."""
    ws = [i for i in seg if i in weighted]
    if len(ws) < 3:
        return [seg]
    last_use = _last_uses(mod, data_only=True)
    start, last_w = seg[0], ws[-1]
    inside = set(seg)
    skips = set()
    for i in seg:
        for v in mod.nodes[i].input:
            if v and not mod.is_initializer(v) and mod.is_data(v) and mod._producer.get(v, -1) < start \
                    and last_use.get(v, -1) >= last_w:
                skips.add(v)
    if not skips:
        return [seg]
    subs = _cut_segments(mod, seg, ignore=skips)
    if sum(1 for s_ in subs if any(i in weighted for i in s_)) < 2:
        return [seg]
    if not any(_merges(mod, s_, weighted, taint=skips) for s_ in subs):
        return [seg]
    assert inside == {i for s_ in subs for i in s_}
    return subs


def find_blocks(model, granularity: str = "block", weight_names: Iterable[str] | None = None,
                blocks: Sequence | None = None) -> list[Block]:
    """The reconstruction units of a model (an ``onnx.ModelProto`` or an ``OnnxModule``).

    ``granularity="block"``: residual blocks and single layers between single-value cuts;
    ``"layer"``: one unit per weighted op and its following activation chain. ``blocks``:
    explicit ``[(input value names, output value names), ...]``. Units without quantized
    weights are left out.
    """
    mod = to_torch(model) if isinstance(model, onnx.ModelProto) else model
    wanted = set(dict(_weighted(mod, weight_names)).values())
    out = [b for b in _find_blocks(mod, granularity, dict(_weighted(mod, None)), blocks)]
    for b in out:  # the structure comes from every weighted op; only the wanted weights are kept
        b.weights = [w for w in b.weights if w in wanted]
    return [b for b in out if b.weights]


def _find_blocks(mod, granularity: str, weighted: dict[int, str], blocks) -> list[Block]:
    out: list[Block] = []
    if blocks is not None:
        owner: dict[str, str] = {}
        for bi, spec in enumerate(blocks):
            try:
                ins, outs = spec
            except (TypeError, ValueError):
                raise HagoError(f"blocks[{bi}] must be a pair (input value names, output value names), got {spec!r}")
            ins = [ins] if isinstance(ins, str) else list(ins)
            outs = [outs] if isinstance(outs, str) else list(outs)
            try:
                nodes = mod._plan(frozenset(ins), tuple(outs))
            except HagoError as e:
                raise HagoError(f"blocks[{bi}] ({ins} -> {outs}): {e}") from e
            b = _make_block(mod, nodes, weighted, f"block{bi}")
            b.inputs, b.outputs = ins, outs
            for w in b.weights:
                if w in owner:
                    raise HagoError(f"blocks[{bi}]: weight {w!r} is already reconstructed by {owner[w]}")
                owner[w] = b.name
            if b.weights:
                out.append(b)
        return out
    if granularity == "layer":
        for idx, w in sorted(weighted.items()):
            chain = [idx]
            v = mod.nodes[idx].output[0]
            while v not in mod.output_names:
                cons = mod._consumers.get(v, [])
                if len(cons) != 1 or mod.nodes[cons[0]].op_type not in ACT_OPS:
                    break
                chain.append(cons[0])
                v = mod.nodes[cons[0]].output[0]
            b = _make_block(mod, chain, weighted, f"layer:{_node_label(mod, idx)}")
            b.kind = "layer"
            out.append(b)
        return out
    if granularity != "block":
        raise HagoError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    groups: list[list[int]] = []
    pending: list[int] = []
    segs = [sub for seg in _cut_segments(mod) for sub in _split_long_skips(mod, seg, weighted)]
    for seg in segs:
        has_w = any(i in weighted for i in seg)
        act_only = all(mod.nodes[i].op_type in ACT_OPS for i in seg)
        if has_w:
            groups.append(pending + seg)
            pending = []
        elif act_only and groups and not pending:
            groups[-1] += seg
        else:
            pending += seg
    if pending and groups:
        groups[-1] += pending
    for gi, g in enumerate(groups):
        b = _make_block(mod, g, weighted, "")
        first_w = next(i for i in sorted(g) if i in weighted)
        b.name = f"{b.kind}:{_node_label(mod, first_w)}"
        out.append(b)
    return out


def act_values(model, weight_names: Iterable[str] | None = None) -> list[str]:
    """Activation values that get a quantizer: per-sample float inputs of Conv/Gemm/MatMul and of
    Add/Sub/Mul/Concat (not the shape arithmetic a Concat may join)."""
    mod = to_torch(model) if isinstance(model, onnx.ModelProto) else model
    out: list[str] = []
    for node in mod.nodes:
        if node.op_type in WEIGHT_OPS or node.op_type in MERGE_OPS:
            for v in node.input:
                if v and not mod.is_initializer(v) and mod.is_data(v) and v not in out:
                    out.append(v)
    order = {v: i for i, v in enumerate(mod.value_names())}
    return sorted(out, key=lambda v: order.get(v, -1))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def _calib_arrays(calib, input_names: Sequence[str], num_samples: int):
    if calib is None:
        raise CalibrationError("calibration data is required")
    if isinstance(calib, dict):
        calib = [calib]
    xs: dict[str, list] = {n: [] for n in input_names}
    labels: list = []
    count = 0
    for bi, batch in enumerate(calib):
        if not isinstance(batch, dict):
            raise CalibrationError(f"calibration batch {bi} is a {type(batch).__name__}, expected a dict "
                                   "{input name: array}")
        for n in input_names:
            if n not in batch:
                raise CalibrationError(f"calibration batch {bi} has no array for model input {n!r} "
                                       f"(keys: {sorted(batch)})")
            a = np.asarray(batch[n], dtype=np.float32)
            if not np.isfinite(a).all():
                raise CalibrationError(f"calibration batch {bi}, input {n!r}: contains NaN or Inf")
            xs[n].append(a)
        if "label" in batch:
            labels.append(np.asarray(batch["label"]))
        count += len(xs[input_names[0]][-1])
        if count >= num_samples:
            break
    if count == 0:
        raise CalibrationError("calibration data is empty")
    arrays = {n: np.concatenate(v)[:num_samples] for n, v in xs.items()}
    lab = np.concatenate(labels)[:num_samples] if labels and len(labels) == len(xs[input_names[0]]) else None
    return arrays, lab


class _Frontier:
    """Calibration values of the model in one state (quantized or fp32), computed along the topological order.

    Re-running the model from its inputs for every block costs a forward pass per block (quadratic in the
    depth: minutes on PP-OCR). Instead the float values live at the current point of the order (the block
    boundaries, long skips included) are kept for all calibration samples and every request runs only the
    nodes after them. Values are stored before their own quantizer (``pre_quant``); the graph inputs are
    always kept, so a value that was dropped can still be recomputed. ``invalidate`` drops what a changed
    weight or activation quantizer affects."""

    def __init__(self, mod, X: dict, quant: bool, chunk: int = 32):
        self.mod, self.quant, self.chunk = mod, quant, int(chunk)
        self.inputs = dict(X)
        self.cache: dict[str, Any] = dict(X)
        self.n = next(iter(X.values())).shape[0]
        self.last_use = _last_uses(mod, data_only=False)
        self.point = -1

    def get(self, names: Sequence[str]) -> dict:
        torch = require_torch()
        missing = [v for v in dict.fromkeys(names) if v not in self.cache]
        if missing:
            parts: dict[str, list] = {k: [] for k in missing}
            with torch.no_grad(), self.mod.quantization(self.quant):
                for s_ in range(0, self.n, self.chunk):
                    feeds = {k: v[s_:s_ + self.chunk] for k, v in self.cache.items()}
                    res = self.mod.run_subgraph(feeds, missing, quantize_inputs=True, pre_quant=True)
                    for k in missing:
                        parts[k].append(res[k].detach())
            self.cache.update({k: torch.cat(v) for k, v in parts.items()})
        return {k: self.cache[k] for k in names}

    def invalidate(self, nodes: Iterable[int]) -> None:
        """Drop the outputs of ``nodes`` and everything computed from them."""
        stack, seen = list(nodes), set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            for o in self.mod.nodes[i].output:
                if o in self.cache and o not in self.inputs:
                    del self.cache[o]
                stack.extend(self.mod._consumers.get(o, []))

    def advance(self, point: int) -> None:
        """Keep (computing them) the float values live after node ``point``, drop the others."""
        point = max(point, self.point)
        self.point = point
        live = [v for v, u in self.last_use.items() if u > point and self.mod._producer.get(v, -1) <= point
                and v not in self.inputs]
        self.get(live)  # from the values kept so far, before they are dropped
        keep = set(live) | set(self.inputs)
        for k in [k for k in self.cache if k not in keep]:
            del self.cache[k]


def _output_is_softmax(mod) -> bool:
    """Whether the (first) graph output is a Softmax, possibly reshaped / transposed afterwards."""
    v = mod.output_names[0]
    while True:
        node = mod.producer(v)
        if node is None:
            return False
        if node.op_type == "Softmax":
            return True
        if node.op_type not in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"):
            return False
        v = node.input[0]


def _fisher_grads(mod, X: dict, labels, block: Block, batch_size: int, loss: str, damping: float = 1.0):
    torch = require_torch()
    import torch.nn.functional as F
    n = next(iter(X.values())).shape[0]
    parts: dict[str, list] = {k: [] for k in block.outputs}
    probs = _output_is_softmax(mod)
    for s in range(0, n, batch_size):
        feeds = {k: v[s:s + batch_size] for k, v in X.items()}
        with torch.no_grad(), mod.quantization(False):
            fp = mod.run(feeds)[mod.output_names[0]]
        with torch.no_grad(), mod.quantization(True):
            bout = mod.run(feeds, block.outputs)
        t = {k: v.detach().clone().requires_grad_(True) for k, v in bout.items()}
        with mod.quantization(True):
            q = mod.run_subgraph({**feeds, **t}, [mod.output_names[0]], quantize_inputs=True)[mod.output_names[0]]
        if loss == "ce" and labels is not None:
            lv = F.cross_entropy(q.reshape(q.shape[0], -1), torch.as_tensor(labels[s:s + batch_size]).long())
        else:  # KL(fp32 || quantized) per prediction over the last (class) axis, summed, / samples
            c = q.shape[-1]
            if probs:  # the output is already a softmax: its log, not a second softmax
                logq, pf = torch.log(q.reshape(-1, c).clamp_min(1e-12)), fp.reshape(-1, c)
            else:
                logq, pf = F.log_softmax(q.reshape(-1, c), dim=1), F.softmax(fp.reshape(-1, c), dim=1)
            lv = F.kl_div(logq, pf, reduction="sum") / q.shape[0]
        gs = torch.autograd.grad(lv, list(t.values()), allow_unused=True)
        for k, g in zip(t, gs):
            parts[k].append(torch.zeros_like(t[k]) if g is None else g.detach())
    return {k: torch.cat(v).abs() + damping for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# Weight configuration
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _WConf:
    name: str
    node: int
    axis: int | None
    bits: int
    scale: np.ndarray
    zero_point: np.ndarray


def _weight_confs(mod, w_bits: int, per_channel: bool, symmetric: bool, first_last_8bit: bool,
                  weight_names, scale_p: float) -> dict[str, _WConf]:
    weighted = _weighted(mod, weight_names)
    if not weighted:
        raise ModelError("the model has no Conv/Gemm/MatMul weight initializer to quantize")
    weight_qrange(w_bits)
    all_weighted = _weighted(mod, None)
    first, last = all_weighted[0][1], all_weighted[-1][1]
    confs = {}
    for idx, w in weighted:
        node = mod.nodes[idx]
        arr = mod.initializer(w).detach().cpu().numpy().astype(np.float32)
        axis = None
        if per_channel:
            tb = 0
            for a in node.attribute:
                if a.name == "transB":
                    tb = a.i
            axis = channel_axis(node.op_type, arr.ndim, tb)
        bits = 8 if (first_last_8bit and w in (first, last)) else int(w_bits)
        s, z = init_weight_scale(arr, bits, axis, symmetric=symmetric, p=scale_p)
        confs[w] = _WConf(w, idx, axis, bits, s, z)
    return confs


def _first_last_inputs(mod) -> set[str]:
    ws = _weighted(mod, None)
    out = set()
    for idx in (ws[0][0], ws[-1][0]):
        for v in mod.nodes[idx].input:
            if v and not mod.is_initializer(v):
                out.add(v)
    return out


def _store(result: BrecqResult, c: _WConf, q: np.ndarray) -> np.ndarray:
    w_q = dequantize(q, c.scale, c.zero_point, c.axis)
    check_on_grid(c.name, w_q, q, c.scale, c.zero_point, c.axis)
    result.weights[c.name] = w_q
    result.codes[c.name] = q
    result.scales[c.name] = np.asarray(c.scale, np.float32)
    result.zero_points[c.name] = np.asarray(c.zero_point, np.int64)
    result.axes[c.name] = c.axis
    result.bits[c.name] = c.bits
    return w_q


def _install_acts(mod, X: dict, a_bits: int, first_last_8bit: bool, act_p: float, n_init: int) -> dict:
    """Activation quantizers on every activation value, initialised in one quantized forward pass."""
    torch = require_torch()
    special = _first_last_inputs(mod) if first_last_8bit else set()
    aqs = {}
    for v in act_values(mod):
        q = act_quantizer(8 if v in special else int(a_bits), p=act_p)
        mod.set_quantizer(v, q)
        aqs[v] = q
    with torch.no_grad(), mod.quantization(True):
        mod.run({k: x[:n_init] for k, x in X.items()})
    return aqs


def _store_acts(result: BrecqResult, aqs: dict) -> None:
    for v, q in aqs.items():
        s, z = q.qparams()
        result.act_scales[v] = s
        result.act_zero_points[v] = z
        result.act_bits[v] = q.bits
        result.act_ranges[v] = (float((q.qmin - z) * s), float((q.qmax - z) * s))


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def rtn(model: onnx.ModelProto, w_bits: int = 4, per_channel: bool = True, *, calib=None,
        a_bits: int | None = None, first_last_8bit: bool = True, weight_names=None, symmetric: bool = True,
        scale_p: float = 2.4, act_p: float = 2.4, num_samples: int = 1024, n_act_init: int = 256) -> BrecqResult:
    """Round-to-nearest baseline with the same weight step initialisation (and, with ``a_bits``,
    the same activation range initialisation, no step learning)."""
    torch = require_torch()
    t0 = time.perf_counter()
    mod = to_torch(model)
    confs = _weight_confs(mod, w_bits, per_channel, symmetric, first_last_8bit, weight_names, scale_p)
    res = BrecqResult(method="rtn", weights={}, scales={}, zero_points={}, codes={}, axes={}, bits={})
    for c in confs.values():
        q, _ = quantize_nearest(mod.initializer(c.name).detach().numpy(), c.scale, c.zero_point, c.bits, c.axis)
        mod.set_quantizer(c.name, fixed_quantizer(_store(res, c, q)))
    if a_bits is not None:
        X, _ = _calib_arrays(calib, mod.input_names, num_samples)
        X = {k: torch.from_numpy(v) for k, v in X.items()}
        _store_acts(res, _install_acts(mod, X, a_bits, first_last_8bit, act_p, n_act_init))
    res.seconds = time.perf_counter() - t0
    return res


def brecq(model: onnx.ModelProto, calib, *, w_bits: int = 4, a_bits: int | None = None, per_channel: bool = True,
          granularity: str = "block", blocks: Sequence | None = None, iters: int = 2000, batch_size: int = 32,
          lam: float = 0.01, b_range: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, p: float = 2.0,
          lr: float = 1e-3, fisher: bool = False, fisher_loss: str = "kl", weight_names=None, first_last_8bit: bool = True,
          symmetric: bool = True, scale_p: float = 2.4, iters_a: int = 500, act_lr: float = 4e-4,
          act_p: float = 2.4, num_samples: int = 1024, n_act_init: int = 256, seed: int = 0,
          log_every: int = 0, verbose: bool = False, threads: int | None = 1) -> BrecqResult:
    """Quantize the Conv/Gemm/MatMul weights of ``model`` by block (or layer) reconstruction.

    ``calib``: iterable of ``{input name: array}`` batches (``"label"`` optional). See the module
    docstring for the method; returns a :class:`BrecqResult`. ``lr``: Adam step of the rounding
    variables (1e-3, the reference code's, meant for 20,000 iterations; with a few hundred iterations
    the variables barely move and a larger step, e.g. 1e-2, lets the rounding settle). ``threads``: torch intra-op threads
    while it runs (restored afterwards; None leaves torch's setting): small CNNs gain nothing from
    more, and on a loaded machine extra threads make every step several times slower.
    """
    torch = require_torch()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _brecq(model, calib, w_bits=w_bits, a_bits=a_bits, per_channel=per_channel,
                      granularity=granularity, blocks=blocks, iters=iters, batch_size=batch_size, lam=lam,
                      b_range=b_range, warmup=warmup, p=p, lr=lr, fisher=fisher, fisher_loss=fisher_loss,
                      weight_names=weight_names, first_last_8bit=first_last_8bit, symmetric=symmetric,
                      scale_p=scale_p, iters_a=iters_a, act_lr=act_lr, act_p=act_p, num_samples=num_samples,
                      n_act_init=n_act_init, seed=seed, log_every=log_every, verbose=verbose)
    finally:
        torch.set_num_threads(old_threads)


def _brecq(model, calib, *, w_bits, a_bits, per_channel, granularity, blocks, iters, batch_size, lam, b_range,
           warmup, p, lr, fisher, fisher_loss, weight_names, first_last_8bit, symmetric, scale_p, iters_a, act_lr,
           act_p, num_samples, n_act_init, seed, log_every, verbose) -> BrecqResult:
    torch = require_torch()
    if fisher_loss not in ("kl", "ce"):
        raise HagoError(f"fisher_loss must be 'kl' or 'ce', got {fisher_loss!r}")
    if iters < 1:
        raise HagoError(f"iters must be >= 1, got {iters}")
    t0 = time.perf_counter()
    torch.manual_seed(int(seed))
    mod = to_torch(model)
    mod.eval()
    X, labels = _calib_arrays(calib, mod.input_names, num_samples)
    X = {k: torch.from_numpy(v) for k, v in X.items()}
    confs = _weight_confs(mod, w_bits, per_channel, symmetric, first_last_8bit, weight_names, scale_p)
    units = find_blocks(mod, granularity, weight_names=list(confs), blocks=blocks)
    method = "brecq" if (blocks is not None or granularity == "block") else "adaround"
    res = BrecqResult(method=method, weights={}, scales={}, zero_points={}, codes={}, axes={}, bits={},
                      blocks=units)
    first = _weighted(mod, None)[0][1]
    done: set[str] = set()
    qf, ff = _Frontier(mod, X, quant=True), _Frontier(mod, X, quant=False)
    for bi, b in enumerate(units):
        names = [w for w in b.weights if w in confs and w not in done]
        if not names:
            continue
        entry: dict[str, Any] = {"block": b.name, "kind": b.kind, "weights": names,
                                 "inputs": b.inputs, "outputs": b.outputs}
        if first_last_8bit and names == [first] and b.kind == "layer":
            c = confs[first]
            q, _ = quantize_nearest(mod.initializer(first).detach().numpy(), c.scale, c.zero_point, c.bits, c.axis)
            mod.set_quantizer(first, fixed_quantizer(_store(res, c, q)))
            done.add(first)
            qf.invalidate(mod._consumers.get(first, []))
            entry["skipped"] = "first layer at 8 bits, rounded to nearest (as the reference code)"
            res.log.append(entry)
            continue
        qin = qf.get(b.inputs)
        fout = ff.get(b.outputs)
        wnodes = [i for w in names for i in mod._consumers.get(w, [])]
        with torch.no_grad():
            for w in names:
                c = confs[w]
                q, _ = quantize_nearest(mod.initializer(w).detach().numpy(), c.scale, c.zero_point, c.bits, c.axis)
                mod.set_quantizer(w, fixed_quantizer(dequantize(q, c.scale, c.zero_point, c.axis)))
            out0 = mod.run_subgraph(qin, b.outputs)
            rtn_err = sum(float(((out0[k] - fout[k]) ** 2).mean()) for k in b.outputs)
        quants = {}
        for w in names:
            c = confs[w]
            quants[w] = adaround_quantizer(mod.initializer(w).detach().numpy(), c.scale, c.zero_point, c.bits, c.axis)
            mod.set_quantizer(w, quants[w])
        grads = _fisher_grads(mod, X, labels, b, batch_size, fisher_loss) if fisher else None

        def fwd(batch, _outs=tuple(b.outputs)):
            return mod.run_subgraph(batch, _outs)

        rl = reconstruct(fwd, qin, fout, weight_quantizers=list(quants.values()), grads=grads, iters=iters,
                         batch_size=batch_size, lam=lam, b_range=b_range, warmup=warmup, p=p, lr=lr,
                         seed=int(seed) * 100003 + bi, log_every=log_every)
        with torch.no_grad():
            for w, q in quants.items():
                c = confs[w]
                codes = q.codes(mod.initializer(w)).detach().numpy().astype(np.int64)
                mod.set_quantizer(w, fixed_quantizer(_store(res, c, codes)))
                done.add(w)
            out1 = mod.run_subgraph(qin, b.outputs)
            final_err = sum(float(((out1[k] - fout[k]) ** 2).mean()) for k in b.outputs)
        del qin, fout, out0, out1
        qf.invalidate(wnodes)
        qf.advance(max(b.nodes))
        ff.advance(max(b.nodes))
        entry.update(rtn_mse=rtn_err, mse=final_err, first_rec=rl.first_rec, last_rec=rl.last_rec,
                     seconds=rl.seconds, history=rl.history)
        res.log.append(entry)
        if verbose:
            print(f"[brecq] {b.name}: output mse {rtn_err:.3g} (nearest) -> {final_err:.3g}, {rl.seconds:.1f}s",
                  flush=True)
    for w, c in confs.items():  # weights outside every block: round to nearest
        if w not in done:
            q, _ = quantize_nearest(mod.initializer(w).detach().numpy(), c.scale, c.zero_point, c.bits, c.axis)
            mod.set_quantizer(w, fixed_quantizer(_store(res, c, q)))
            res.log.append({"weight": w, "note": "in no block: rounded to nearest"})
    if a_bits is not None:
        aqs = _install_acts(mod, X, a_bits, first_last_8bit, act_p, n_act_init)
        _learn_act_steps(mod, X, units, aqs, res, iters_a=iters_a, batch_size=batch_size, act_p=act_p,
                         act_lr=act_lr, seed=seed, log_every=log_every, verbose=verbose)
        _store_acts(res, aqs)
    res.seconds = time.perf_counter() - t0
    return res


def _learn_act_steps(mod, X: dict, units: Sequence[Block], aqs: dict, res: BrecqResult, *, iters_a: int,
                     batch_size: int, act_p: float, act_lr: float, seed: int, log_every: int = 0,
                     verbose: bool = False) -> None:
    """The activation pass: the steps of the quantizers in ``aqs`` learned block by block (LSQ).

    A block learns the steps of the quantizers in front of its weight layers (Conv / Gemm / MatMul with a
    quantized weight initializer), the values the reference code's ``QuantModule`` / block output
    quantizers sit on, each with the first block that reads it; the quantizers on values computed
    inside a block (HardSwish / Swish / SE gates, LayerNorm statistics, attention q / k / probabilities,
    residual-merge operands) keep their Lp initialisation (see the module docstring)."""
    torch = require_torch()
    qf, ff = _Frontier(mod, X, quant=True), _Frontier(mod, X, quant=False)
    owned: set[str] = set()
    for bi, b in enumerate(units):
        wnodes = [i for i in b.nodes if mod.nodes[i].op_type in WEIGHT_OPS
                  and any(w in b.weights for _, w in weight_inputs(mod.nodes[i], mod.initializer_names))]
        consumed = [v for v in aqs if v not in owned and any(v in mod.nodes[i].input for i in wnodes)]
        if not consumed or iters_a < 1:
            continue
        owned.update(consumed)
        qin = qf.get(b.inputs)
        fout = ff.get(b.outputs)

        def afwd(batch, _outs=tuple(b.outputs)):
            return mod.run_subgraph(batch, _outs, quantize_inputs=True)

        rl = reconstruct(afwd, qin, fout, act_params=[aqs[v].delta for v in consumed], iters=iters_a,
                         batch_size=batch_size, p=act_p, lr=act_lr, seed=int(seed) * 100003 + 50021 + bi,
                         log_every=log_every)
        with torch.no_grad():
            for v in consumed:
                aqs[v].delta.clamp_(min=1e-8)
        del qin, fout
        qf.invalidate([i for v in consumed for i in mod._consumers.get(v, [])])
        qf.advance(max(b.nodes))
        ff.advance(max(b.nodes))
        res.log.append({"block": b.name, "act_values": consumed, "first_rec": rl.first_rec,
                        "last_rec": rl.last_rec, "seconds": rl.seconds})
        if verbose:
            print(f"[brecq] {b.name}: activation steps {rl.first_rec:.3g} -> {rl.last_rec:.3g}, "
                  f"{rl.seconds:.1f}s", flush=True)


def adaround(model: onnx.ModelProto, calib, **kwargs) -> BrecqResult:
    """Layer-wise AdaRound: :func:`brecq` with ``granularity="layer"``."""
    kwargs["granularity"] = "layer"
    kwargs.pop("blocks", None)
    return brecq(model, calib, **kwargs)


def simulate(model: onnx.ModelProto, result: BrecqResult, *, activations: bool = True):
    """An ``OnnxModule`` computing ``model`` with ``result``'s quantized weights and (fake-quantized) activations."""
    mod = to_torch(model)
    for w, arr in result.weights.items():
        mod.set_quantizer(w, fixed_quantizer(arr))
    if activations:
        for v, s in result.act_scales.items():
            mod.set_quantizer(v, act_quantizer(result.act_bits[v], s, result.act_zero_points[v]))
    mod.eval()
    return mod
