"""Multipoint quantization: greedy points, plain per-channel equivalence, adaptive allocation, split weights."""
import numpy as np
import pytest

from hago.algorithms.multipoint import (
    MultiPoint,
    allocate_points,
    multipoint,
    multipoint_adaptive,
    multipoint_output_errors,
    output_error,
    quantize_per_channel,
)
from hago.errors import CalibrationError, ModelError, SpecError


def _rel_err(w, approx):
    return float(np.linalg.norm(w - approx) / np.linalg.norm(w))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_decreases_with_points(bits):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    mp = multipoint(w, bits, 4, axis=0)
    per_ch = []
    for n in range(1, 5):
        d = (w - mp.dequantize(n)).reshape(8, -1)
        per_ch.append(np.sum(d.astype(np.float64) ** 2, axis=1))
    per_ch = np.stack(per_ch, 1)
    assert np.all(np.diff(per_ch, axis=1) <= 1e-12)
    errs = [_rel_err(w, mp.dequantize(n)) for n in range(1, 5)]
    assert errs[1] < 0.6 * errs[0] and errs[3] < errs[2] < errs[1]
    # codes stay within the symmetric low-bit range
    q = (1 << (bits - 1)) - 1
    assert mp.codes.dtype == np.int8 and np.abs(mp.codes).max() <= q


def test_one_point_equals_plain_per_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 20)).astype(np.float32) * np.arange(1, 7)[:, None]
    codes, scale = quantize_per_channel(w, 4, axis=0)
    mp = multipoint(w, 4, 1, axis=0, scale_search="maxabs", refine_ls=False)
    np.testing.assert_array_equal(mp.codes[0], codes)
    np.testing.assert_array_equal(mp.alphas[:, 0], scale)
    np.testing.assert_array_equal(mp.dequantize(), scale[:, None] * codes.astype(np.float32))
    # the default scale search is never worse than max-abs, per channel
    best = multipoint(w, 4, 1, axis=0)
    e_plain = np.sum((w - scale[:, None] * codes) ** 2, axis=1)
    e_best = np.sum((w - best.dequantize()) ** 2, axis=1)
    assert np.all(e_best <= e_plain + 1e-9)


def test_channel_axis_one_matches_transposed():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(12, 5)).astype(np.float32)  # MatMul [in, out]
    a = multipoint(w, 3, 2, axis=1)
    b = multipoint(w.T.copy(), 3, 2, axis=0)
    np.testing.assert_allclose(a.dequantize(), b.dequantize().T, rtol=0, atol=0)
    assert a.alphas.shape == (5, 2) and a.codes.shape == (2, 12, 5)


def test_split_and_stacked_weights_reconstruct():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    mp = multipoint(w, 4, 3, axis=0)
    ints, scales = mp.as_split_weights()
    assert len(ints) == 3 and all(i.dtype == np.int8 and i.shape == w.shape for i in ints)
    recon = sum(s[:, None, None, None] * i.astype(np.float32) for s, i in zip(scales, ints))
    np.testing.assert_allclose(recon, mp.dequantize(), rtol=1e-6, atol=1e-7)
    w_int, sc = mp.as_stacked_weight()
    assert w_int.shape == (12, 2, 3, 3) and sc.shape == (12,)
    per_point = (sc[:, None, None, None] * w_int).reshape(3, 4, 2, 3, 3)
    np.testing.assert_allclose(per_point.sum(0), mp.dequantize(), rtol=1e-6, atol=1e-7)
    # a linear layer realized as a sum of low-bit matmuls equals the dequantized one
    x = rng.normal(size=(5, 18))
    wl = w.reshape(4, -1)
    mpl = multipoint(wl, 4, 3)
    ints, scales = mpl.as_split_weights()
    y_split = sum((x @ i.T.astype(np.float64)) * s for i, s in zip(ints, scales))
    np.testing.assert_allclose(y_split, x @ mpl.dequantize().T.astype(np.float64), rtol=1e-5, atol=1e-6)


def test_output_error_matches_definition():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 7))
    approx = w + rng.normal(size=w.shape) * 0.1
    x = rng.normal(size=(50, 7))
    expect = np.mean((x @ w.T - x @ approx.T) ** 2, axis=0)
    np.testing.assert_allclose(output_error(w, x, approx), expect, rtol=1e-10)
    mp = multipoint(w.astype(np.float32), 4, 2)
    np.testing.assert_allclose(output_error(w, x, mp), output_error(w, x, mp.dequantize()))
    with pytest.raises(CalibrationError):
        output_error(w, x[:, :5], approx)
    with pytest.raises(ModelError):
        output_error(w, x, approx[:2])


def test_allocate_points_greedy_rule():
    # channel 0 gains a lot from a 2nd point, channel 1 from a 3rd, channel 2 nothing
    errors = np.array([[10.0, 1.0, 0.9],
                       [5.0, 4.0, 0.5],
                       [1.0, 1.0, 1.0]])
    assert allocate_points(errors, 1.0).tolist() == [1, 1, 1]
    assert allocate_points(errors, 4 / 3).tolist() == [2, 1, 1]
    assert allocate_points(errors, 5 / 3).tolist() == [2, 2, 1]
    assert allocate_points(errors, 2.0).tolist() == [2, 3, 1]
    # a costly channel loses to a cheaper one with a better gain per cost
    assert allocate_points(np.array([[10.0, 0.0], [6.0, 0.0]]), 1.5, cost=[4.0, 1.0]).tolist() == [1, 2]
    with pytest.raises(SpecError):
        allocate_points(errors, 0.5)


