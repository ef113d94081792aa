"""``hago.compile``: a (quantized or float) model -> TVM-compiled :class:`Artifact` for a spec's target.

Pipeline::

    model -> Relax IRModule            QDQ ONNX: hago.backend.realize (integer regions); float ONNX: TVM's ONNX
                                       frontend with static shapes; an IRModule as is
    [x86 AVX2, int8]                   PackInt8Ops: int8 conv2d/matmul -> NCHW{16}c / OIHW{4}i{16}o{4}i packed
                                       layouts (hago.backend.x86_int8)
    legalize + fuse                    library dispatch, LegalizeOps, FoldConstant, FuseOps, FuseTIR
    tune (tune_trials > 0)             MetaSchedule per fused kernel, persistent database per target in cache_dir
                                       (AVX2: design space with the vpmaddubsw/vpmaddwd tensor intrinsic)
    apply database                     best schedules found so far (also from earlier compiles when tune_trials=0)
    [GPU] dlight default schedules     for kernels without tuning records
    lower + build                      relax.build -> VMExecutable

Untuned CPU kernels are correct but slow (plain loops); tune for speed: ``tune_trials=64`` or more.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import time

import numpy as np

from ..errors import CompileError, HagoError, ModelError
from .target import can_run_locally, is_gpu, make_target, spec_hash_of, target_dict, target_key
from .tune import TuningReport, apply_database, default_cache_dir, open_database, tune_module

__all__ = ["Artifact", "compile", "to_irmodule", "lower_and_fuse"]

_MANIFEST = "manifest.json"
_LIB = "model.so"


# ---------------------------------------------------------------------------------------------
# model -> Relax IRModule


def _is_qdq(model) -> bool:
    """A model for :mod:`hago.backend.realize`: QDQ nodes, or hago's packed 4-bit tables (a Gather on a uint8
    table whose rows are unpacked with BitwiseAnd/BitShift), which realize lowers to a dequantizing gather."""
    ops = {n.op_type for n in model.graph.node}
    return bool(ops & {"QuantizeLinear", "DequantizeLinear"}) or {"Gather", "BitShift", "BitwiseAnd"} <= ops


def _static_shapes(model, input_shapes: dict | None) -> dict:
    """Input shapes with symbolic dims bound to 1 (or to ``input_shapes``)."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if input_shapes and vi.name in input_shapes:
            out[vi.name] = [int(d) for d in input_shapes[vi.name]]
            continue
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else 1)
        out[vi.name] = dims
    return out


def _onnx_dtypes(model) -> dict:
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        out[vi.name] = str(np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)))
    return out


def _spec_realize_options(spec) -> dict:
    opts = {}
    if spec is None:
        return opts
    rq = getattr(spec, "requantize", None)
    if rq in ("fixed_point", "float"):
        opts["requantize"] = rq
    acc = None
    sigs = getattr(spec, "integer_signatures", None)
    if callable(sigs):
        for op in ("Conv", "Gemm", "MatMul"):
            for s in sigs(op) or []:
                if getattr(s, "accumulator", None):
                    acc = s.accumulator
                    break
            if acc:
                break
    if acc in ("int32", "int16"):
        opts["accumulator"] = acc
    return opts


