"""hago.backend.compile / tune / target / x86_int8: compile, run, export, tuning cache, AVX2 int8 intrinsic."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from hago.backend import x86_int8  # noqa: E402
from hago.backend.compile import Artifact, compile  # noqa: E402
from hago.backend.target import can_run_locally, make_target  # noqa: E402
from hago.errors import CompileError, HagoError  # noqa: E402

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "core-avx2", "mattr": ["+avx2", "+fma"]}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}


def _host_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


needs_avx2 = pytest.mark.skipif(not _host_has_avx2(), reason="this CPU has no AVX2")
VNNI = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake",
        "mattr": ["+avx512f", "+avx512bw", "+avx512vnni"]}


def _host_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        return " avx512_vnni" in txt and " avx512bw" in txt
    except OSError:
        return False


def _float_model():
    rs = np.random.RandomState(0)
    w = rs.randn(4, 3, 3, 3).astype(np.float32) * 0.3
    b = rs.randn(4).astype(np.float32)
    m = rs.randn(4 * 6 * 6, 5).astype(np.float32) * 0.1
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("MatMul", ["f", "M"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"), numpy_helper.from_array(m, "M")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _int8_conv_module(w: np.ndarray, shape=(1, 16, 8, 8)):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=[1, 1, 1, 1], out_dtype="int32"))
            o = bb.emit_output(y)
        bb.emit_func_output(o)
    return bb.get()


def _conv_ref(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, o, h, wd), np.int64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j].astype(np.int64))
    return out


def _matmul_module(m=8, k=32, n=16):
    rs = np.random.RandomState(1)
    wt = rs.randn(k, n).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(wt)))
            o = bb.emit_output(y)
        bb.emit_func_output(o)
    return bb.get(), wt


# ---------------------------------------------------------------------------------------------


def test_float_onnx_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _float_model()
    art = compile(model, X86, cache_dir=str(tmp_path / "cache"), progress=False)
    assert art.input_names == ["x"] and art.input_shapes == [(1, 3, 6, 6)] and art.input_dtypes == ["float32"]
    assert art.output_names == ["y"]
    x = np.random.RandomState(2).rand(1, 3, 6, 6).astype(np.float32)
    got = art.run({"x": x})
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert len(got) == 1
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)
    # export and load back
    d = art.export(str(tmp_path / "art"))
    assert os.path.exists(os.path.join(d, "model.so"))
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert man["inputs"][0]["name"] == "x" and man["outputs"] == ["y"] and man["target"]["kind"] == "llvm"
    art2 = Artifact.load(d)
    np.testing.assert_allclose(art2.run({"x": x})[0], got[0], rtol=0, atol=0)


def test_float_model_with_computed_shapes_compiles_through_realize(tmp_path, capsys):
    """TVM's ONNX frontend cannot import a Reshape whose shape a Shape -> Gather -> Concat chain computes (PP-OCR's
    recognizer has them); the float model then compiles through realize, which folds the chain on the static input
    shapes, and matches onnxruntime. The frontend's own print of the failing node does not reach the user."""
    import sys

    ort = pytest.importorskip("onnxruntime")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from builders import dynamic_reshape_net

    model = dynamic_reshape_net()
    art = compile(model, X86, input_shapes={"x": [2, 4, 5, 7]}, cache_dir=str(tmp_path / "cache"), progress=False)
    assert "Error converting operator" not in capsys.readouterr().out
    x = np.random.RandomState(3).randn(2, 4, 5, 7).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = art.run({"x": x})[0]
    assert got.shape == ref.shape == (2, 35, 6)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_input_shapes_override_and_errors(tmp_path):
    art = compile(_float_model(), "llvm", input_shapes={"x": [2, 3, 6, 6]}, progress=False,
                  cache_dir=str(tmp_path))
    assert art.input_shapes == [(2, 3, 6, 6)]
    with pytest.raises(HagoError, match="shape"):
        art.run({"x": np.zeros((1, 3, 6, 6), np.float32)})
    with pytest.raises(HagoError, match="missing"):
        art.run({})
    with pytest.raises(CompileError, match="kind"):
        compile(_float_model(), {"mcpu": "core-avx2"})
    with pytest.raises(CompileError, match="cannot compile"):
        compile(42, X86)


def test_spec_object_target_and_hash(tmp_path):
    class Spec:  # what compile needs of a HardwareSpec
        target = X86
        hash = "abc123"
        requantize = "fixed_point"

    art = compile(_float_model(), Spec(), cache_dir=str(tmp_path), progress=False)
    assert art.spec_hash == "abc123"
    assert art.manifest()["spec_hash"] == "abc123"


@needs_avx2
def test_int8_irmodule_packed_matches_numpy(tmp_path):
    rs = np.random.RandomState(3)
    w = rs.randint(-63, 64, size=(16, 16, 3, 3)).astype(np.int8)
    mod = _int8_conv_module(w)
    x = rs.randint(0, 256, size=(1, 16, 8, 8)).astype(np.uint8)
    ref = _conv_ref(x, w)
    for avx2 in (True, False):
        art = compile(mod, X86, avx2_int8=avx2, cache_dir=str(tmp_path), progress=False)
        assert art.info["avx2_int8"] is avx2
        assert art.info["packed_int8_ops"] == (1 if avx2 else 0)
        np.testing.assert_array_equal(art.run({"x": x})[0], ref)