def _heterogeneous_layer(rng):
    c, k = 32, 64
    w = rng.normal(size=(c, k))
    # a few channels with outliers: per-channel 4-bit quantization is poor there
    for ch in range(0, c, 4):
        w[ch, rng.choice(k, 2, replace=False)] *= 12.0
    w *= rng.uniform(0.2, 3.0, size=(c, 1))
    x = rng.normal(size=(256, k))
    return w.astype(np.float32), x


def test_adaptive_allocation_beats_fixed_assignments():
    rng = np.random.default_rng(5)
    w, x = _heterogeneous_layer(rng)
    mp = multipoint(w, 4, 4)
    errs = multipoint_output_errors(mp, w, x)
    n = allocate_points(errs, 1.5)
    assert n.mean() <= 1.5 + 1e-12 and n.min() >= 1
    total = lambda npc: float(errs[np.arange(len(npc)), np.asarray(npc) - 1].sum())
    adaptive = total(n)
    one_point = total(np.ones(32, int))
    assert adaptive < 0.5 * one_point
    # equal-cost fixed assignments: alternate channels, first half, random halves
    alternating = np.where(np.arange(32) % 2 == 0, 2, 1)
    first_half = np.where(np.arange(32) < 16, 2, 1)
    assert adaptive < total(alternating) and adaptive < total(first_half)
    for seed in range(5):
        rnd = np.ones(32, int)
        rnd[np.random.default_rng(seed).choice(32, 16, replace=False)] = 2
        assert adaptive < total(rnd)
    # the end-to-end helper gives the same allocation and error
    ad = multipoint_adaptive(w, x, 4, 1.5, 4)
    np.testing.assert_array_equal(ad.n_points, n)
    np.testing.assert_allclose(output_error(w, x, ad).sum(), adaptive, rtol=1e-9)
    assert isinstance(ad, MultiPoint) and ad.avg_points <= 1.5
    # channels with fewer points have zero scales/codes in the unused point tensors
    ints, scales = ad.as_split_weights()
    for i in range(ad.n):
        unused = ad.n_points <= i
        assert np.all(scales[i][unused] == 0) and np.all(ints[i][unused] == 0)


def test_invalid_arguments():
    w = np.ones((2, 3), np.float32)
    with pytest.raises(SpecError, match="bits"):
        multipoint(w, 1, 1)
    with pytest.raises(SpecError, match="n_points"):
        multipoint(w, 4, 0)
    with pytest.raises(SpecError, match="axis"):
        multipoint(w, 4, 1, axis=2)
    with pytest.raises(ModelError):
        multipoint(np.array([[np.nan, 1.0]]), 4, 1)
    with pytest.raises(SpecError):
        multipoint(w, 4, 2).truncate(3)


def test_allocate_points_global_scales_and_costs():
    from hago.algorithms.multipoint import allocate_points_global

    # layer A has large raw errors but a large output energy; layer B small raw errors
    ea = np.array([[100.0, 60.0, 50.0]])
    eb = np.array([[1.0, 0.5, 0.45]])
    # one extra point fits (average 1.5 over 2 channels of equal cost)
    raw = allocate_points_global([ea, eb], 1.5, [1.0, 1.0])
    assert [n.tolist() for n in raw] == [[2], [1]]  # raw gain 40 > 0.5
    scaled = allocate_points_global([ea, eb], 1.5, [1.0, 1.0], scales=[0.01, 1.0])
    assert [n.tolist() for n in scaled] == [[1], [2]]  # normalized gain 0.4 < 0.5
    # costs are MACs: a point of B costing 4x does not fit a budget of one cheap point
    costly = allocate_points_global([ea, eb], 1.2, [1.0, 4.0], scales=[0.01, 1.0])
    assert [n.tolist() for n in costly] == [[2], [1]]
    # the same as allocate_points on the concatenated, scaled tables
    rng = np.random.default_rng(7)
    tabs = [np.sort(rng.uniform(0, 10, size=(c, 3)), axis=1)[:, ::-1] for c in (5, 9, 3)]
    costs = [9.0, 2.0, np.array([1.0, 2.0, 3.0])]
    scales = [0.5, 2.0, 1.0]
    got = allocate_points_global(tabs, 1.7, costs, scales)
    cat_cost = np.concatenate([np.broadcast_to(np.asarray(c, float), (t.shape[0],)) for t, c in zip(tabs, costs)])
    ref = allocate_points(np.concatenate([t * s for t, s in zip(tabs, scales)]), 1.7, cat_cost)
    np.testing.assert_array_equal(np.concatenate(got), ref)
    assert float(np.sum(np.concatenate(got) * cat_cost)) <= 1.7 * cat_cost.sum() + 1e-9
    with pytest.raises(SpecError):
        allocate_points_global([ea, np.ones((2, 2))], 1.5, [1.0, 1.0])
    with pytest.raises(SpecError):
        allocate_points_global([ea, eb], 1.5, [1.0, 1.0], scales=[1.0, -1.0])
