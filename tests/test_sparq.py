"""SPARQ core: vectorized vs scalar reference, hand cases, vSPARQ rule, MSE ordering."""
import numpy as np
import pytest

from hago.algorithms.sparq import (
    bsparq,
    bsparq_reference,
    fake_quant_sparq,
    placement_shifts,
    sparq_mse,
    vsparq,
    vsparq_reference,
)
from hago.errors import CalibrationError, HagoError, SpecError

ROUNDINGS = [True, False, "half_up"]


def test_placement_sets_match_reference_options():
    assert placement_shifts(4, 5).tolist() == [0, 1, 2, 3, 4]
    assert placement_shifts(4, 3).tolist() == [0, 2, 4]
    assert placement_shifts(4, 2).tolist() == [0, 4]
    assert placement_shifts(3, 6).tolist() == [0, 1, 2, 3, 4, 5]  # opt6
    assert placement_shifts(2, 7).tolist() == [0, 1, 2, 3, 4, 5, 6]  # opt7
    assert placement_shifts(6, 3).tolist() == [0, 1, 2]
    assert placement_shifts(4, [4, 1]).tolist() == [1, 4]
    with pytest.raises(SpecError, match="placements"):
        placement_shifts(4, 4)
    with pytest.raises(SpecError, match="placements"):
        placement_shifts(4, [0, 2])  # top window missing
    with pytest.raises(SpecError, match="window_bits"):
        placement_shifts(9, 1)


@pytest.mark.parametrize("placements", [5, 3, 2])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_bsparq_all_codes_bit_exact(placements, rounding):
    q = np.arange(256, dtype=np.uint8)
    got = bsparq(q, 4, placements, rounding)
    ref = bsparq_reference(q, 4, placements, rounding)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("cfg", [(4, 5), (4, 3), (4, 2), (3, 6), (2, 7), (6, 3), (4, [1, 4])])
@pytest.mark.parametrize("rounding", [True, False])
def test_bsparq_random_tensors_bit_exact(shape, cfg, rounding):
    rng = np.random.default_rng(hash((shape, str(cfg), rounding)) % 2**32)
    q = rng.integers(0, 256, size=shape).astype(np.uint8)
    w, pl = cfg
    np.testing.assert_array_equal(bsparq(q, w, pl, rounding), bsparq_reference(q, w, pl, rounding))


def test_bsparq_hand_cases():
    def one(v, pl=5, r=True):
        return int(bsparq(np.array([v], dtype=np.uint8), 4, pl, r)[0])

    # window at bit 7..4, dropped 0111: first dropped bit 0 -> no rounding
    assert one(0b10110111) == 0b10110000
    assert one(0b10110111, r=False) == 0b10110000
    # first dropped bit set, LSB set -> round up
    assert one(0b10111000) == 0b11000000
    # exact tie with even LSB -> stays (round half to even, as the reference)
    assert one(0b10101000) == 0b10100000
    assert one(0b10101000, r="half_up") == 0b10110000
    # tie with a sticky bit below -> round up
    assert one(0b10101001) == 0b10110000
    # overflow of an all-ones window saturates, never moves the window
    assert one(0b11111000) == 0b11110000
    assert one(0b01111100) == 0b01111000
    # msb at bit 6: window at shift 3 with 5 placements, shift 4 with 3 placements
    assert one(0b01011100, 5) == 0b01100000
    assert one(0b01011100, 5, False) == 0b01011000
    assert one(0b01011100, 3) == 0b01100000
    assert one(0b01011100, 3, False) == 0b01010000
    # small values keep their low bits exactly
    for v in range(16):
        assert one(v, 2) == v
    # 2 placements: 0b00010111 -> window 4..7 = 0001, dropped 0111 -> 0b00010000
    assert one(0b00010111, 2) == 0b00010000
    assert one(0b00011000, 2) == 0b00100000
    assert one(0, 5) == 0


def test_bsparq_keeps_at_most_window_bits():
    q = np.arange(256)
    for pl in (5, 3, 2):
        for r in ROUNDINGS:
            out = bsparq(q, 4, pl, r)
            for v in out:
                v = int(v)
                if v:
                    low = (v & -v).bit_length() - 1
                    assert v.bit_length() - low <= 4
                    assert v <= 255


@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("rounding", [True, False])
@pytest.mark.parametrize("window", [(4, 5), (4, 2), (3, 6)])
def test_vsparq_bit_exact(axis, rounding, window):
    rng = np.random.default_rng(7 + axis)
    q = rng.integers(0, 256, size=(3, 5, 6))
    q[rng.random(q.shape) < 0.4] = 0  # post-ReLU-like sparsity
    w, pl = window
    got, st = vsparq(q.astype(np.uint8), axis, w, pl, rounding)
    ref, st_ref = vsparq_reference(q.astype(np.uint8), axis, w, pl, rounding)
    np.testing.assert_array_equal(got, ref)
    assert st["pairs"] == st_ref["pairs"]
    assert st["frac_8bit_pairs"] == pytest.approx(st_ref["frac_8bit_pairs"])
    assert st["frac_both_zero"] == pytest.approx(st_ref["frac_both_zero"])