def to_irmodule(model, *, spec=None, input_shapes: dict | None = None, border_kernels: str = "fused"):
    """``(IRModule, output_names, quant_params)`` for a ModelProto, an IRModule, a QuantizedGraph (``to_qdq()``)
    or a float Graph (``to_onnx()``)."""
    import onnx
    import tvm

    if isinstance(model, tvm.IRModule):
        if "main" not in [gv.name_hint for gv in model.get_global_vars()]:
            raise CompileError("compile: the IRModule has no 'main' function")
        return model, None, None
    proto = None
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif hasattr(model, "to_qdq"):
        proto = model.to_qdq()
    elif hasattr(model, "to_onnx"):
        proto = model.to_onnx()
    elif isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
        try:
            proto = onnx.load(str(model))
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"{model}: cannot load ONNX model: {e}") from e
    if proto is None:
        raise CompileError(
            f"compile: cannot compile a {type(model).__name__}: expected an onnx.ModelProto, a tvm.IRModule, "
            "a hago QuantizedGraph or a hago Graph"
        )
    out_names = [o.name for o in proto.graph.output]
    shapes = _static_shapes(proto, input_shapes)
    if _is_qdq(proto):
        from .realize import realize
        from .simplify import fold_requantize_round_trips

        mod = realize(proto, input_shapes=shapes, border_kernels=border_kernels, **_spec_realize_options(spec))
        return fold_requantize_round_trips(mod), out_names, _quant_params(proto)
    from tvm.relax.frontend.onnx import from_onnx

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the frontend prints the node it failed on, then raises
            mod = from_onnx(proto, shape_dict=shapes, dtype_dict=_onnx_dtypes(proto), keep_params_in_input=False)
    except Exception as e:  # noqa: BLE001 - the frontend raises anything
        # TVM's frontend cannot take a shape computed by a subgraph (Shape -> Gather -> Concat -> Reshape, as in
        # PP-OCR's recognizer). hago's realize evaluates such subgraphs on the static input shapes and imports the
        # remaining nodes one by one, the way it lowers the float parts of a quantized model.
        from .realize import realize

        try:
            mod = realize(proto, input_shapes=shapes, border_kernels=border_kernels, **_spec_realize_options(spec))
        except Exception as e2:  # noqa: BLE001
            raise ModelError(f"compile: TVM's ONNX frontend cannot import the model ({proto.graph.name}): {e}; "
                             f"nor can hago's realize: {type(e2).__name__}: {e2}") from e
    return mod, out_names, None