def _int8_conv_requant_module(w, shape, stride, pad):
    """conv (int32) -> >> 8 -> clip [0, 255] -> u8: the requantize epilogue fuses into the conv kernel."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=pad, out_dtype="int32"))
            z = relax.op.clip(relax.op.right_shift(y, relax.const(8, "int32")), 0, 255)
            o = bb.emit_output(bb.emit(relax.op.astype(z, "uint8")))
        bb.emit_func_output(o)
    return bb.get()


def _conv_ref_general(x, w, stride, pad):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.int64))
    return out


@needs_avx2
@pytest.mark.parametrize("c,hw,k,ksz,stride,pad", [
    (16, 8, 16, 3, 1, 1),   # width 8: register block of 4
    (32, 13, 32, 1, 1, 0),  # width 13 (prime): computed on 16 columns, 3 cropped
    (16, 15, 32, 3, 2, 1),  # stride 2, two output-channel blocks
    (8, 7, 16, 3, 1, 1),    # 8 input channels (ib 8), width 7
    (3, 9, 10, 3, 1, 1),    # RGB input (3 channels padded to 4), 10 outputs (padded to 16, cropped)
])
def test_hand_scheduled_int8_conv_is_exact(tmp_path, c, hw, k, ksz, stride, pad):
    rs = np.random.RandomState(c + hw + k)
    w = rs.randint(-63, 64, size=(k, c, ksz, ksz)).astype(np.int8)
    x = rs.randint(0, 256, size=(1, c, hw, hw)).astype(np.uint8)
    mod = _int8_conv_requant_module(w, (1, c, hw, hw), stride, pad)
    ref = np.clip(_conv_ref_general(x, w, stride, pad) >> 8, 0, 255).astype(np.uint8)
    art = compile(mod, X86, avx2_int8=True, cache_dir=str(tmp_path), progress=False, threads=1)
    assert art.info["hand_scheduled_convs"] == 1
    np.testing.assert_array_equal(art.run({"x": x})[0], ref)
    # the schedule is really the tensorized one: the kernel calls vpmaddubsw
    tuned = compile(mod, X86, avx2_int8=True, int8_schedule="tune", cache_dir=str(tmp_path), progress=False)
    assert tuned.info["hand_scheduled_convs"] == 0
    np.testing.assert_array_equal(tuned.run({"x": x})[0], ref)


def test_hand_schedule_emits_the_avx2_instructions():
    from hago.backend.compile import lower_and_fuse, make_target

    rs = np.random.RandomState(0)
    w = rs.randint(-63, 64, size=(16, 16, 3, 3)).astype(np.int8)
    fused, packed = lower_and_fuse(_int8_conv_requant_module(w, (1, 16, 8, 8), 1, 1), make_target(X86), avx2_int8=True)
    fused, n = x86_int8.schedule_packed_convs(fused)
    assert packed == 1 and n == 1
    scheduled = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
                 and f.attrs is not None and f.attrs.get("tirx.is_scheduled", False)]
    assert len(scheduled) == 1
    text = scheduled[0].script()
    assert "llvm.x86.avx2.pmadd.ub.sw" in text and "llvm.x86.avx2.pmadd.wd" in text and "T.parallel" in text


def test_int8_schedule_option_is_checked(tmp_path):
    with pytest.raises(CompileError, match="int8_schedule"):
        compile(_matmul_module()[0], X86, int8_schedule="fast", cache_dir=str(tmp_path), progress=False)


@needs_avx2
@pytest.mark.parametrize("k,n", [(32, 16), (30, 10)])  # (30, 10): zero-padded to 32 x 16, output cropped
def test_int8_matmul_packed_matches_numpy(tmp_path, k, n):
    rs = np.random.RandomState(6)
    w = rs.randint(-63, 64, size=(k, n)).astype(np.int8)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, k), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w), out_dtype="int32"))
            o = bb.emit_output(y)
        bb.emit_func_output(o)
    art = compile(bb.get(), X86, avx2_int8=True, cache_dir=str(tmp_path), progress=False)
    assert art.info["packed_int8_ops"] == 1
    xv = rs.randint(0, 256, size=(4, k)).astype(np.uint8)
    np.testing.assert_array_equal(art.run({"x": xv})[0], xv.astype(np.int64) @ w.astype(np.int64))


def test_pack_int8_ops_skips_what_it_cannot_pack():
    w = np.ones((16, 16, 3, 3), np.int8)
    p = x86_int8.PackInt8Ops()
    p(_int8_conv_module(w.astype(np.float32), shape=(1, 16, 8, 8)))  # not an int8 conv: left alone
    assert p.count == 0
    p = x86_int8.PackInt8Ops()
    p(_int8_conv_module(np.ones((10, 3, 3, 3), np.int8), shape=(1, 3, 8, 8)))  # odd channels: padded, packed
    assert p.count == 1


def test_vpmaddubsw_reference_saturates():
    a = np.array([[255, 255, 1, 2]], np.uint8)
    b = np.array([[127, 127, -128, -128]], np.int8)
    np.testing.assert_array_equal(x86_int8.vpmaddubsw_reference(a, b), [[32767, -384]])
    a2 = np.full((1, 4), 255, np.uint8)
    w = np.array([[-128, -128, 63, 63]], np.int8)
    # (255*-128)*2 saturates to -32768; 255*63*2 = 32130 is exact
    assert x86_int8.dot_avx2_reference(a2, w)[0, 0] == -32768 + 32130
    assert 2 * 255 * x86_int8.MAX_EXACT_WEIGHT <= 32767 < 2 * 255 * (x86_int8.MAX_EXACT_WEIGHT + 1)
    # a symmetric 7-bit weight range never saturates: the worst pair sums are exact
    for wv in (-64, -63, 63):
        ww = np.full((1, 4), wv, np.int8)
        assert x86_int8.dot_avx2_reference(a2, ww)[0, 0] == 4 * 255 * wv


def _tensorized_dense(m: int, k: int, n: int, intrin: str, lanes: int, target=X86):
    """A u8 [m, k] x packed s8 [n/lanes, k/4, lanes, 4] -> s32 [m, n] kernel, tensorized with ``intrin``."""
    from tvm import te
    from tvm.s_tir import Schedule

    x86_int8.register_intrinsics()
    a = te.placeholder((m, k), "uint8", name="A")
    wp = te.placeholder((n // lanes, k // 4, lanes, 4), "int8", name="W")
    c = x86_int8.dense_packed_int8_te(a, wp)
    f = te.create_prim_func([a, wp, c])
    sch = Schedule(f)
    blk = sch.get_sblock("dense_packed_int8")
    i, j, ko, ki = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, lanes])
    sch.reorder(i, jo, ko, ji, ki)
    inner = sch.blockize(ji)
    sch.decompose_reduction(inner, ko)
    sch.tensorize(inner, intrin)
    return tvm.compile(sch.mod, target=make_target(target))


def test_vnni_intrinsic_is_one_vpdpbusd_exact_with_8bit_weights():
    """The VNNI block is a single vpdpbusd (no int16 step) and, where this CPU can run it, exact for every u8 x s8
    pair, full 8-bit weights included (what the x86_avx512_vnni spec promises)."""
    m, k, n = 6, 64, 32
    f = _tensorized_dense(m, k, n, x86_int8.VNNI_DOT_16x4, 16, target=VNNI)
    asm = f.mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "vpmaddubsw" not in asm
    if not _host_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: compiled and checked the instructions only")
    rs = np.random.RandomState(5)
    a = rs.randint(0, 256, size=(m, k)).astype(np.uint8)
    a[0, :] = 255
    w = rs.randint(-128, 128, size=(n, k)).astype(np.int8)
    w[0, :], w[1, :] = -128, 127  # the pairs that saturate vpmaddubsw
    dev = tvm.cpu()
    out = tvm.runtime.empty((m, n), "int32", dev)
    f(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(x86_int8.pack_dense_weight(np.ascontiguousarray(w.T), 16), dev),
      out)
    np.testing.assert_array_equal(out.numpy(), a.astype(np.int64) @ w.astype(np.int64).T)


@pytest.mark.parametrize("shape,oc,k,stride,pad", [((1, 32, 14, 14), 32, 3, 1, 1), ((1, 16, 9, 9), 48, 3, 2, 1),
                                                   ((1, 3, 10, 10), 16, 3, 1, 1), ((1, 64, 7, 7), 16, 1, 1, 0),
                                                   ((1, 32, 7, 7), 64, 3, 1, 1), ((1, 32, 8, 8), 32, 1, 1, 0)])
def test_int8_conv_vnni_kernels_exact(tmp_path, shape, oc, k, stride, pad):
    """On a VNNI target the packed layouts and the hand-written schedule use vpdpbusd by default; the result is the
    exact integer conv with 8-bit weights (odd widths: register blocks of 7 or 14 pixels with padded columns; 3
    input channels: zero-padded to 4; rows of 7 or 8 pixels: two oc blocks per register block)."""
    rs = np.random.RandomState(6)
    w = rs.randint(-128, 128, size=(oc, shape[1], k, k)).astype(np.int8)
    art = compile(_int8_conv_requant_module(w, shape, stride, pad), VNNI, cache_dir=str(tmp_path), progress=False)
    assert art.info["int8_kernels"] == "vnni" and art.info["packed_int8_ops"] == 1
    assert art.info["hand_scheduled_convs"] >= 1  # the conv (and the layout transposes at the region's ends)
    if not _host_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    x = rs.randint(0, 256, size=shape).astype(np.uint8)
    ref = np.clip(_conv_ref_general(x, w, stride, pad) >> 8, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(art.run({"x": x})[0], ref)


def test_int8_kernels_choice_and_errors(tmp_path):
    from hago.backend.compile import int8_isa

    assert int8_isa(make_target(VNNI)) == "vnni"
    assert int8_isa(make_target(X86)) == "avx2"
    assert int8_isa(make_target(AARCH64)) is None
    assert int8_isa(make_target(VNNI), avx2_int8=True) == "avx2"  # the older switch keeps its meaning
    assert int8_isa(make_target(VNNI), int8_kernels="none") is None
    with pytest.raises(CompileError, match="lacks AVX-512 VNNI"):
        int8_isa(make_target(X86), int8_kernels="vnni")
    with pytest.raises(CompileError, match="int8_kernels must be"):
        int8_isa(make_target(X86), int8_kernels="amx")


@needs_avx2
@pytest.mark.parametrize("intrin,lanes", [(x86_int8.AVX2_DOT_16x4, 16), (x86_int8.AVX2_DOT_8x4, 8)])
def test_avx2_intrinsic_exact_with_7bit_weights_and_saturating_with_8bit(intrin, lanes):
    m, k, n = 6, 64, 32
    f = _tensorized_dense(m, k, n, intrin, lanes)
    asm = f.mod.inspect_source("asm")
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm
    rs = np.random.RandomState(4)
    dev = tvm.cpu()

    def run(a, w):
        wp = x86_int8.pack_dense_weight(np.ascontiguousarray(w.T), lanes)
        out = tvm.runtime.empty((m, n), "int32", dev)
        f(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(wp, dev), out)
        return out.numpy()

    a = rs.randint(0, 256, size=(m, k)).astype(np.uint8)
    a[0, :] = 255  # worst case row
    w7 = rs.randint(-63, 64, size=(n, k)).astype(np.int8)
    w7[0, :] = -63
    w7[1, :] = 63
    exact = a.astype(np.int64) @ w7.astype(np.int64).T
    np.testing.assert_array_equal(run(a, w7), exact)

    w8 = rs.randint(-128, 128, size=(n, k)).astype(np.int8)
    w8[0, :] = -128
    w8[1, :] = 127
    got = run(a, w8)
    model = x86_int8.dot_avx2_reference(a, w8)
    np.testing.assert_array_equal(got, model)
    exact8 = a.astype(np.int64) @ w8.astype(np.int64).T
    assert (got != exact8).any(), "the test data must make vpmaddubsw saturate"


def test_tuning_cache_second_compile_runs_no_trials(tmp_path):
    mod, wt = _matmul_module()
    cache = str(tmp_path / "tuning")
    art1 = compile(mod, X86, tune_trials=2, cache_dir=cache, progress=False, threads=1)
    rep1 = art1.tuning
    assert rep1.tasks >= 1 and rep1.tuned_tasks == rep1.tasks
    assert 1 <= rep1.new_trials <= 2 * rep1.tasks
    assert rep1.applied >= 1
    assert os.path.exists(os.path.join(rep1.database_dir, "database_tuning_record.json"))
    art2 = compile(mod, X86, tune_trials=2, cache_dir=cache, progress=False, threads=1)
    rep2 = art2.tuning
    assert rep2.new_trials == 0 and rep2.tuned_tasks == 0 and rep2.cached_tasks == rep1.tasks
    assert rep2.applied == rep1.applied
    x = np.random.RandomState(5).rand(8, 32).astype(np.float32)
    np.testing.assert_allclose(art2.run({"x": x})[0], x @ wt, rtol=1e-4, atol=1e-4)
    # a different target (thread count is part of it) has its own database
    art3 = compile(mod, X86, tune_trials=0, cache_dir=cache, progress=False, threads=2)
    assert art3.tuning.database_dir != rep1.database_dir and art3.tuning.applied == 0


def test_cuda_compile_only(tmp_path):
    mod, _ = _matmul_module()
    target = make_target({"kind": "cuda", "arch": "sm_80"})
    if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        pytest.skip("this TVM wheel has no CUDA codegen")
    try:
        art = compile(mod, {"kind": "cuda", "arch": "sm_80"}, cache_dir=str(tmp_path), progress=False)
    except CompileError as e:
        if "nvcc" in str(e) or "nvrtc" in str(e).lower() or "cuda" in str(e).lower() and "not found" in str(e):
            pytest.skip(f"no CUDA compiler on this machine: {str(e)[:200]}")
        raise
    assert art.target.kind.name == "cuda" and str(art.target.attrs["arch"]) == "sm_80"
    assert art.tuning.applied == 0  # untuned GPU kernels got dlight's default schedules (else the build fails)
    ok, why = can_run_locally(target)
    if not ok:
        with pytest.raises(HagoError, match="cannot run"):
            art.run({"x": np.zeros((8, 32), np.float32)})


def test_aarch64_cross_compile(tmp_path):
    mod, _ = _matmul_module()
    art = compile(mod, AARCH64, cache_dir=str(tmp_path), progress=False)
    assert str(art.target.attrs["mtriple"]) == "aarch64-linux-gnu"
    ok, why = art.runnable()
    assert not ok and "aarch64" in why
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu) to test export")
    d = art.export(str(tmp_path / "a64"))
    with open(os.path.join(d, "model.so"), "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


def test_cuda_compile_int8_conv(tmp_path):
    """int8 kernels avoid dlight's tensor-core Matmul rule, which fails on int8 in TVM 0.27."""
    if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        pytest.skip("this TVM wheel has no CUDA codegen")
    w = np.random.RandomState(0).randint(-63, 64, size=(16, 16, 3, 3)).astype(np.int8)
    try:
        art = compile(_int8_conv_requant_module(w, (1, 16, 8, 8), 1, 1), {"kind": "cuda", "arch": "sm_80"},
                      cache_dir=str(tmp_path), progress=False)
    except CompileError as e:
        if "nvcc" in str(e) or "nvrtc" in str(e).lower():
            pytest.skip(f"no CUDA compiler on this machine: {str(e)[:200]}")
        raise
    assert art.target.kind.name == "cuda"
    ok, _ = can_run_locally(art.target)
    if ok:  # on a GPU machine: the integer result is exact
        x = np.random.RandomState(1).randint(0, 256, size=(1, 16, 8, 8)).astype(np.uint8)
        ref = np.clip(_conv_ref_general(x, w, 1, 1) >> 8, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(art.run({"x": x})[0], ref)


def _named_add_func(block: str):
    """The same PrimFunc (a 32 x 32 x 32 matmul) with a different block name: what two compiles of the same layer
    under different Relax variable names give (MetaSchedule traces find blocks by name)."""
    from tvm import te

    a = te.placeholder((32, 32), "float32", name="a")
    b = te.placeholder((32, 32), "float32", name="b")
    k = te.reduce_axis((0, 32), name="k")
    y = te.compute((32, 32), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name=block)
    return te.create_prim_func([a, b, y])


def test_tuning_equal_kernels_under_other_block_names_keeps_database_loadable(tmp_path):
    """A kernel structurally equal to a tuned one but with other buffer/block names (a float conv of a mixed
    configuration vs the same conv in the all-float model) counts as tuned: no new trials; the database reopens
    with every record replayable, and a kernel under a third name gets the stored schedule."""
    from hago.backend.tune import apply_database, open_database, tune_module

    tgt = make_target(X86, threads=1)
    db_dir = str(tmp_path / "db")
    reports = []
    for name in ("lv7_add", "lv233_add"):
        mod = tvm.IRModule({"main": _named_add_func(name)})
        reports.append(tune_module(mod, tgt, trials_per_task=2, database_dir=db_dir, progress=False, threads=1)[1])
    assert reports[0].tuned_tasks == 1 and reports[0].new_trials > 0
    assert reports[1].tuned_tasks == 0 and reports[1].cached_tasks == 1 and reports[1].new_trials == 0
    # without the ledger (one written by an older hago, keyed otherwise) the database's records are enough
    import os

    os.remove(os.path.join(db_dir, "hago_tuned.json"))
    rep = tune_module(tvm.IRModule({"main": _named_add_func("lv5_add")}), tgt, trials_per_task=2,
                      database_dir=db_dir, progress=False, threads=1)[1]
    assert rep.tuned_tasks == 0 and rep.new_trials == 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no record needs repair
        db = open_database(db_dir)
    assert len(db) >= 1
    # a kernel under a third name gets a stored schedule
    out = apply_database(tvm.IRModule({"k": _named_add_func("lv999_add")}), tgt, db)
    assert out["k"].attrs.get("tirx.is_scheduled", False)


def test_open_database_moves_unreplayable_records_aside(tmp_path):
    from hago.backend.tune import open_database, tune_module

    tgt = make_target(X86, threads=1)
    db_dir = tmp_path / "db"
    tune_module(tvm.IRModule({"main": _named_add_func("good_add")}), tgt, trials_per_task=2,
                database_dir=str(db_dir), progress=False, threads=1)
    rec = db_dir / "database_tuning_record.json"
    lines = rec.read_text().splitlines()
    n = len(lines)
    assert n >= 1 and '"good_add"' in lines[0]
    rec.write_text("\n".join(lines + [lines[0].replace('"good_add"', '"no_such_block"')]) + "\n")
    with pytest.warns(UserWarning, match="1 record"):
        db = open_database(str(db_dir))
    assert len(db) == n
    assert "no_such_block" in (db_dir / "database_tuning_record.json.bad").read_text()
    assert "no_such_block" not in rec.read_text()


def _int8_depthwise_module(c, hw, stride, seed=0):
    """u8 x s8 depthwise 3x3 conv (int32) + bias -> fp32 requantize -> u8, as hago's realize emits it."""
    rs = np.random.RandomState(seed)
    w = rs.randint(-63, 64, size=(c, 1, 3, 3)).astype(np.int8)
    bias = rs.randint(-500, 500, size=(1, c, 1, 1)).astype(np.int32)
    scale = (rs.rand(1, c, 1, 1) * 0.02 + 0.005).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, hw, hw), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=1, groups=c,
                                           out_dtype="int32"))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            y = bb.emit(relax.op.multiply(relax.op.astype(y, "float32"), relax.const(scale)))
            y = bb.emit(relax.op.maximum(relax.op.round(y), relax.const(0.0, "float32")))
            y = bb.emit(relax.op.minimum(y, relax.const(255.0, "float32")))
            o = bb.emit_output(relax.op.astype(y, "uint8"))
        bb.emit_func_output(o)
    return bb.get()


