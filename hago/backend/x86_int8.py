"""u8 x s8 -> s32 tensor intrinsics for x86 CPUs (AVX2, and AVX-512 VNNI), and the int8 layouts that use them.

TVM ships int8 dot-product intrinsics for AVX-512 VNNI (``vpdpbusd``) and AVX-512BW only
(``tvm/s_tir/tensor_intrin/x86.py``); an AVX2 machine gets scalar-ish int8 code. This module registers the
AVX2 equivalent, made of the two instructions every AVX2 int8 GEMM (onnxruntime's MLAS, oneDNN) uses:

* ``vpmaddubsw`` (``llvm.x86.avx2.pmadd.ub.sw``): 32 u8 x 32 s8 products, adjacent pairs added into 16 int16 lanes
  **with signed saturation**;
* ``vpmaddwd`` (``llvm.x86.avx2.pmadd.wd``) with a vector of ones: adjacent int16 pairs added into 8 exact int32
  lanes, then added to the int32 accumulator.

The intrinsic's description is the same as TVM's VNNI one: ``C[i] += sum_k u8(A[k]) * s8(B[i, k])`` with
``i < 16`` (or 8) output lanes and ``k < 4`` reduction elements, ``B`` packed as ``[lanes][4]`` bytes. It is exact
if and only if no int16 pair sum saturates: ``|a0*b0 + a1*b1| <= 32767``. With u8 activations that holds for all
inputs when the weights are 7-bit (``|w| <= 63`` symmetric: ``2 * 255 * 63 = 32130``; even -64 is exact), and fails
for some inputs with any weight of magnitude 65 or more, which is why hago's
``x86_avx2`` spec (and onnxruntime's ``reduce_range``) limits weights to 7 bits. With full 8-bit weights the
result is that of :func:`dot_avx2_reference` (saturating pairs), not the exact dot product.

On a CPU with AVX-512 VNNI the same layouts and schedule use :data:`VNNI_DOT_16x4`: one ``vpdpbusd``
(``llvm.x86.avx512.vpdpbusd.512``) adds the 16 x 4 u8 x s8 products into 16 int32 lanes exactly (no int16 step, so
8-bit weights are exact), the instruction onnxruntime's MLAS and oneDNN use there. ``isa`` arguments below pick
``"avx2"`` or ``"vnni"``.

Layouts. The intrinsic reads 4 consecutive input channels of one pixel and a 16x4 (or 8x4) block of weights, so
an int8 ``conv2d`` (NCHW u8 data, OIHW s8 constant weights, int32 output) is rewritten by :class:`PackInt8Ops` into
``NCHW{ib}c`` data (packed inside the conv kernel, with the padding), ``OIHW{ib/4}i{ob}o4i`` weights packed at
compile time, and an ``NCHW{ob}c`` int32 output transformed back to NCHW (fused with the requantize epilogue) (the layout of TVM's x86 ``conv2d_NCHWc_int8``). ``matmul`` with a constant s8
``[K, N]`` weight is packed as ``[N/ob, K/4, ob, 4]``. MetaSchedule then tensorizes the inner ``ob x 4`` block with
:data:`AVX2_DOT_16x4` through ``MultiLevelTilingWithIntrin`` (see :func:`schedule_rules`).
"""
from __future__ import annotations

import numpy as np

from .simplify import const_value as _const_value

__all__ = [
    "AVX2_DOT_16x4",
    "AVX2_DOT_8x4",
    "VNNI_DOT_16x4",
    "ISAS",
    "intrinsic_for",
    "target_has_vnni",
    "register_intrinsics",
    "vpmaddubsw_reference",
    "dot_avx2_reference",
    "PackInt8Ops",
    "schedule_rules",
    "postprocs",
    "target_has_avx2",
    "MAX_EXACT_WEIGHT",
]

AVX2_DOT_16x4 = "hago_dot_16x4_u8i8i32_avx2"
AVX2_DOT_8x4 = "hago_dot_8x4_u8i8i32_avx2"
VNNI_DOT_16x4 = "hago_dot_16x4_u8i8i32_vnni"
#: the int8 instruction sets the packed layouts can target
ISAS = ("avx2", "vnni")
#: largest |weight| for which vpmaddubsw never saturates with any u8 activation (2 * 255 * 64 = 32640 <= 32767,
#: 2 * 255 * 65 = 33150 is not): every 7-bit weight ([-64, 63]; symmetric 7-bit: |w| <= 63) is exact
MAX_EXACT_WEIGHT = 64

_REGISTERED = False


# ---------------------------------------------------------------------------------------------
# numpy models of the instructions


def vpmaddubsw_reference(a_u8: np.ndarray, b_s8: np.ndarray) -> np.ndarray:
    """``vpmaddubsw``: pairs of u8*s8 products summed with int16 signed saturation (last axis even)."""
    a = np.asarray(a_u8).astype(np.int32)
    b = np.asarray(b_s8).astype(np.int32)
    p = a * b
    s = p[..., 0::2] + p[..., 1::2]
    return np.clip(s, -32768, 32767).astype(np.int16)


def dot_avx2_reference(a_u8: np.ndarray, w_s8: np.ndarray, *, k_axis_pairs: bool = True) -> np.ndarray:
    """What the AVX2 intrinsic computes for ``a @ w.T``: ``a`` is ``[M, K]`` uint8, ``w`` is ``[N, K]`` int8.

    The reduction axis is consumed 4 at a time; inside each group of 4, elements (0, 1) and (2, 3) are pairs
    summed in saturating int16 by vpmaddubsw, then added exactly in int32 (vpmaddwd). K must be a multiple of 4.
    """
    a = np.asarray(a_u8, dtype=np.uint8)
    w = np.asarray(w_s8, dtype=np.int8)
    m, k = a.shape
    n, k2 = w.shape
    if k != k2 or k % 4:
        raise ValueError(f"dot_avx2_reference: K={k} (and {k2}) must match and be a multiple of 4")
    prod = a.astype(np.int32)[:, None, :] * w.astype(np.int32)[None, :, :]  # M, N, K
    pairs = prod[..., 0::2] + prod[..., 1::2]
    pairs = np.clip(pairs, -32768, 32767)
    return pairs.sum(axis=-1, dtype=np.int64).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# the tensor intrinsics