def _quant_params(proto) -> dict:
    """Activation quantization parameters of a QDQ model: {tensor: {scale, zero_point, dtype}} per QuantizeLinear."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consts = {}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    out = {}
    for n in proto.graph.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 2:
            continue

        def val(name):
            if name in inits:
                return numpy_helper.to_array(inits[name])
            return consts.get(name)

        s = val(n.input[1])
        z = val(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if s is None:
            continue
        out[n.input[0]] = {
            "scale": np.asarray(s, dtype=np.float64).ravel().tolist(),
            "zero_point": (np.asarray(z).astype(np.int64).ravel().tolist() if z is not None else [0]),
            "dtype": str(z.dtype) if z is not None else "uint8",
        }
    return out


# ---------------------------------------------------------------------------------------------
# passes


def int8_isa(target, avx2_int8=None, int8_kernels: str | None = None) -> str | None:
    """Which packed int8 kernels to use for ``target``: ``"vnni"`` (AVX-512 VNNI), ``"avx2"`` or None (TVM's
    generic lowering). ``int8_kernels`` (``"vnni"``, ``"avx2"``, ``"none"``) forces a choice the target supports;
    ``avx2_int8`` (the older switch) True forces the AVX2 kernels, False none; by default the best the target
    has."""
    from . import x86_int8

    if int8_kernels is not None:
        if int8_kernels == "none":
            return None
        if int8_kernels not in x86_int8.ISAS:
            raise CompileError(f"compile: int8_kernels must be one of {', '.join(x86_int8.ISAS)} or 'none', "
                               f"got {int8_kernels!r}")
        ok = x86_int8.target_has_vnni(target) if int8_kernels == "vnni" else x86_int8.target_has_avx2(target)
        if not ok:
            raise CompileError(f"compile: int8_kernels={int8_kernels!r} but target {target} lacks "
                               f"{'AVX-512 VNNI' if int8_kernels == 'vnni' else 'AVX2'}")
        return int8_kernels
    if avx2_int8 is not None:
        return "avx2" if avx2_int8 and x86_int8.target_has_avx2(target) else None
    if x86_int8.target_has_vnni(target):
        return "vnni"
    return "avx2" if x86_int8.target_has_avx2(target) else None


def vectorizable_rounding() -> None:
    """Let TVM's loop vectorizer keep ``tirx.nearbyint`` (what Relax ``round`` lowers to) in vector form.

    TVM 0.27 marks ``tirx.round``, ``floor``, ``exp`` ... ``TVectorizable`` but not ``nearbyint``, so a vectorized
    loop holding one (the float requantize epilogue) is scalarized and LLVM re-vectorizes it along another axis
    with gathers and byte scatters: a 1x1 int8 conv took twice as long with that epilogue as with none. LLVM has
    ``llvm.nearbyint`` on vectors (``vrndscaleps``), so on LLVM targets it is marked like ``round``. Idempotent.
    """
    import tvm

    op = tvm.ir.Op.get("tirx.nearbyint")
    if not op.get_attr("TVectorizable"):
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


def lower_and_fuse(mod, target, *, avx2_int8: bool = False, isa: str | None = None, int8_layout: str | None = None):
    """Pre-tuning passes: inference decomposition, integer regions to NHWC (``int8_layout="nhwc"``, the default
    with ``isa="vnni"``), int8 packing (``isa``: ``"avx2"`` or ``"vnni"``; ``avx2_int8=True`` means ``"avx2"``),
    dispatch, legalize, fuse."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as rp

    from . import x86_int8

    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
    mod = tvm.transform.Sequential(passes)(mod)
    packed = 0
    isa = isa or ("avx2" if avx2_int8 else None)
    if int8_layout is None:
        int8_layout = "nhwc" if isa == "vnni" else "nchw"
    if int8_layout not in ("nchw", "nhwc"):
        raise CompileError(f"compile: int8_layout must be 'nchw' or 'nhwc', got {int8_layout!r}")
    if isa:
        mod = x86_int8.split_grouped_int8_convs(mod)
    if isa and int8_layout == "nhwc":
        mod = x86_int8.convert_int8_regions_to_nhwc(mod)
    if isa:
        p = x86_int8.PackInt8Ops(isa=isa)
        mod = relax.transform.CanonicalizeBindings()(p(mod))
        packed = p.count
    try:
        dispatch = rp.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    seq = [
        *dispatch,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    with target:
        mod = tvm.transform.Sequential(seq)(mod)
    return mod, packed


def schedule_border_kernels(mod):
    """Give every border quantize/dequantize kernel (``realize(..., border_kernels="separate")``) a fixed schedule:
    all loops fused, an outer parallel loop, an inner vector of 16, 8 or 4 lanes where one divides. These kernels are
    one read and one write per element; tuning them would buy little and cost a task per activation shape.
    Returns ``(mod, number scheduled)``."""
    import tvm

    from .realize import BORDER_ATTR

    count = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or not (func.attrs and func.attrs.get(BORDER_ATTR)):
            continue
        if func.attrs.get("tirx.is_scheduled", False):
            continue
        sch = tvm.s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
        if len(blocks) == 1:
            loops = sch.get_loops(blocks[0])
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            extent = int(sch.get(fused).extent)
            lanes = next((v for v in (16, 8, 4) if extent % v == 0 and extent > v), 0)
            if lanes:
                outer, inner = sch.split(fused, [None, lanes])
                sch.parallel(outer)
                sch.vectorize(inner)
            elif extent > 1:
                sch.parallel(fused)
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        count += 1
    return mod, count


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def compute_kernel(func) -> bool:
    """Whether a fused PrimFunc holds a convolution or a matrix product (a reduction over a weight): the kernels
    that need tuning. Pooling, softmax, reductions over one tensor and elementwise kernels do not."""
    text = func.script(show_meta=False)
    return any(k in text for k in ("conv2d", "matmul", "dense", "conv1d", "conv3d", "batch_matmul"))


def _touches_int8(func) -> bool:
    text = func.script(show_meta=False)
    return '"int8"' in text or '"uint8"' in text


def _gpu_default_schedules(mod, target):
    """dlight's default GPU schedules. Its ``Matmul`` rule tensorizes int8 matmuls/convs with a tensor-core path
    that fails in TVM 0.27 (``Check failed: (it != fragment_info_.end())``), so kernels that touch int8 data are
    scheduled first without it (GEMV / reduction / fallback rules: plain CUDA integer code), the others with it."""
    import tvm
    from tvm.s_tir import dlight as dl

    int8 = {gv for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and _touches_int8(f)}
    if int8:
        hidden = {}
        for gv, f in list(mod.functions_items()):
            if isinstance(f, tvm.tirx.PrimFunc) and gv not in int8 and not (f.attrs and f.attrs.get("tirx.is_scheduled")):
                hidden[gv] = f
                mod[gv] = f.with_attr("tirx.is_scheduled", True)
        with target:
            mod = dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                          dl.gpu.Fallback())(mod)
        for gv, f in hidden.items():
            mod[gv] = f
    with target:
        return dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
        )(mod)