@needs_avx2
@pytest.mark.parametrize("c,hw,stride", [(16, 14, 1), (24, 15, 2), (8, 56, 2), (32, 7, 1), (48, 10, 1)])
@pytest.mark.parametrize("target", ["avx2", "vnni"])
def test_hand_scheduled_depthwise_conv_is_exact(tmp_path, c, hw, stride, target):
    """The hand-written depthwise schedules (NCHW with AVX2; NHWC with VNNI: padding read in place, register blocks
    of 8/7/4/2 pixels, the epilogue per channel vector) compute what TVM's default schedule computes, odd widths,
    strides and channel counts (48: three vectors of 16) included."""
    if target == "vnni" and not _host_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    tgt = X86 if target == "avx2" else VNNI
    mod = _int8_depthwise_module(c, hw, stride)
    x = np.random.RandomState(1).randint(0, 256, size=(1, c, hw, hw)).astype(np.uint8)
    hand = compile(mod, tgt, cache_dir=str(tmp_path), progress=False, int8_schedule="manual")
    plain = compile(mod, tgt, cache_dir=str(tmp_path), progress=False, int8_schedule="tune")
    # (with VNNI the layout transposes at the region's ends are hand-scheduled too)
    assert hand.info["hand_scheduled_convs"] == (1 if target == "avx2" else 3)
    assert plain.info["hand_scheduled_convs"] == 0
    np.testing.assert_array_equal(hand.run({"x": x})[0], plain.run({"x": x})[0])