def _make_intrinsics(lanes: int, c_scope: str = "global", isa: str = "avx2"):
    from tvm.script import tirx as T

    nbytes = lanes * 4

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope=c_scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    if isa == "vnni":
        assert lanes == 16

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((4,), "uint8", offset_factor=1),
            B: T.Buffer((16, 4), "int8", offset_factor=1),
            C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:16], A[0:4], B[0:16, 0:4])
                T.writes(C[0:16])
                # the LLVM of TVM 0.27 declares vpdpbusd.512 on (<16 x i32>, <64 x i8>, <64 x i8>) (TVM's own
                # dot_16x4_vnni passes <16 x i32> operands and fails to build)
                # one expression, no named temporaries: TVMScript makes a name a "local" buffer, which TVM serves
                # with a TVMBackendAllocWorkspace call per parallel iteration (only small "global" ones go on the
                # stack)
                C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                    C.vload([0], dtype="int32x16"),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                                  dtype="uint8x64"),
                    B.vload([0, 0], dtype="int8x64"), dtype="int32x16",
                )

    elif lanes == 8:

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((4,), "uint8", offset_factor=1),
            B: T.Buffer((8, 4), "int8", offset_factor=1),
            C: T.Buffer((8,), "int32", offset_factor=1, scope=c_scope),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:8], A[0:4], B[0:8, 0:4])
                T.writes(C[0:8])
                C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                    T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                        T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8),
                                      dtype="uint8x32"),
                        B.vload([0, 0], dtype="int8x32"), dtype="int16x16"),
                    T.int16x16(1), dtype="int32x8",
                )

    else:
        assert lanes == 16 and nbytes == 64

        @T.prim_func(s_tir=True)
        def impl(
            A: T.Buffer((4,), "uint8", offset_factor=1),
            B: T.Buffer((16, 4), "int8", offset_factor=1),
            C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:16], A[0:4], B[0:16, 0:4])
                T.writes(C[0:16])
                for h in T.unroll(2):  # output lanes 0-7, then 8-15 (the broadcast input is the same)
                    C[T.ramp(h * 8, 1, 8)] += T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                        T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8),
                                          dtype="uint8x32"),
                            B.vload([h * 8, 0], dtype="int8x32"), dtype="int16x16"),
                        T.int16x16(1), dtype="int32x8",
                    )

    return desc, impl


def register_intrinsics() -> None:
    """Register :data:`AVX2_DOT_16x4`, :data:`AVX2_DOT_8x4` and :data:`VNNI_DOT_16x4` with TVM (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from tvm.s_tir import TensorIntrin

    for name, lanes, isa in ((AVX2_DOT_16x4, 16, "avx2"), (AVX2_DOT_8x4, 8, "avx2"), (VNNI_DOT_16x4, 16, "vnni")):
        for scope, suffix in (("global", ""), ("local", "_local")):
            if TensorIntrin.get(name + suffix, allow_missing=True) is None:
                desc, impl = _make_intrinsics(lanes, scope, isa)
                TensorIntrin.register(name + suffix, desc, impl)
    _REGISTERED = True


def intrinsic_for(isa: str, lanes: int = 16) -> str | None:
    """The tensor intrinsic of ``isa`` (:data:`ISAS`) for ``lanes`` output channels per block, or None."""
    return {("avx2", 16): AVX2_DOT_16x4, ("avx2", 8): AVX2_DOT_8x4, ("vnni", 16): VNNI_DOT_16x4}.get((isa, lanes))


def target_has_avx2(target) -> bool:
    """True for an x86 llvm target with AVX2 (the intrinsic's requirement)."""
    import tvm

    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return False
    if not triple:
        import platform

        if platform.machine() not in ("x86_64", "AMD64", "i686"):
            return False
    try:
        has = tvm.get_global_func("target.target_has_feature")
        return bool(has("avx2", target))
    except Exception:  # noqa: BLE001 - older/newer TVM without the helper
        mattr = [str(a) for a in (target.attrs.get("mattr") or [])]
        mcpu = str(target.attrs.get("mcpu", "") or "")
        return "+avx2" in mattr or mcpu in ("core-avx2", "haswell", "skylake", "znver1", "znver2", "znver3")


def target_has_vnni(target) -> bool:
    """True for an x86 llvm target with AVX-512 VNNI (``vpdpbusd`` on 512-bit registers)."""
    import tvm

    if not target_has_avx2(target):
        return False
    try:
        has = tvm.get_global_func("target.target_has_feature")
        return bool(has("avx512vnni", target)) and bool(has("avx512bw", target))
    except Exception:  # noqa: BLE001
        mattr = [str(a) for a in (target.attrs.get("mattr") or [])]
        mcpu = str(target.attrs.get("mcpu", "") or "")
        return "+avx512vnni" in mattr or mcpu in ("cascadelake", "icelake-server", "sapphirerapids", "znver4")


# ---------------------------------------------------------------------------------------------
# MetaSchedule design space with the intrinsic


def schedule_rules(intrin: str = AVX2_DOT_16x4):
    """The rules of TVM's ``ScheduleRule::DefaultX86`` (used for VNNI), with the AVX2 intrinsic."""
    from tvm.s_tir.meta_schedule import schedule_rule as sr

    register_intrinsics()
    reuse = sr.ReuseType(req="may", levels=[1, 2], scope="global")
    return [
        sr.ApplyCustomRule(),
        sr.InlineConstantScalars(),
        sr.AutoInline(
            into_producer=False,
            into_consumer=True,
            inline_const_tensor=True,
            disallow_if_then_else=True,
            require_injective=True,
            require_ordered=True,
            disallow_op=["tirx.exp"],
        ),
        sr.AddRFactor(max_jobs_per_core=16, max_innermost_factor=64),
        sr.MultiLevelTilingWithIntrin(
            intrin, structure="SSRSRS", tile_binds=None, max_innermost_factor=64, vector_load_lens=None,
            reuse_read=None, reuse_write=reuse,
        ),
        sr.MultiLevelTiling(
            structure="SSRSRS", tile_binds=None, max_innermost_factor=64, vector_load_lens=None,
            reuse_read=None, reuse_write=reuse,
        ),
        sr.ParallelizeVectorizeUnroll(
            max_jobs_per_core=16, max_vectorize_extent=64, unroll_max_steps=[0, 16, 64, 512], unroll_explicit=True
        ),
        sr.RandomComputeLocation(),
    ]


def postprocs():
    """TVM's ``Postproc::DefaultCPUTensorization``."""
    from tvm.s_tir.meta_schedule import postproc as pp

    return [
        pp.DisallowDynamicLoop(),
        pp.RewriteParallelVectorizeUnroll(),
        pp.RewriteReductionBlock(),
        pp.RewriteTensorize(vectorize_init_loop=True),
        pp.RewriteLayout(),
    ]


def space_generator(intrin: str = AVX2_DOT_16x4):
    from tvm.s_tir.meta_schedule import space_generator as sg
    from tvm.s_tir.meta_schedule.mutator import Mutator

    return sg.PostOrderApply(sch_rules=schedule_rules(intrin), postprocs=postprocs(),
                             mutator_probs=Mutator.create("llvm"))


# ---------------------------------------------------------------------------------------------
# Relax rewrite: int8 conv2d / matmul -> packed layouts the intrinsic can read


def _static_shape(expr) -> tuple | None:
    from tvm import relax

    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError):
        return None