def _finalize_and_build(mod, target):
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as rp

    if is_gpu(target):
        mod = _gpu_default_schedules(mod, target)
    try:
        lower = rp.dataflow_lower_passes(target)
    except (ValueError, AttributeError):  # cpu_generic does not export it in TVM 0.27
        lower = [relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
                 relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite()]
    try:
        final = rp.finalize_passes(target)
    except (ValueError, AttributeError):
        final = [relax.transform.StaticPlanBlockMemory(), relax.transform.LowerAllocTensor(),
                 relax.transform.KillAfterLastUse(), relax.transform.LowerRuntimeBuiltin(),
                 relax.transform.ComputePrimValue(), relax.transform.VMShapeLower(),
                 relax.transform.AttachGlobalSymbol()]

    @tvm.transform.module_pass(opt_level=0)
    def _rest(m, _ctx):
        return tvm.transform.Sequential([*lower, *final])(m)

    with target, tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target, relax_pipeline=_rest)


# ---------------------------------------------------------------------------------------------
# the artifact


@dataclasses.dataclass
class Artifact:
    """A compiled model: the Relax VM executable and what is needed to feed it."""

    target: object  # tvm.target.Target
    executable: object  # relax VMExecutable (or a loaded runtime Module)
    input_names: list
    input_shapes: list
    input_dtypes: list
    output_names: list
    spec_hash: str | None = None
    quant_params: dict | None = None
    tuning: TuningReport | None = None
    threads: int | None = None
    info: dict = dataclasses.field(default_factory=dict)
    _vm: object = dataclasses.field(default=None, repr=False)

    # -- properties ----------------------------------------------------------------------------
    @property
    def target_kind(self) -> str:
        return self.target.kind.name

    @property
    def target_str(self) -> str:
        return str(self.target)

    def runnable(self) -> tuple[bool, str]:
        return can_run_locally(self.target)

    def device(self):
        import tvm

        return tvm.device(self.target.kind.name, 0) if is_gpu(self.target) else tvm.cpu(0)

    def vm(self):
        if self._vm is None:
            from tvm import relax

            ok, why = self.runnable()
            if not ok:
                raise HagoError(f"artifact for {self.target_str} cannot run on this machine: {why}")
            self._vm = relax.VirtualMachine(self.executable, self.device())
        return self._vm

    # -- running -------------------------------------------------------------------------------
    def run(self, feeds: dict) -> list:
        """Run on ``{input name: ndarray}``; returns the outputs as a list of numpy arrays."""
        import tvm

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise HagoError(f"run: missing inputs {missing} (artifact inputs: {self.input_names})")
        vm = self.vm()  # raises first when this machine cannot run the target
        args = []
        for n, shape, dtype in zip(self.input_names, self.input_shapes, self.input_dtypes):
            a = np.asarray(feeds[n])
            if tuple(a.shape) != tuple(shape):
                raise HagoError(f"run: input {n!r} has shape {tuple(a.shape)}, the artifact was compiled for {tuple(shape)}")
            if str(a.dtype) != dtype:
                a = a.astype(dtype)
            args.append(tvm.runtime.tensor(np.ascontiguousarray(a), self.device()))
        if self.threads:
            from .measure import set_num_threads

            set_num_threads(self.threads)
        out = vm["main"](*args)
        return _flatten(out)

    # -- export / load -------------------------------------------------------------------------
    def manifest(self) -> dict:
        return {
            "hago_artifact": 1,
            "library": _LIB,
            "target": target_dict(self.target),
            "target_str": self.target_str,
            "spec_hash": self.spec_hash,
            "inputs": [{"name": n, "shape": [int(d) for d in s], "dtype": d}
                       for n, s, d in zip(self.input_names, self.input_shapes, self.input_dtypes)],
            "outputs": list(self.output_names),
            "quantization": self.quant_params,
            "threads": self.threads,
            "tuning": self.tuning.as_dict() if self.tuning is not None else None,
            "info": self.info,
        }

    def export(self, directory: str) -> str:
        """Write ``model.so`` (cross-linked for aarch64 targets) and ``manifest.json`` into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        lib = os.path.join(directory, _LIB)
        from .runner import export_module

        export_module(self.executable, self.target, lib)
        with open(os.path.join(directory, _MANIFEST), "w") as f:
            json.dump(self.manifest(), f, indent=1, default=str)
        return directory

    @classmethod
    def load(cls, directory: str) -> Artifact:
        import tvm

        mpath = os.path.join(directory, _MANIFEST)
        try:
            with open(mpath) as f:
                man = json.load(f)
        except (OSError, ValueError) as e:
            raise HagoError(f"{mpath}: cannot read the artifact manifest: {e}") from e
        if man.get("hago_artifact") != 1:
            raise HagoError(f"{mpath}: not a hago artifact manifest (hago_artifact != 1)")
        tgt = man["target"]
        host = tgt.pop("host", None) if isinstance(tgt, dict) else None
        try:
            target = tvm.target.Target(tgt, host=host) if host else tvm.target.Target(tgt)
        except Exception as e:  # noqa: BLE001
            raise HagoError(f"{mpath}: invalid target {tgt}: {e}") from e
        lib = os.path.join(directory, man.get("library", _LIB))
        ok, why = can_run_locally(target)
        executable = None
        if ok:
            try:
                executable = tvm.runtime.load_module(lib)
            except Exception as e:  # noqa: BLE001
                raise HagoError(f"{lib}: cannot load the compiled library: {e}") from e
        art = cls(
            target=target, executable=executable,
            input_names=[i["name"] for i in man["inputs"]],
            input_shapes=[tuple(i["shape"]) for i in man["inputs"]],
            input_dtypes=[i["dtype"] for i in man["inputs"]],
            output_names=list(man.get("outputs") or []),
            spec_hash=man.get("spec_hash"), quant_params=man.get("quantization"), threads=man.get("threads"),
            info=dict(man.get("info") or {}, library=lib, loadable=ok, not_loadable_reason=why),
        )
        return art


def _flatten(value) -> list:
    out = []

    def rec(v):
        if hasattr(v, "numpy"):
            out.append(v.numpy())
        elif isinstance(v, (list, tuple)) or type(v).__name__ in ("Array", "Tuple"):
            for x in v:
                rec(x)
        else:
            out.append(np.asarray(v))

    rec(value)
    return out


def _main_signature(mod):
    from tvm import relax

    f = mod["main"]
    names, shapes, dtypes = [], [], []
    for p in f.params:
        ty = p.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise CompileError(f"compile: input {p.name!r} of main is not a tensor of known shape ({ty})")
        try:
            shape = tuple(int(d) for d in ty.shape.values)
        except (TypeError, ValueError) as e:
            raise CompileError(
                f"compile: input {p.name!r} has a symbolic shape {ty.shape}; pass input_shapes={{...}}"
            ) from e
        names.append(p.name)
        shapes.append(shape)
        dtypes.append(str(ty.dtype))
    return names, shapes, dtypes


# ---------------------------------------------------------------------------------------------
# compile


def compile(model, target, *, tune_trials: int = 0, cache_dir: str | None = None, threads: int | None = None,  # noqa: A001
            progress: bool = True, input_shapes: dict | None = None, avx2_int8: bool | None = None,
            int8_kernels: str | None = None,
            seed: int | None = 0, int8_schedule: str = "manual", border_kernels: str = "fused",
            tune_scope: str = "all") -> Artifact:
    """Compile ``model`` for ``target`` (a TVM target dict/Target/string, a HardwareSpec, or a shipped spec's name
    such as ``"x86_avx512_vnni"`` or ``"host"``).

    ``tune_trials``: MetaSchedule trials per distinct kernel (0: no new tuning; records already in the cache are
    still used). ``cache_dir``: tuning database root (default ``~/.cache/hago/tuning``; one subdirectory per
    target and design space). ``threads``: thread count for tuning measurements and for running the artifact.
    ``int8_kernels``: the packed int8 layouts and which tensor intrinsic they use: ``"vnni"`` (AVX-512 VNNI
    ``vpdpbusd``; integer regions in NHWC), ``"avx2"`` (``vpmaddubsw`` + ``vpmaddwd``) or ``"none"``; default: the
    best the target has. ``avx2_int8`` (older switch): True is ``int8_kernels="avx2"``, False ``"none"``.
    ``int8_schedule``: ``"manual"`` gives the packed int8 convolutions and matmuls hago's hand-written schedules
    (register-blocked, tensorized; no tuning needed), ``"tune"`` leaves them to MetaSchedule. ``input_shapes``:
    ``{name: shape}`` for symbolic ONNX inputs (else symbolic dims become 1).
    ``border_kernels``: ``"fused"`` (default) fuses the quantize/dequantize at the border of an integer region into
    the neighbouring kernels; ``"separate"`` gives each a kernel of its own with a fixed schedule, so that a model
    with float fallbacks reuses the tuned kernels of the all-float and all-integer models (the search measures
    candidates this way). ``tune_scope``: ``"all"`` tunes every kernel without a record; ``"compute"`` only those
    holding a conv or matmul (the others keep a record if the database has one, else TVM's default lowering).
    """
    import tvm

    t_start = time.perf_counter()
    if isinstance(target, str):  # a shipped spec's name ("x86_avx512_vnni", "host") stands for that spec
        from ..hwspec.spec import load_spec, shipped_spec_path

        if target == "host" or shipped_spec_path(target) is not None:
            target = load_spec(target)
    spec = target if hasattr(target, "target") and isinstance(getattr(target, "target"), dict) else None
    tgt = make_target(target, threads=threads)
    if tgt.kind.name == "llvm":
        vectorizable_rounding()
    if tune_scope not in ("all", "compute"):
        raise CompileError(f"compile: tune_scope must be 'all' or 'compute', got {tune_scope!r}")
    mod, out_names, qparams = to_irmodule(model, spec=spec, input_shapes=input_shapes, border_kernels=border_kernels)
    names, shapes, dtypes = _main_signature(mod)
    isa = int8_isa(tgt, avx2_int8, int8_kernels)
    try:
        fused, packed = lower_and_fuse(mod, tgt, isa=isa)
    except HagoError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"compile: lowering for {tgt} failed: {type(e).__name__}: {e}") from e
    fused, borders = schedule_border_kernels(fused)
    manual = 0
    if isa and int8_schedule == "manual":
        from . import x86_int8

        fused, manual = x86_int8.schedule_packed_convs(fused, isa)
    elif int8_schedule not in ("manual", "tune"):
        raise CompileError(f"compile: int8_schedule must be 'manual' or 'tune', got {int8_schedule!r}")
    variant = f"{isa}-int8" if isa else "default"
    root = cache_dir if cache_dir is not None else default_cache_dir()
    db_dir = os.path.join(root, target_key(tgt, variant))
    report = TuningReport(database_dir=db_dir)
    space = None
    if isa:
        from . import x86_int8

        space = x86_int8.space_generator(x86_int8.intrinsic_for(isa))
    if tune_trials and tune_trials > 0:
        db, report = tune_module(fused, tgt, trials_per_task=int(tune_trials), database_dir=db_dir, progress=progress,
                                 space=space, threads=threads, seed=seed, report=report,
                                 task_filter=compute_kernel if tune_scope == "compute" else None)
    elif os.path.exists(os.path.join(db_dir, "database_tuning_record.json")):
        db = open_database(db_dir)
    else:
        db = None
    if db is not None:
        fused = apply_database(fused, tgt, db, report)
    try:
        ex = _finalize_and_build(fused, tgt)
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"compile: building for {tgt} failed: {type(e).__name__}: {str(e)[-2000:]}") from e
    if out_names is None:
        out_names = []
    info = {"avx2_int8": isa == "avx2", "int8_kernels": isa or "none", "packed_int8_ops": packed, "hand_scheduled_convs": manual,
            "border_kernels": borders, "compile_seconds": round(time.perf_counter() - t_start, 3),
            "tvm": tvm.__version__}
    if not out_names:
        ret = mod["main"].ret_ty if hasattr(mod["main"], "ret_ty") else None
        n_out = len(ret.fields) if ret is not None and hasattr(ret, "fields") else 1
        out_names = [f"output{i}" for i in range(n_out)]
    return Artifact(target=tgt, executable=ex, input_names=names, input_shapes=shapes, input_dtypes=dtypes,
                    output_names=out_names, spec_hash=spec_hash_of(spec) if spec is not None else None,
                    quant_params=qparams, tuning=report, threads=threads, info=info)