@needs_avx2
@pytest.mark.parametrize("spec_name,isa", [("x86_avx2", "avx2"), ("x86_avx512_vnni", "vnni")])
def test_separate_border_kernels_reuse_all_float_and_all_int8_kernels(spec_name, isa):
    """With border_kernels="separate", a configuration with a float conv between integer ones brings no unscheduled
    conv or matmul kernel that the all-float and all-integer models do not already have (so the latency-measured
    search tunes nothing new), and it computes what the fused form computes. VNNI: with NHWC integer regions too."""
    import tvm_ffi

    import hago
    from hago.backend import compile as C
    from hago.backend.tune import kernel_tasks
    from hago.search.evaluate import Evaluator
    from hago.search.space import Config, build_space

    g = hago.load(os.path.join(os.path.dirname(hago.__file__), "examples", "models", "mnist_cnn.onnx"))
    spec = hago.load_spec(spec_name)
    inp = g.input_names[0]
    rs = np.random.RandomState(0)
    calib = [{inp: rs.rand(4, 1, 28, 28).astype(np.float32)}]
    ev = Evaluator(g, spec, calib, None)
    space = build_space(g, spec)
    convs = [n for n in space.nodes if space.node_ops.get(n) == "Conv"] if isinstance(space.node_ops, dict) else []
    assert len(convs) >= 2, space.nodes
    tgt = make_target(spec, threads=1)

    def kernels(qg, border):
        mod, _, _ = C.to_irmodule(qg, spec=spec, border_kernels=border)
        fused, _ = C.lower_and_fuse(mod, tgt, isa=isa)
        fused, n_border = C.schedule_border_kernels(fused)
        fused, _ = x86_int8.schedule_packed_convs(fused, isa)
        return {tvm_ffi.structural_hash(t.mod): t.mod["main"] for t in kernel_tasks(fused)}, n_border

    known = {}
    for cfg in (Config.make({}, list(space.nodes), "mse", space), Config.make({}, [], "mse", space)):
        k, _ = kernels(ev.build(cfg), "separate")
        known.update(k)
    fused_new = 0
    # each conv alone in float between integer neighbours (an integer Gemm whose output goes straight to a float
    # consumer gets a float epilogue: a new kernel, tuned by MetaSchedule, since packed dense has no hand schedule)
    for node in convs:
        qg = ev.build(Config.make({}, [node], "mse", space))
        k_sep, n_border = kernels(qg, "separate")
        assert n_border >= 1, node
        new = [f for h, f in k_sep.items() if h not in known]
        assert not [f for f in new if C.compute_kernel(f)], (node, [f.script()[:300] for f in new])
        k_fused, zero = kernels(qg, "fused")
        assert zero == 0
        fused_new += len([f for h, f in k_fused.items() if h not in known and C.compute_kernel(f)])
    assert fused_new > 0  # fused borders do make new conv/matmul kernels
    mixed = ev.build(Config.make({}, [convs[1]], "mse", space))
    x = {inp: rs.rand(1, 1, 28, 28).astype(np.float32)}
    a = compile(mixed, spec, border_kernels="separate", progress=False).run(x)[0]
    b = compile(mixed, spec, progress=False).run(x)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.array_equal(a.argmax(-1), b.argmax(-1))
    with pytest.raises(CompileError):
        compile(mixed, spec, tune_scope="some", progress=False)