def pack_conv_weight(w: np.ndarray, ib: int, ob: int) -> np.ndarray:
    """OIHW -> OIHW{ib/4}i{ob}o4i (shape ``[O/ob, I/ib, KH, KW, ib/4, ob, 4]``)."""
    o, i, kh, kw = w.shape
    t = w.reshape(o // ob, ob, i // ib, ib // 4, 4, kh, kw)
    return np.ascontiguousarray(t.transpose(0, 2, 5, 6, 3, 1, 4))


def pack_conv_weight_ohwi(w: np.ndarray, ob: int) -> np.ndarray:
    """OHWI -> ``[O/ob, KH, KW, I/4, ob, 4]`` (the weights of :func:`conv2d_nhwc_int8_packed_te`)."""
    o, kh, kw, i = w.shape
    t = w.reshape(o // ob, ob, kh, kw, i // 4, 4)
    return np.ascontiguousarray(t.transpose(0, 2, 3, 4, 1, 5))


def pack_dense_weight(w_kn: np.ndarray, ob: int) -> np.ndarray:
    """``[K, N]`` -> ``[N/ob, K/4, ob, 4]``."""
    k, n = w_kn.shape
    t = w_kn.reshape(k // 4, 4, n // ob, ob)
    return np.ascontiguousarray(t.transpose(2, 0, 3, 1))


def conv2d_nchwc_int8_te(data, kernel, strides, padding, dilation, out_dtype="int32"):
    """TE compute: ``data`` NCHW{ib}c uint8, ``kernel`` OIHW{ib/4}i{ob}o4i int8 -> NCHW{ob}c int32."""
    from tvm import te, topi

    n, ic_chunk, ih, iw, ib = (int(v) for v in data.shape)
    oc_chunk, _, kh_, kw_, _, ob, _ = (int(v) for v in kernel.shape)
    sh, sw = strides
    dh, dw = dilation
    pt, pl, pb, pr = padding
    oh = (ih + pt + pb - ((kh_ - 1) * dh + 1)) // sh + 1
    ow = (iw + pl + pr - ((kw_ - 1) * dw + 1)) // sw + 1
    if pt or pl or pb or pr:
        data = topi.nn.pad(data, (0, 0, pt, pl, 0), (0, 0, pb, pr, 0), name="data_pad")
    ico = te.reduce_axis((0, ic_chunk), name="ic_outer")
    icf = te.reduce_axis((0, ib // 4), name="ic_f_inner")
    ics = te.reduce_axis((0, 4), name="ic_s_inner")
    kh = te.reduce_axis((0, kh_), name="kh")
    kw = te.reduce_axis((0, kw_), name="kw")
    return te.compute(
        (n, oc_chunk, oh, ow, ob),
        lambda b, oc, y, x, oi: te.sum(
            data[b, ico, y * sh + kh * dh, x * sw + kw * dw, icf * 4 + ics].astype(out_dtype)
            * kernel[oc, ico, kh, kw, icf, oi, ics].astype(out_dtype),
            axis=[kh, kw, ico, icf, ics],
        ),
        name="conv2d_NCHWc_int8",
    )


#: register blocks (output pixels) of the hand-written conv schedule per ISA, in order of preference. AVX2: two
#: int32 accumulators (ymm) per pixel, so at most 7 pixels fit beside the weights and the broadcast activation in
#: 16 registers. VNNI: one zmm accumulator per pixel and 32 registers (the activation is a broadcast memory
#: operand of vpdpbusd), so up to 28 pixels
REGISTER_BLOCKS = {"avx2": (4, 7, 6, 5), "vnni": (14, 16, 12, 28, 8, 7, 10, 9)}


def pick_register_block(ow: int, isa: str = "avx2") -> tuple[int, int]:
    """Output pixels per register block of the hand-written conv schedule and the extra output columns needed so
    that it divides the width: ``(regn, extra)``. The block of :data:`REGISTER_BLOCKS` wasting the fewest padded
    columns wins, ties in the listed order (AVX2: a 13-wide output computes 14 columns with 7, not 16 with 4)."""
    best = min(REGISTER_BLOCKS[isa], key=lambda r: (-ow) % r)  # min keeps the first of equal waste
    return best, (-ow) % best


def conv2d_nchw_packed_int8_te(data, kernel, strides, padding, dilation, ib: int, out_dtype="int32",
                               extra_cols: int = 0):  # noqa: PLR0913
    """Like :func:`conv2d_nchwc_int8_te` but reads NCHW ``data``: padding and the NCHW -> NCHW{ib}c packing are
    one producer block of the same kernel (no separate layout-transform pass over the activations).
    ``extra_cols`` more output columns are computed (on zero padding) so the register block divides the width."""
    from tvm import te, tirx

    n, c, ih, iw = (int(v) for v in data.shape)
    c_p = int(kernel.shape[1]) * ib  # input channels of the packed weights (>= c: zero-padded)
    pt, pl, pb, pr = padding
    pr = pr + extra_cols * int(strides[1])
    ph, pw = ih + pt + pb, iw + pl + pr

    def pack(b, cc, y, x, ci):
        inside = [y >= pt, y < ih + pt, x >= pl, x < iw + pl]
        if c_p != c:
            inside.append(cc * ib + ci < c)
        ch = tirx.min(cc * ib + ci, c - 1) if c_p != c else cc * ib + ci
        return tirx.if_then_else(tirx.all(*inside), data[b, ch, y - pt, x - pl], tirx.const(0, data.dtype))

    dp = te.compute((n, c_p // ib, ph, pw, ib), pack, name="data_pack")
    return conv2d_nchwc_int8_te(dp, kernel, strides, (0, 0, 0, 0), dilation, out_dtype)


def conv2d_nchw_int8_packed_te(data, kernel, strides, padding, dilation, ib: int, out_dtype="int32",
                               out_channels: int | None = None, isa: str = "avx2"):
    """NCHW u8 in, NCHW int32 out; packs the data, computes in NCHW{ob}c and unpacks in one kernel, so that the
    requantize epilogue that follows fuses into it (a separate layout transform would end the fusion group).
    ``out_channels``: the real output channels when the packed weights carry zero-padded ones (cropped here)."""
    from tvm import te

    iw = int(data.shape[3])
    kw = int(kernel.shape[3])
    ow = (iw + int(padding[1]) + int(padding[3]) - ((kw - 1) * int(dilation[1]) + 1)) // int(strides[1]) + 1
    _, extra = pick_register_block(ow, isa)
    y5 = conv2d_nchw_packed_int8_te(data, kernel, strides, padding, dilation, ib, out_dtype, extra_cols=extra)
    n, occ, oh, _, ob = (int(v) for v in y5.shape)
    oc = occ * ob if out_channels is None else int(out_channels)
    return te.compute((n, oc, oh, ow), lambda b, c, y, x: y5[b, c // ob, y, x, c % ob], name="conv2d_unpack")


CONV_NHWC_BLOCK = "conv2d_NHWC_int8"


def conv2d_nhwc_int8_packed_te(data, kernel, strides, padding, dilation, out_dtype="int32",
                               out_channels: int | None = None, isa: str = "avx2"):
    """NHWC u8 data, ``[O/ob, KH, KW, I'/4, ob, 4]`` s8 weights (:func:`pack_conv_weight_ohwi`) -> NHWC int32.

    The intrinsic's operands are contiguous in these layouts: 4 input channels of one pixel, a 64-byte weight block,
    ``ob`` int32 outputs of one pixel. No packing pass over the activations: a ``data_pad`` block copies them only
    where the conv pads (spatially, to whole register blocks of output columns, or 3 input channels to 4); the
    output's ``ob`` channels are innermost, so the requantize epilogue that follows is a vector loop over them."""
    from tvm import te, tirx

    n, ih, iw, c = (int(v) for v in data.shape)
    ocb, kh_, kw_, icq, ob, _ = (int(v) for v in kernel.shape)
    c_p = icq * 4
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh = (ih + pt + pb - ((kh_ - 1) * dh + 1)) // sh + 1
    ow = (iw + pl + pr - ((kw_ - 1) * dw + 1)) // sw + 1
    _, extra = pick_register_block(ow, isa)
    owp = ow + extra
    need_w = (owp - 1) * sw + (kw_ - 1) * dw + 1  # input columns the padded output reads
    pr2 = max(pr, need_w - iw - pl)
    if pt or pl or pb or pr2 or c_p != c:
        ph, pw = ih + pt + pb, iw + pl + pr2

        def pad(b, y, x, ci):
            inside = [y >= pt, y < ih + pt, x >= pl, x < iw + pl]
            if c_p != c:
                inside.append(ci < c)
            ch = tirx.min(ci, c - 1) if c_p != c else ci
            return tirx.if_then_else(tirx.all(*inside), data[b, y - pt, x - pl, ch], tirx.const(0, data.dtype))

        src = te.compute((n, ph, pw, c_p), pad, name="data_pad")
    else:
        src = data
    kh = te.reduce_axis((0, kh_), name="kh")
    kw = te.reduce_axis((0, kw_), name="kw")
    icq_ax = te.reduce_axis((0, icq), name="ic_q")
    ics = te.reduce_axis((0, 4), name="ic_s")
    y5 = te.compute(
        (n, oh, owp, ocb, ob),
        lambda b, y, x, oc, oi: te.sum(
            src[b, y * sh + kh * dh, x * sw + kw * dw, icq_ax * 4 + ics].astype(out_dtype)
            * kernel[oc, kh, kw, icq_ax, oi, ics].astype(out_dtype),
            axis=[kh, kw, icq_ax, ics],
        ),
        name=CONV_NHWC_BLOCK,
    )
    oc_n = ocb * ob if out_channels is None else int(out_channels)
    return te.compute((n, oh, ow, oc_n), lambda b, y, x, c_: y5[b, y, x, c_ // ob, c_ % ob], name="conv2d_unpack")


DENSE_BLOCK = "dense_packed_int8"


def dense_packed_int8_te(data, kernel, out_dtype="int32", out_features: int | None = None):
    """TE compute: ``data`` ``[..., K]`` uint8, ``kernel`` ``[N/ob, K'/4, ob, 4]`` int8 -> ``[..., N]`` int32.
    ``K' >= K`` and ``N' = N/ob * ob >= out_features`` when the packed weights carry zero padding: a
    ``dense_data_pad`` block pads the data with zeros, all ``N'`` outputs are computed and ``dense_crop`` keeps the
    first ``out_features`` (so the inner ``ob x 4`` block is always whole and the intrinsic applies)."""
    from tvm import te, tirx

    lead = [int(v) for v in data.shape[:-1]]
    k_real = int(data.shape[-1])
    nb, kb, ob, _ = (int(v) for v in kernel.shape)
    ko = te.reduce_axis((0, kb), name="k_outer")
    ki = te.reduce_axis((0, 4), name="k_inner")
    n_out = nb * ob if out_features is None else int(out_features)
    if kb * 4 == k_real:
        src = data
    else:
        src = te.compute(
            (*lead, kb * 4),
            lambda *i: tirx.if_then_else(i[-1] < k_real, data[(*i[:-1], tirx.min(i[-1], k_real - 1))],
                                         tirx.const(0, data.dtype)),
            name="dense_data_pad",
        )
    full = te.compute(
        (*lead, nb * ob),
        lambda *idx: te.sum(
            src[(*idx[:-1], ko * 4 + ki)].astype(out_dtype)
            * kernel[idx[-1] // ob, ko, idx[-1] % ob, ki].astype(out_dtype),
            axis=[ko, ki],
        ),
        name=DENSE_BLOCK,
    )
    if n_out == nb * ob:
        return full
    return te.compute((*lead, n_out), lambda *idx: full[idx], name="dense_crop")


class PackInt8Ops:
    """Relax module pass: int8 ``conv2d``/``matmul`` with u8 data and constant s8 weights -> packed layouts.

    Rewritten: ``R.nn.conv2d`` (NCHW/OIHW, groups 1, out int32, IC % 4 == 0, OC % ob == 0) and ``R.matmul``
    (``[..., K] x [K, N]`` constant, out int32, K % 4 == 0, N % ob == 0). Everything else is left alone.
    ``count`` tells how many calls were rewritten (after the pass ran).
    """

    def __init__(self, ob: int = 16, ib: int = 16, isa: str = "avx2"):
        if intrinsic_for(isa, ob) is None:
            raise ValueError(f"no {isa} intrinsic with {ob} lanes (avx2: 8 or 16, vnni: 16)")
        self.ob, self.ib, self.isa, self.count = ob, ib, isa, 0

    def _pick_ib(self, ic: int) -> int:
        for cand in (self.ib, 16, 8, 4):
            if cand % 4 == 0 and ic % cand == 0:
                return cand
        return 0

    def __call__(self, mod):
        from .simplify import rewrite_calls

        def pack(call, m):
            if call.op.name == "relax.nn.conv2d":
                new = self._conv(m.builder_, call)
            else:
                new = self._matmul(m.builder_, call)
            return call if new is None else new

        return rewrite_calls(mod, ("relax.nn.conv2d", "relax.matmul"), pack)

    # -- rewrites ------------------------------------------------------------------------------

    def _conv(self, bb, call):
        from tvm import relax

        a = call.attrs
        data, weight = call.args
        w = _const_value(weight)
        dshape = _static_shape(data)
        if w is None or dshape is None or len(dshape) != 4:
            return None
        layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout))
        if layouts not in (("NCHW", "OIHW", "NCHW"), ("NHWC", "OHWI", "NHWC")):
            return None
        if int(a.groups) != 1 or str(a.out_dtype) != "int32":
            return None
        if data.ty.dtype != "uint8" or w.dtype != np.int8:
            return None
        pad = [int(v) for v in a.padding]
        if len(pad) == 2:
            pad = [pad[0], pad[1], pad[0], pad[1]]
        if layouts[0] == "NHWC":
            o, i = w.shape[0], w.shape[3]
            i_p, o_p = -(-i // 4) * 4, -(-o // self.ob) * self.ob
            if (i_p, o_p) != (i, o):
                w = np.pad(w, ((0, o_p - o), (0, 0), (0, 0), (0, i_p - i)))
            self.count += 1
            return bb.call_te(
                conv2d_nhwc_int8_packed_te, data, relax.const(pack_conv_weight_ohwi(w, self.ob), "int8"),
                [int(v) for v in a.strides], pad, [int(v) for v in a.dilation], "int32", o, self.isa,
                primfunc_name_hint="conv2d_nhwc_int8",
            )
        o, i = w.shape[:2]
        # channel counts that do not fit the blocks (3 input channels of an RGB image, 1000 classes) are padded
        # with zero weights: the packing block reads zeros for the extra input channels, the unpack crops the
        # extra output channels
        i_p, o_p = -(-i // 4) * 4, -(-o // self.ob) * self.ob
        ib = self._pick_ib(i_p)
        if not ib:
            return None
        if (i_p, o_p) != (i, o):
            w = np.pad(w, ((0, o_p - o), (0, i_p - i), (0, 0), (0, 0)))
        packed = pack_conv_weight(w, ib, self.ob)
        self.count += 1
        return bb.call_te(
            conv2d_nchw_int8_packed_te, data, relax.const(packed, "int8"),
            [int(v) for v in a.strides], pad, [int(v) for v in a.dilation], ib, "int32", o, self.isa,
            primfunc_name_hint="conv2d_nchwc_int8",
        )

    def _matmul(self, bb, call):
        from tvm import relax

        data, weight = call.args
        w = _const_value(weight)
        dshape = _static_shape(data)
        if w is None or dshape is None or w.ndim != 2 or len(dshape) < 1:
            return None
        if str(call.attrs.out_dtype) != "int32" or data.ty.dtype != "uint8" or w.dtype != np.int8:
            return None
        k, n = w.shape
        if dshape[-1] != k:
            return None
        k_p, n_p = -(-k // 4) * 4, -(-n // self.ob) * self.ob  # zero-pad to whole blocks (1000 classes: 1008)
        if (k_p, n_p) != (k, n):
            w = np.pad(w, ((0, k_p - k), (0, n_p - n)))
        packed = pack_dense_weight(w, self.ob)
        self.count += 1
        return bb.call_te(dense_packed_int8_te, data, relax.const(packed, "int8"), "int32", n,
                          primfunc_name_hint="dense_packed_int8")



# ---------------------------------------------------------------------------------------------
# a hand-written schedule for the packed int8 convolutions (no tuning needed)

CONV_BLOCK = "conv2d_NCHWc_int8"


def _block_names(sch):
    root = sch.get_sblock("root")
    return [sch.get(b).name_hint for b in sch.get_child_blocks(root)]


def _inline_injective(sch, keep: tuple) -> None:
    """Inline every block but ``keep`` and those writing a function output (bias, requantize, clip, cast chains)."""
    for name in _block_names(sch):
        if name in keep:
            continue
        blk = sch.get_sblock(name)
        if not sch.get_consumers(blk):  # writes a function output
            continue
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - not inlinable (a reduction, or read by two consumers): leave it
            pass


def _epilogue_at(sch, anchor: str, loop, vectorize: bool = False) -> None:
    """Move the blocks after ``anchor`` (its epilogue, producers first) under ``loop``, so each runs on the tile
    the anchor just computed while it is in cache; ``vectorize``: their innermost loop too (:func:`_vector_lanes`).
    A block that cannot move stays a loop nest of its own, parallel over its three outer loops."""
    names = _block_names(sch)
    for name in names[names.index(anchor) + 1:]:
        blk = sch.get_sblock(name)
        try:
            sch.reverse_compute_at(blk, loop)
            if vectorize:
                last = sch.get_loops(blk)[-1]
                lanes = _vector_lanes(int(sch.get(last).extent))
                if lanes:
                    sch.vectorize(sch.split(last, [None, lanes])[1])
        except Exception:  # noqa: BLE001
            lps = sch.get_loops(blk)
            if len(lps) >= 3:
                sch.parallel(sch.fuse(*lps[:3]))


def schedule_packed_conv(func, isa: str = "avx2"):
    """Schedule one fused PrimFunc holding a packed int8 conv (``data_pack`` -> ``conv2d_NCHWc_int8`` ->
    unpack -> requantize epilogue) the way TVM's old x86 ``conv2d_NCHWc_int8`` schedule did:

    * conv: ``regn`` output pixels per register block (:func:`pick_register_block`), loop order
      ``(n, oc_chunk, oh) | ow_outer | ic_chunk, kh, kw, ic/4 | ow_inner (unrolled) | 16 oc x 4 ic`` with the
      ``16 x 4`` inner block tensorized by :data:`AVX2_DOT_16x4` (8 x 4 for 8-wide blocks; ``isa="vnni"``:
      :data:`VNNI_DOT_16x4`), the outer spatial loops fused and parallel;
    * every injective block between the conv and the output (unpack, bias, requantize, clip, cast) inlined into
      the output block, which runs inside the conv's parallel loop right after each ``(oc block, output row)``
      tile (still in L1);
    * the packing block parallel over ``(n, c_chunk, h)``.

    Returns the scheduled PrimFunc (attribute ``tirx.is_scheduled`` set, so MetaSchedule leaves it alone), or
    None when the function does not have that form.
    """
    import tvm

    register_intrinsics()
    sch = tvm.s_tir.Schedule(func)
    names = _block_names(sch)
    if CONV_BLOCK not in names:
        return None
    conv = sch.get_sblock(CONV_BLOCK)
    _inline_injective(sch, (CONV_BLOCK, "data_pack"))
    loops = sch.get_loops(conv)
    if len(loops) != 10:
        return None
    b, oc, y, x, oi, kh, kw, ico, icf, ics = loops
    ext = [int(sch.get(lp).extent) for lp in loops]
    ow, ob = ext[3], ext[4]
    intrin = intrinsic_for(isa, ob)
    if intrin is None or ext[9] != 4:
        return None
    regn, extra = pick_register_block(ow, isa)
    if extra:
        return None  # the compute was not padded to a multiple of the block
    if "data_pack" in names:  # the packing block: parallel over its three outer loops
        lps = sch.get_loops(sch.get_sblock("data_pack"))
        if len(lps) >= 3:
            sch.parallel(sch.fuse(*lps[:3]))
    xo, xi = sch.split(x, [None, regn])
    sch.reorder(b, oc, y, xo, ico, kh, kw, icf, xi, oi, ics)
    tile = sch.fuse(b, oc, y, xo)
    sch.parallel(tile)
    # the epilogue runs right after each (oc block, output row, register block) of the conv, on the 16 x regn
    # accumulator tile while it is in L1 (run after the whole conv instead, it re-reads the int32 result from memory
    # with a 64-byte stride per pixel); the intermediate buffer shrinks to that tile, a stack buffer (per row, it
    # was a heap workspace allocated per row)
    _epilogue_at(sch, CONV_BLOCK, tile)
    sch.unroll(xi)
    sch.decompose_reduction(conv, ico)
    sch.tensorize(oi, intrin)
    init = sch.get_sblock(CONV_BLOCK + "_init")
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_packed_conv_nhwc(func, isa: str = "avx2"):
    """Schedule one fused PrimFunc holding an NHWC packed int8 conv (``[data_pad] -> conv2d_NHWC_int8 -> unpack ->
    requantize epilogue``, :func:`conv2d_nhwc_int8_packed_te`):

    * conv: loop order ``(n, oh, oc block) | ow_outer | kh, kw, ic/4 | ow_inner (unrolled) | ob oc x 4 ic``, the
      inner block tensorized, ``regn`` output pixels per register block (:func:`pick_register_block`), the outer
      three loops fused and parallel;
    * the epilogue (unpack, bias, requantize, clamp, cast, a residual add) inlined into the output block, which
      runs right after each (row, oc block) tile, vectorized over the block's output channels;
    * ``data_pad`` parallel over (n, row) and vectorized over channels.

    Returns the scheduled PrimFunc (``tirx.is_scheduled``) or None when the function does not have that form."""
    import tvm

    register_intrinsics()
    sch = tvm.s_tir.Schedule(func)
    names = _block_names(sch)
    if CONV_NHWC_BLOCK not in names:
        return None
    conv = sch.get_sblock(CONV_NHWC_BLOCK)
    _inline_injective(sch, (CONV_NHWC_BLOCK, "data_pad"))
    loops = sch.get_loops(conv)
    if len(loops) != 9:
        return None
    b, y, x, oc, oi, kh, kw, icq, ics = loops
    ext = [int(sch.get(lp).extent) for lp in loops]
    ow, ob = ext[2], ext[4]
    intrin = intrinsic_for(isa, ob)
    if intrin is None or ext[8] != 4:
        return None
    regn, extra = pick_register_block(ow, isa)
    if extra:
        return None  # the compute was not padded to a multiple of the block
    if "data_pad" in names:
        pad = sch.get_sblock("data_pad")
        lps = sch.get_loops(pad)
        sch.parallel(sch.fuse(*lps[:2]))
        lanes = _vector_lanes(int(sch.get(lps[-1]).extent))
        if lanes:
            sch.vectorize(sch.split(lps[-1], [None, lanes])[1])
    xo, xi = sch.split(x, [None, regn])
    # narrow rows (7, 8... pixels): two oc blocks per register block, so that there are enough independent
    # accumulators to hide vpdpbusd's latency, and each broadcast input serves both
    ocb = 2 if regn * 2 <= 24 and ext[3] % 2 == 0 else 1
    if ocb > 1:
        oc, oci = sch.split(oc, [None, ocb])
        sch.reorder(b, y, oc, xo, kh, kw, icq, oci, xi, oi, ics)
        sch.unroll(oci)
    else:
        sch.reorder(b, y, oc, xo, kh, kw, icq, xi, oi, ics)
    # parallel over (row, oc block, register block); the epilogue right after each register block (regn pixels x
    # 16 channels), while its int32 accumulators are in L1: the intermediate buffer shrinks to that block, a stack
    # buffer of at most 16 x 16 x 4 bytes (after a whole row it was a heap workspace per row, 4 KB and more)
    tile = sch.fuse(b, y, oc, xo)
    sch.parallel(tile)
    _epilogue_at(sch, CONV_NHWC_BLOCK, tile, vectorize=True)
    sch.unroll(xi)
    sch.decompose_reduction(conv, kh)
    sch.tensorize(oi, intrin)
    init = sch.get_sblock(CONV_NHWC_BLOCK + "_init")
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


DW_NHWC_BLOCK = "group_conv2d_nhwc"


def schedule_depthwise_conv_nhwc(func):
    """Schedule one fused PrimFunc holding an integer NHWC depthwise conv (``pad_temp`` -> ``group_conv2d_nhwc``
    with one input channel per group -> injective epilogue): rows in parallel; per output pixel the channels in
    vectors of 16 (8, 4) int32 lanes kept in registers across the (unrolled) kernel taps, for register blocks of up to
    8 pixels; the zero padding read in place (no padded copy of the input); the epilogue right after each vector, on
    it. None when the function does not have that form."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    names = _block_names(sch)
    if DW_NHWC_BLOCK not in names:
        return None
    conv = sch.get_sblock(DW_NHWC_BLOCK)
    loops = sch.get_loops(conv)
    if len(loops) != 7:
        return None
    n, y, x, f, ry, rx, rc = loops
    ext = [int(sch.get(lp).extent) for lp in loops]
    if ext[6] != 1 or "int" not in str(sch.get(conv).body.value.ty):
        return None
    _inline_injective(sch, (DW_NHWC_BLOCK, "pad_temp"))
    lanes = _vector_lanes(ext[3])
    row = sch.fuse(n, y)
    sch.parallel(row)
    # a register block of xb output pixels per channel vector: each weight vector loaded once per tap for all of
    # them, and xb independent accumulation chains (one chain per vector was latency-bound)
    xb = next(b for b in (8, 7, 4, 2, 1) if ext[2] % b == 0)
    xo, xi = sch.split(x, [None, xb])
    if lanes and lanes < ext[3]:
        fo, fi = sch.split(f, [None, lanes])
        sch.reorder(xo, fo, ry, rx, rc, xi, fi)
        anchor = fo
    else:
        fi = f
        sch.reorder(xo, ry, rx, rc, xi, f)
        anchor = xo
    sch.unroll(xi)
    if lanes:
        sch.vectorize(fi)
    for lp in (ry, rx):  # the kernel taps unrolled: the accumulator vector stays in a register across them
        if int(sch.get(lp).extent) <= 7:
            sch.unroll(lp)
    if "pad_temp" in names:
        # the zero padding read in place (a branch per kernel tap, the same for every lane) instead of a padded
        # copy of the whole input: that extra pass over memory cost more than the conv's arithmetic
        sch.compute_inline(sch.get_sblock("pad_temp"))
    # the epilogue right after each vector of channels (each pixel when they are one vector): the intermediate
    # int32 buffer shrinks to that vector, a stack slot (after a whole row, it was a heap workspace per row)
    _epilogue_at(sch, DW_NHWC_BLOCK, anchor, vectorize=True)
    sch.decompose_reduction(conv, ry)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_packed_dense(func, isa: str = "avx2"):
    """Schedule one fused PrimFunc holding a packed int8 matmul (``[dense_data_pad] -> dense_packed_int8 ->
    [dense_crop] -> epilogue``, :func:`dense_packed_int8_te`): the output features in blocks of 16 (the
    intrinsic's lanes), rows in register blocks of up to 4, (feature block, row block) tiles in parallel, the
    reduction tensorized, the epilogue right after each tile. A classifier's ``[1, K] x [K, 1000]`` is a
    latency-bound chain per 16 outputs, which MetaSchedule with few trials schedules poorly. None when the
    function does not have that form."""
    import tvm

    register_intrinsics()
    sch = tvm.s_tir.Schedule(func)
    names = _block_names(sch)
    if DENSE_BLOCK not in names:
        return None
    blk = sch.get_sblock(DENSE_BLOCK)
    _inline_injective(sch, (DENSE_BLOCK, "dense_data_pad"))
    loops = sch.get_loops(blk)
    if len(loops) < 3:
        return None
    *lead, n, ko, ki = loops
    ext = [int(sch.get(lp).extent) for lp in loops]
    intrin = intrinsic_for(isa, 16)
    if intrin is None or ext[-1] != 4 or ext[-3] % 16:
        return None
    if "dense_data_pad" in names:
        plps = sch.get_loops(sch.get_sblock("dense_data_pad"))
        sch.parallel(plps[0])
    nbl, oi = sch.split(n, [None, 16])
    if lead:
        m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        m_ext = int(sch.get(m).extent)
        mi_n = next(v for v in (4, 2, 1) if m_ext % v == 0)
        mo, mi = sch.split(m, [None, mi_n])
        sch.reorder(nbl, mo, ko, mi, oi, ki)
        tile = sch.fuse(nbl, mo)
        sch.unroll(mi)
    else:
        sch.reorder(nbl, ko, oi, ki)
        tile = nbl
    sch.parallel(tile)
    _epilogue_at(sch, DENSE_BLOCK, tile, vectorize=True)
    sch.decompose_reduction(blk, ko)
    sch.tensorize(oi, intrin)
    init = sch.get_sblock(DENSE_BLOCK + "_init")
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_int_injective(func):
    """A kernel of injective blocks (no reduction) writing one integer tensor: an integer concat (SqueezeNet's fire
    modules), a channel slice (:func:`split_grouped_int8_convs`), a requantize after a concat with ShuffleNet's
    channel shuffle fused in. Every block inlined into the output block, its outer loops fused and parallel, the
    innermost (the channels, in an NHWC integer region) in vectors of 16 (8, 4) lanes where its extent allows.
    Untuned, such a kernel copies one element per iteration on one thread (TVM's default lowering), and the search's
    ``tune_scope="compute"`` does not tune it. None when the function is not such a kernel."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    names = _block_names(sch)
    if not names:
        return None
    for name in names:
        blk = sch.get(sch.get_sblock(name))
        if any(int(iv.iter_type) != 0 for iv in blk.iter_vars):  # a reduction (or opaque) block
            return None
    outs = [n for n in names if not sch.get_consumers(sch.get_sblock(n))]
    if len(outs) != 1 or "int" not in str(sch.get(sch.get_sblock(outs[0])).body.value.ty):
        return None
    _inline_injective(sch, ())
    if _block_names(sch) != outs:
        return None
    blk = sch.get_sblock(outs[0])
    loops = sch.get_loops(blk)
    if len(loops) < 2:
        return None
    lanes = _vector_lanes(int(sch.get(loops[-1]).extent))
    sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    if lanes:
        try:
            inner = sch.split(loops[-1], [None, lanes])[1] if lanes < int(sch.get(loops[-1]).extent) else loops[-1]
            sch.vectorize(inner)
        except Exception:  # noqa: BLE001 - not vectorizable as written: the parallel rows are the main gain
            pass
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_layout_transpose(func):
    """A kernel that moves a tensor between NCHW and NHWC where an NHWC integer region meets float code (a
    ``T_transpose`` block, with the quantize/dequantize arithmetic around it inlined). Tiled: the output's innermost
    axis and the output axis that is the source's innermost are split in blocks of 16 and made the two innermost
    loops (each 16 x 16 tile reads and writes whole cache lines), the outer loops fused and parallel, the innermost
    vectorized. Untiled (the search compiles with ``tune_scope="compute"``, so nothing tunes these), the NHWC ->
    NCHW transpose of a large float tensor misses the cache on every element. None when the function
    is not such a kernel."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    names = _block_names(sch)
    if "T_transpose" not in names:
        return None
    _inline_injective(sch, ())
    names = _block_names(sch)
    if len(names) != 1:
        return None
    blk = sch.get_sblock(names[0])
    block = sch.get(blk)
    if any(int(iv.iter_type) != 0 for iv in block.iter_vars):  # a reduction
        return None
    loops = sch.get_loops(blk)
    nd = len(loops)
    if nd < 3 or len(block.iter_vars) != nd:
        return None
    # the source: the largest buffer read; its innermost index names the output axis to tile with the last one
    src = max(block.reads, key=lambda r: int(np.prod([int(d) for d in r.source.shape])))
    last = src.region[-1].min
    axis = next((i for i, iv in enumerate(block.iter_vars) if iv.var.same_as(last)), None)
    ext = [int(sch.get(lp).extent) for lp in loops]
    if axis is None or axis == nd - 1 or ext[axis] % 16 or ext[-1] < 4:
        sch.parallel(sch.fuse(*loops[:2]))
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    lanes = next((v for v in (16, 8, 4) if ext[-1] % v == 0), 0)
    ao, ai = sch.split(loops[axis], [None, 16])
    if lanes:
        lo, li = sch.split(loops[-1], [None, lanes])
    else:
        lo, li = loops[-1], None
    outer = [lp for i, lp in enumerate(loops) if i not in (axis, nd - 1)]
    order = outer + [ao, lo, ai] + ([li] if li is not None else [])
    sch.reorder(*order)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    if li is not None:
        sch.vectorize(li)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_packed_convs(mod, isa: str = "avx2"):
    """Apply the hand-written schedules to every PrimFunc of ``mod`` they fit: packed int8 convs
    (:func:`schedule_packed_conv`, NCHW; :func:`schedule_packed_conv_nhwc`), packed int8 matmuls
    (:func:`schedule_packed_dense`), integer depthwise convs (:func:`schedule_depthwise_conv`,
    :func:`schedule_depthwise_conv_nhwc`), the layout transposes at the borders of NHWC regions
    (:func:`schedule_layout_transpose`) and other integer injective kernels such as concats
    (:func:`schedule_int_injective`); returns ``(mod, number scheduled)``. A function none fits is left for
    MetaSchedule."""
    import tvm

    count = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled", False)):
            continue
        new = None
        for sched in (lambda f: schedule_packed_conv(f, isa), lambda f: schedule_packed_conv_nhwc(f, isa),
                      lambda f: schedule_packed_dense(f, isa), schedule_depthwise_conv, schedule_depthwise_conv_nhwc,
                      schedule_layout_transpose, schedule_int_injective):
            try:
                new = sched(func)
            except Exception:  # noqa: BLE001 - an unexpected form: MetaSchedule or the default pipeline takes it
                new = None
            if new is not None:
                break
        if new is not None:
            mod[gv] = new
            count += 1
    return mod, count


# ---------------------------------------------------------------------------------------------
# a hand-written schedule for int8 depthwise convolutions (NCHW, one input channel per group)

DW_BLOCK = "group_conv2d_nchw"


def _vector_lanes(extent: int) -> int:
    """Vector width for a loop of ``extent``: 16, 8 or 4 when it divides, the whole loop when it is at most 16
    (7 or 14 columns of the last stages), else 0 (scalar)."""
    for v in (16, 8, 4):
        if extent % v == 0:
            return v
    return extent if extent <= 16 else 0


def schedule_depthwise_conv(func):
    """Schedule one fused PrimFunc holding an integer depthwise conv (``pad_temp`` -> ``group_conv2d_nchw`` with
    one input channel per group -> injective epilogue: bias, requantize, clip, cast):

    * the (batch, channel) planes in parallel; each channel's padded plane is built right before its conv (in
      cache) instead of padding the whole tensor first;
    * per output row: the kernel taps ``(ry, rx)`` outside, the output columns inside, vectorized
      (:func:`_vector_lanes`);
    * the epilogue runs per output row right after it, vectorized the same way.

    Returns the scheduled PrimFunc (``tirx.is_scheduled``) or None when the function does not have that form (it is
    then left to MetaSchedule)."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    names = _block_names(sch)
    if DW_BLOCK not in names:
        return None
    conv = sch.get_sblock(DW_BLOCK)
    loops = sch.get_loops(conv)
    if len(loops) != 7:
        return None
    n, c, y, x, rc, ry, rx = loops
    ext = [int(sch.get(lp).extent) for lp in loops]
    if ext[4] != 1:  # several input channels per group: not depthwise
        return None
    if "int" not in str(sch.get(conv).body.value.ty):  # the integer accumulation, not a float depthwise conv
        return None
    _inline_injective(sch, (DW_BLOCK, "pad_temp"))
    lanes = _vector_lanes(ext[3])
    plane = sch.fuse(n, c)
    sch.parallel(plane)
    if lanes:
        xo, xi = sch.split(x, [None, lanes])
        sch.reorder(y, xo, rc, ry, rx, xi)
    else:
        xi = None
        sch.reorder(y, rc, ry, rx, x)
    if "pad_temp" in names:
        pad = sch.get_sblock("pad_temp")
        sch.compute_at(pad, plane)
        plps = sch.get_loops(pad)
        pl = _vector_lanes(int(sch.get(plps[-1]).extent))
        if pl:
            sch.vectorize(sch.split(plps[-1], [None, pl])[1])
    if xi is not None:
        sch.vectorize(xi)
    _epilogue_at(sch, DW_BLOCK, y, vectorize=True)
    sch.decompose_reduction(conv, rc)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


# ---------------------------------------------------------------------------------------------
# NHWC integer regions: the channel axis innermost, where the intrinsic's lanes are


def _is_int8_conv(call) -> bool:
    """An integer ``R.nn.conv2d``: u8 data, s8 weights, int32 output, one group (what :class:`PackInt8Ops` packs)
    or depthwise (one input channel per group: :func:`schedule_depthwise_conv_nhwc`)."""
    from tvm import relax

    if not isinstance(call, relax.Call) or getattr(call.op, "name", "") != "relax.nn.conv2d":
        return False
    data, weight = call.args
    try:
        if not (data.ty.dtype == "uint8" and weight.ty.dtype == "int8" and str(call.attrs.out_dtype) == "int32"):
            return False
        groups = int(call.attrs.groups)
        in_ch = int(data.ty.shape.values[1]) if str(call.attrs.data_layout) == "NCHW" else None
        return groups == 1 or (in_ch is not None and groups == in_ch)
    except (AttributeError, TypeError, ValueError):
        return False


def split_grouped_int8_convs(mod):
    """An integer ``R.nn.conv2d`` with ``1 < groups < channels`` (ShuffleNet's grouped 1x1 convs) -> one conv per group
    on a channel slice of the input, their int32 outputs concatenated along channels. Each is then an ordinary
    integer conv (:func:`_is_int8_conv`): NHWC, packed, hand-scheduled, where the grouped conv had no packed kernel
    and stayed NCHW, with layout transposes around it inside the NHWC region. Same integers."""
    from tvm import relax

    from .simplify import rewrite_calls

    def split(call, m):
        a = call.attrs
        data, weight = call.args
        groups = int(a.groups)
        shape = _static_shape(data)
        w = _const_value(weight)
        if (groups <= 1 or shape is None or w is None or str(a.data_layout) != "NCHW"
                or str(a.kernel_layout) != "OIHW" or str(getattr(data.ty, "dtype", "")) != "uint8"
                or str(w.dtype) != "int8" or str(a.out_dtype) != "int32" or groups == shape[1]
                or shape[1] % groups or w.shape[0] % groups):
            return call
        cin, cout = shape[1] // groups, w.shape[0] // groups
        parts = []
        for gi in range(groups):
            xg = m.builder_.emit(relax.op.strided_slice(data, axes=[1], begin=[gi * cin], end=[(gi + 1) * cin]))
            wg = relax.const(np.ascontiguousarray(w[gi * cout:(gi + 1) * cout]), "int8")
            parts.append(m.builder_.emit(relax.op.nn.conv2d(
                xg, wg, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=1,
                data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32")))
        return relax.op.concat(parts, axis=1)

    return rewrite_calls(mod, "relax.nn.conv2d", split)


def clip_to_min_max(mod):
    """``R.clip(x, lo, hi)`` -> ``R.minimum(R.maximum(x, lo), hi)`` on integer tensors: Relax's layout conversion has
    no rule for ``clip`` (it would put a transpose back to NCHW after every requantize), and has one for the binary
    elementwise ops. Same values, and TVM fuses both into the kernel as it fused the clip."""
    from tvm import relax

    from .simplify import rewrite_calls

    def to_min_max(call, m):
        x, lo, hi = call.args
        dtype = str(getattr(x.ty, "dtype", ""))
        # integer only: a float clip (a float fallback's Relu6) must keep the float model's kernel structure
        if not dtype.startswith(("int", "uint")):
            return call
        lo_v, hi_v = (int(v.value.value) if hasattr(v.value, "value") else int(v.value) for v in (lo, hi))
        y = m.builder_.emit(relax.op.maximum(x, relax.const(lo_v, dtype)))
        return relax.op.minimum(y, relax.const(hi_v, dtype))

    return rewrite_calls(mod, "relax.clip", to_min_max)


def convert_int8_regions_to_nhwc(mod):
    """Integer convs (:func:`_is_int8_conv`) to NHWC data / OHWI weights, the layout propagated through the
    requantize arithmetic, adds, pools and concats around them by Relax's ``ConvertLayout`` (transposes only where
    an integer region meets float code), weight and parameter transposes folded. Float convs keep NCHW, so their
    kernels stay those of the float model."""
    import tvm
    from tvm import relax

    def layout_cb(call):
        if not _is_int8_conv(call):  # float convs: NCHW even when their input comes out of an NHWC region
            return {"relax.nn.conv2d": ["NCHW", "OIHW"]}
        # depthwise: HWIO puts the channels innermost in the weights too (contiguous vectors per kernel tap)
        return {"relax.nn.conv2d": ["NHWC", "OHWI" if int(call.attrs.groups) == 1 else "HWIO"]}

    mod = clip_to_min_max(mod)
    mod = relax.transform.ConvertLayout({}, layout_cb=layout_cb)(mod)
    return relax.transform.CanonicalizeBindings()(fold_constant_transposes(mod))


def fold_constant_transposes(mod):
    """``R.permute_dims`` of a constant (the weights and per-channel parameters that ``ConvertLayout`` moved to
    NHWC) -> the transposed constant, in numpy. Relax's ``FoldConstant`` does the same by building and running a
    TVM kernel per constant, most of a ResNet-50 compile."""
    from tvm import relax

    from .simplify import rewrite_calls

    def fold(call, _m):
        val = _const_value(call.args[0])
        if val is None:
            return call
        axes = call.attrs.axes
        axes = None if axes is None else [int(a) for a in axes]
        return relax.const(np.ascontiguousarray(np.transpose(val, axes)), str(val.dtype))

    return rewrite_calls(mod, "relax.permute_dims", fold)