def test_vsparq_zero_pair_rule():
    q = np.array([[0, 0b10110111, 0b10110111, 0b01011100, 200, 0, 37]], dtype=np.uint8)
    out, st = vsparq(q, -1)
    # pair (0, x): x keeps all 8 bits; pair (x, y) nonzero: both trimmed;
    # pair (200, 0): 200 kept; odd tail 37 pairs with an implicit zero: kept
    assert out.tolist() == [[0, 0b10110111, 0b10110000, 0b01100000, 200, 0, 37]]
    assert st["pairs"] == 4
    assert st["frac_8bit_pairs"] == pytest.approx(3 / 4)
    # bSPARQ alone would trim all of them
    # 200 = 0b11001000 is a tie with an even window -> 0b11000000; 37 = 0b100101 -> 0b100100
    assert bsparq(q).tolist() == [[0, 0b10110000, 0b10110000, 0b01100000, 0b11000000, 0, 0b100100]]
    # 3-bit window: a zero partner grants a 6-bit window
    out3, _ = vsparq(np.array([0, 0b10110111], dtype=np.uint8), -1, 3, 6, False)
    assert out3.tolist() == [0, 0b10110100]


def test_vsparq_pairs_along_channels():
    q = np.zeros((1, 4, 2, 2), dtype=np.uint8)
    q[0, 0] = 0b11111111
    q[0, 1] = 0           # channel pair (0, 1): channel 0 keeps 8 bits
    q[0, 2] = 0b11111111
    q[0, 3] = 1           # channel pair (2, 3): channel 2 trimmed
    out, st = vsparq(q, pair_axis=1)
    assert np.all(out[0, 0] == 255)
    assert np.all(out[0, 2] == 0b11110000)
    assert np.all(out[0, 3] == 1)
    assert st["frac_8bit_pairs"] == pytest.approx(0.5)


def test_invalid_inputs():
    with pytest.raises(CalibrationError):
        bsparq(np.array([256]))
    with pytest.raises(CalibrationError):
        bsparq(np.array([-1]))
    with pytest.raises(CalibrationError):
        bsparq(np.array([1.5]))
    with pytest.raises(SpecError):
        bsparq(np.array([1]), rounding="stochastic")
    with pytest.raises(CalibrationError):
        vsparq(np.zeros((2, 2), np.uint8), pair_axis=3)
    with pytest.raises(SpecError):
        fake_quant_sparq(np.ones(3), 0.1, mode="int3")
    with pytest.raises(CalibrationError):
        fake_quant_sparq(np.array([np.nan]), 0.1)
    assert issubclass(CalibrationError, HagoError)


def test_fake_quant_int8_and_identity_paths():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=1000), 0)
    scale = x.max() / 255
    y8 = fake_quant_sparq(x, scale, mode="int8")
    assert y8.dtype == np.float32
    assert np.max(np.abs(y8 - x)) <= scale / 2 + 1e-6
    # values below 16 codes are exact under bSPARQ (window at shift 0)
    small = np.arange(16) * scale
    np.testing.assert_allclose(fake_quant_sparq(small, scale, mode="bsparq"), small, rtol=1e-6)
    # int4 uses the same real range with 15 steps
    y4 = fake_quant_sparq(x, scale, mode="int4")
    assert len(np.unique(y4)) <= 16
    assert np.max(np.abs(y4 - x)) <= 17 * scale / 2 + 1e-6


@pytest.mark.parametrize("placements", [5, 3, 2])
def test_mse_ordering_on_relu_gaussian(placements):
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(size=(16, 32, 8, 8)), 0).astype(np.float32)
    scale = float(x.max()) / 255
    m = sparq_mse(x, scale, placements=placements, pair_axis=1)
    assert m["bsparq"] < m["int4"]
    assert m["vsparq"] <= m["bsparq"]
    assert m["int8"] <= m["vsparq"]
    # vSPARQ is never worse element-wise than bSPARQ in code space
    q = np.clip(np.rint(x / scale), 0, 255).astype(np.uint8)
    vb = np.abs(vsparq(q, 1, 4, placements)[0].astype(int) - q)
    bb = np.abs(bsparq(q, 4, placements).astype(int) - q)
    assert np.all(vb <= bb)


def test_vsparq_stats_high_zero_fraction_after_relu():
    rng = np.random.default_rng(2)
    x = np.maximum(rng.normal(size=(4, 64, 7, 7)), 0)
    _, st = fake_quant_sparq(x, x.max() / 255, mode="vsparq", pair_axis=1, return_stats=True)
    # P(at least one of two independent ReLU(N(0,1)) is zero) = 3/4
    assert st["frac_8bit_pairs"] == pytest.approx(0.75, abs=0.02)