def test_open_database_is_reused_until_its_files_change(tmp_path):
    from hago.backend.tune import open_database

    d = str(tmp_path / "db")
    db1 = open_database(d)
    assert open_database(d) is db1  # opened once per process
    rec = os.path.join(d, "database_tuning_record.json")
    st = os.stat(rec)
    os.utime(rec, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # another process wrote it
    db2 = open_database(d)
    assert db2 is not db1
    assert open_database(d) is db2


def _vnni_model_check(model, input_shape, tmp_path, calib_seed=0):
    """Quantize ``model`` for x86_avx512_vnni, compile (VNNI kernels, NHWC integer regions) and compare with the
    same QDQ model on onnxruntime: every output within one quantization step of the last requantize, argmax equal."""
    import hago

    rs = np.random.RandomState(calib_seed)
    g = hago.load(model)
    name = g.input_names[0]
    calib = [{name: rs.rand(*input_shape).astype(np.float32)} for _ in range(2)]
    qg = hago.quantize(g, "x86_avx512_vnni", calib, method="minmax", progress=False)
    art = compile(qg, "x86_avx512_vnni", cache_dir=str(tmp_path), progress=False, threads=1)
    assert art.info["int8_kernels"] == "vnni"
    if not _host_has_vnni():
        return art, None
    for _ in range(2):
        x = {name: rs.rand(*input_shape).astype(np.float32)}
        got, ref = art.run(x)[0], qg.run(x)[0]
        assert np.array_equal(got.argmax(axis=-1), ref.argmax(axis=-1))
        # the classifier's output is dequantized: one step is its scale
        step = np.abs(np.diff(np.unique(ref))).min() if np.unique(ref).size > 1 else 1.0
        assert np.abs(got - ref).max() <= step * 1.01 + 1e-6
    return art, qg


def test_vnni_nhwc_mobilenetv2_matches_onnxruntime(tmp_path):
    """Depthwise and pointwise integer convs, residual adds and the classifier matmul in NHWC with the VNNI
    kernels agree with onnxruntime running hago's QDQ model; only the input and output cross layouts."""
    from hago.examples import zoo

    art, _ = _vnni_model_check(zoo.mobilenetv2(input_size=64, width=0.5, num_classes=10, seed=3), (1, 3, 64, 64),
                               tmp_path)
    # every pointwise conv, depthwise conv and the matmul took a hand-written schedule
    assert art.info["hand_scheduled_convs"] >= art.info["packed_int8_ops"] > 10


def test_vnni_nhwc_concat_and_maxpool_match_onnxruntime(tmp_path):
    """SqueezeNet's fire modules (concat of two expand convs) and max pools in NHWC integer regions."""
    from hago.examples import zoo

    _vnni_model_check(zoo.light_model("squeezenet"), (1, 3, 224, 224), tmp_path)


def test_convert_int8_regions_to_nhwc_keeps_float_convs_nchw():
    """Only integer convs move to NHWC; a float conv keeps NCHW (its kernel stays the float model's), and the
    integer clip becomes max/min so that no transpose is left between integer ops."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "uint8"))
    f = relax.Var("f", relax.TensorType((1, 8, 6, 6), "float32"))
    w8 = np.ones((8, 8, 3, 3), np.int8)
    with bb.function("main", [x, f]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w8), padding=1, out_dtype="int32"))
            y = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(y, relax.const(4, "int32")), 0, 255),
                                        "uint8"))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(w8), padding=1, out_dtype="int32"))
            z = bb.emit(relax.op.nn.conv2d(f, relax.const(np.ones((8, 8, 1, 1), np.float32))))
            o = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(o)
    text = x86_int8.convert_int8_regions_to_nhwc(bb.get()).script()
    assert text.count('data_layout="NHWC"') == 2 and text.count('data_layout="NCHW"') == 1
    assert "R.clip(" not in text and text.count("R.permute_dims(") == 2  # into the region and out of it


@pytest.mark.parametrize("shape,axes", [((1, 14, 14, 48), (0, 3, 1, 2)), ((1, 40, 7, 9), (0, 2, 3, 1))])
def test_layout_transpose_schedule_is_a_transpose(shape, axes):
    """The tiled NHWC <-> NCHW transpose schedule (odd sizes: tiles only where 16 divides) moves every element."""
    from tvm import te, topi

    x = te.placeholder(shape, "float32", name="x")
    f = x86_int8.schedule_layout_transpose(te.create_prim_func([x, topi.transpose(x, axes)]))
    assert f is not None and f.attrs["tirx.is_scheduled"]
    lib = tvm.compile(tvm.IRModule({"main": f}), target=make_target(X86))
    a = np.random.RandomState(7).rand(*shape).astype(np.float32)
    out = tvm.runtime.empty(tuple(shape[i] for i in axes), "float32", tvm.cpu())
    lib["main"](tvm.runtime.tensor(a), out)
    np.testing.assert_array_equal(out.numpy(), a.transpose(axes))


@pytest.mark.parametrize("kind", ["vsparq", "multipoint"])
def test_vnni_nhwc_seed_representations_match_onnxruntime(tmp_path, kind):
    """SPARQ-trimmed activations (pairs along the channel axis) and multipoint convs (sums of low-bit convs) through
    the VNNI kernels and NHWC regions agree with onnxruntime running the same QDQ model."""
    import hago
    from builders import conv_bn_net

    rs = np.random.RandomState(11)
    g = hago.load(conv_bn_net(batch=2))
    name = g.input_names[0]
    data = [{name: rs.rand(2, 3, 16, 16).astype(np.float32)} for _ in range(2)]
    if kind == "multipoint":
        from hago.passes.multipoint import multipoint_split

        res = multipoint_split(g, data, bits=3, points=2)
        assert res and all(mp.n == 2 for mp in res.values())
        qg = hago.quantize(g, "x86_avx512_vnni", data, weight_bits=3, method="minmax")
    else:
        qg = hago.quantize(g, "x86_avx512_vnni", data, method="minmax", sparq=kind)
    art = compile(qg, "x86_avx512_vnni", cache_dir=str(tmp_path), progress=False, threads=1)
    assert art.info["int8_kernels"] == "vnni" and art.info["packed_int8_ops"] >= 3
    if not _host_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    x = {name: rs.rand(2, 3, 16, 16).astype(np.float32)}
    got, ref = art.run(x)[0], qg.run(x)[0]
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max() + 1e-6)


def test_float_requantize_epilogue_stays_vectorized_over_channels(tmp_path):
    """The ``float`` requantize rule (the shipped x86 specs') fused into a VNNI conv: its rounding (Relax ``round``,
    TIR ``nearbyint``) must stay in the channel vector the schedule made, one ``vrndscaleps`` per 16 outputs. TVM's
    vectorizer scalarizes calls it does not know as elementwise; LLVM then re-vectorized the loop across pixels
    with gathers and byte scatters. The max/min bounds keep the epilogue in the NHWC region (a clip put a
    transpose between the conv and its cast). The result equals the numpy model of the rule."""
    from onnx import TensorProto, helper, numpy_helper

    import hago

    rs = np.random.RandomState(2)
    c, hw, oc = 32, 28, 64
    w = (rs.randn(oc, c, 1, 1) * 0.2).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"]),
         helper.make_node("MaxPool", ["z"], ["p"], kernel_shape=[1, 1])],
        "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)], initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": rs.rand(1, c, hw, hw).astype(np.float32)} for _ in range(2)]
    spec = hago.load_spec("x86_avx512_vnni")
    assert spec.requantize == "float"
    qg = hago.quantize(hago.load(m), spec, calib, method="minmax", progress=False)
    art = compile(qg, spec, cache_dir=str(tmp_path), progress=False, threads=1)
    asm = art.executable.mod.imports[0].inspect_source("asm")
    body = asm[asm.index("vpdpbusd"):]
    body = body[:body.index(".Lfunc_end")]
    assert "vrndscaleps" in body and "zmm" in body.split("vrndscaleps", 1)[1].split("\n", 1)[0]
    assert "vpgather" not in body and "vpextrb" not in body
    if not _host_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    x = calib[0]
    got, ref = art.run(x)[0], qg.run(x)[0]
    step = np.abs(np.diff(np.unique(ref))).min()
    assert np.abs(got - ref).max() <= step * 1.01


def _grouped_shuffle_model(seed=0):
    """conv 3x3 (8 -> 24) -> Relu -> grouped 1x1 conv (groups 4, 24 -> 32) -> Relu -> channel shuffle (reshape,
    transpose, reshape) -> grouped 1x1 conv (groups 2, 32 -> 16) -> Relu: ShuffleNet's unit in miniature."""
    from onnx import TensorProto, helper, numpy_helper

    rs = np.random.RandomState(seed)

    def w(name, shape):
        return numpy_helper.from_array((rs.randn(*shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32), name)

    inits = [w("w0", (24, 8, 3, 3)), w("w1", (32, 6, 1, 1)), w("w2", (16, 16, 1, 1)),
             numpy_helper.from_array(rs.randn(32).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array(np.array([1, 4, 8, 6, 6], np.int64), "s5"),
             numpy_helper.from_array(np.array([1, 32, 6, 6], np.int64), "s4")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], group=4), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Reshape", ["r1", "s5"], ["h5"]),
             helper.make_node("Transpose", ["h5"], ["t5"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t5", "s4"], ["sh"]),
             helper.make_node("Conv", ["sh", "w2"], ["c2"], group=2), helper.make_node("Relu", ["c2"], ["y"])]
    g = helper.make_graph(nodes, "gshuffle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_grouped_int8_convs_split_per_group_match_onnxruntime(tmp_path):
    """Grouped (not depthwise) integer convs are split into one conv per group (channel slices, int32 outputs
    concatenated) so each gets the packed NHWC kernel; the model, channel shuffle included, matches its QDQ model in
    onnxruntime within one step."""
    from hago.backend import x86_int8
    from hago.backend.compile import lower_and_fuse

    art, _ = _vnni_model_check(_grouped_shuffle_model(), (1, 8, 6, 6), tmp_path)
    assert art.info["packed_int8_ops"] == 1 + 4 + 2
    # the rewrite alone: no grouped integer conv is left
    import hago

    rs = np.random.RandomState(0)
    qg = hago.quantize(hago.load(_grouped_shuffle_model()), "x86_avx512_vnni",
                       [{"x": rs.rand(1, 8, 6, 6).astype(np.float32)}], method="minmax", progress=False)
    from hago.backend.compile import to_irmodule

    mod, _, _ = to_irmodule(qg, spec=hago.load_spec("x86_avx512_vnni"))
    text = x86_int8.split_grouped_int8_convs(mod).script()
    assert "groups=4" in mod.script() and "groups=4" not in text and "groups=2" not in text
    fused, packed = lower_and_fuse(mod, make_target(VNNI), isa="vnni")
    assert packed == 7
