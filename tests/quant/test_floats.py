"""float32 -> bfloat16 / float16 from the bit patterns, against NumPy, PyTorch and a formula."""
from __future__ import annotations

import numpy as np
import pytest

from minipeft.backend import to_numpy
from minipeft.quant import floats as F


def interesting_float32(seed: int = 0, n: int = 200_000) -> np.ndarray:
    """Random bit patterns (every class) plus values dense around the 16-bit ranges."""
    rng = np.random.default_rng(seed)
    anybits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    mags = (rng.random(n) + 1.0) * 2.0 ** rng.integers(-30, 18, n)          # fp16 territory
    near16 = (mags * rng.choice([-1, 1], n)).astype(np.float32)
    # exact float16 ties: a float16 value plus half its ulp (and neighbours of it)
    h = rng.integers(0, 0x7C00, n // 4, dtype=np.uint32).astype(np.uint16)
    f = h.view(np.float16).astype(np.float32).view(np.uint32)
    ties = np.concatenate([f + 0x1000, f + 0x0FFF, f + 0x1001]).astype(np.uint32).view(np.float32)
    # exact bfloat16 ties
    b = rng.integers(0, 2**16, n // 4, dtype=np.uint32) << 16
    bties = np.concatenate([b + 0x8000, b + 0x7FFF, b + 0x8001]).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25,
                        2.0**-25 * 1.0000001, 2.0**-24 * 1.5, 2.0**-14, 2.0**-14 * (1 - 2**-11),
                        3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1.17549435e-38,
                        np.inf, -np.inf, np.nan, 1.0, 1.0 + 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11],
                       np.float32)
    return np.concatenate([anybits, near16, ties, bties, special]).astype(np.float32)


# ----------------------------------------------------------------------------- float16
def test_float16_matches_numpy_bit_for_bit():
    x = interesting_float32()
    ours = F.float32_to_float16_bits(x)
    with np.errstate(over="ignore"):                                     # NumPy warns on -> inf
        ref = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    back = ours[nan].view(np.float16)
    assert np.isnan(back).all()
    np.testing.assert_array_equal(np.signbit(back), np.signbit(x[nan]))


def test_float16_bits_to_float32_all_patterns():
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    ours = F.float16_bits_to_float32(h)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.isnan(ours[nan]).all()
    # every non-NaN float16 survives the round trip
    np.testing.assert_array_equal(F.float32_to_float16_bits(ours)[~nan], h[~nan])


def test_float16_edge_cases():
    cases = {65504.0: 0x7BFF, 65519.99: 0x7BFF, 65520.0: 0x7C00, 1e6: 0x7C00,
             2.0**-24: 0x0001, 2.0**-25: 0x0000, 2.0**-25 * 1.0000001: 0x0001,
             2.0**-24 * 1.5: 0x0002, 2.0**-24 * 2.5: 0x0002, 2.0**-14: 0x0400,
             -0.0: 0x8000, 1.0 + 2**-11: 0x3C00, 1.0 + 3 * 2**-11: 0x3C02}
    for value, expected in cases.items():
        got = int(F.float32_to_float16_bits(np.array([value], np.float32))[0])
        assert got == expected, (value, hex(got), hex(expected))


# ----------------------------------------------------------------------------- bfloat16
def bfloat16_reference(x: np.ndarray) -> np.ndarray:
    """Independent rounding: the two neighbouring bfloat16 values (truncate, truncate + 1
    ulp), the nearer by float64 distance, ties to the even bit pattern. Past the largest
    finite value the upper neighbour is inf, placed at 2**128 as IEEE rounding does."""
    u = x.view(np.uint32)
    sign = (u >> 16) & 0x8000
    mag = u & 0x7FFFFFFF
    down = mag & 0xFFFF0000
    up = down + 0x10000
    xd = np.abs(x.astype(np.float64))
    with np.errstate(invalid="ignore"):                                  # inf inputs, fixed below
        down_val = down.view(np.float32).astype(np.float64)
        up_val = np.where(up == 0x7F800000, 2.0**128, up.view(np.float32).astype(np.float64))
        d_down, d_up = xd - down_val, up_val - xd
    odd = ((down >> 16) & 1) == 1
    pick_up = (d_up < d_down) | ((d_up == d_down) & odd)
    out = np.where(pick_up, up, down) >> 16
    out = np.where(mag >= 0x7F800000, mag >> 16, out)                  # inf stays inf
    return (out | sign).astype(np.uint16)


def test_bfloat16_matches_independent_formula():
    x = interesting_float32(1)
    x = x[~np.isnan(x)]
    np.testing.assert_array_equal(F.float32_to_bfloat16_bits(x), bfloat16_reference(x))


def test_bfloat16_matches_torch_if_available():
    torch = pytest.importorskip("torch")
    x = interesting_float32(2)
    ours = F.float32_to_bfloat16_bits(x)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    assert np.all(ours[nan] == 0x7FC0)


def test_bfloat16_matches_ml_dtypes_bit_for_bit():
    """The course's rounding is ml_dtypes' cast, the dtype CuPy's bfloat16 arrays use (minipeft.amp)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = interesting_float32(4)
    ours = F.float32_to_bfloat16_bits(x)
    with np.errstate(over="ignore", invalid="ignore"):                  # -> inf, and NaN inputs
        ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    assert np.isnan(ref[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all() and np.all(ours[nan] == 0x7FC0)
    b = np.arange(2**16, dtype=np.uint32).astype(np.uint16)                # and back: every pattern
    back = b.view(ml_dtypes.bfloat16).astype(np.float32)
    finite = ~np.isnan(back)
    np.testing.assert_array_equal(F.bfloat16_bits_to_float32(b)[finite].view(np.uint32),
                                  back[finite].view(np.uint32))


def test_bfloat16_round_trip_and_edges():
    b = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    vals = F.bfloat16_bits_to_float32(b)
    np.testing.assert_array_equal(vals.view(np.uint32), b.astype(np.uint32) << 16)
    finite = ~np.isnan(vals)
    np.testing.assert_array_equal(F.float32_to_bfloat16_bits(vals)[finite], b[finite])
    x = np.array([3.4028235e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1e-45, np.nan], np.float32)
    np.testing.assert_array_equal(F.float32_to_bfloat16_bits(x),
                                  [0x7F80, 0x3F80, 0x3F82, 0x0000, 0x7FC0])
    np.testing.assert_array_equal(F.round_to_bfloat16(np.array([1.0, 3.0], np.float32)), [1.0, 3.0])


# ----------------------------------------------------------------------------- formats
def test_float_formats_agree_with_finfo():
    for fmt, dtype in [(F.FLOAT16, np.float16), (F.FLOAT32, np.float32)]:
        fi = np.finfo(dtype)
        assert fmt.bits == fi.bits
        assert fmt.max == float(fi.max) and fmt.min_normal == float(fi.smallest_normal)
        assert fmt.min_subnormal == float(fi.smallest_subnormal) and fmt.epsilon == float(fi.eps)
    bf = F.BFLOAT16
    values = F.bfloat16_bits_to_float32(np.array([0x7F7F, 0x0080, 0x0001, 0x3C00], np.uint16))
    assert [bf.max, bf.min_normal, bf.min_subnormal, bf.epsilon] == values.tolist()


def test_bfloat16_format_matches_torch_finfo_if_available():
    torch = pytest.importorskip("torch")
    fi = torch.finfo(torch.bfloat16)
    assert F.BFLOAT16.max == fi.max and F.BFLOAT16.min_normal == fi.tiny
    assert F.BFLOAT16.epsilon == fi.eps and F.BFLOAT16.bits == fi.bits


def test_range_against_precision():
    bf, fp = F.BFLOAT16.info(), F.FLOAT16.info()
    assert fp["max"] == 65504.0 and bf["max"] == pytest.approx(3.3895e38, rel=1e-4)
    assert bf["epsilon"] == 2**-7 and fp["epsilon"] == 2**-10
    assert bf["max"] / F.FLOAT32.max > 0.99                   # bfloat16 keeps float32's range
    assert round(fp["decimal_digits"], 2) == 3.31 and round(bf["decimal_digits"], 2) == 2.41
    x = np.array([70000.0, 1e-8, 1.001], np.float32)
    assert np.isinf(F.round_to_float16(x)[0]) and F.round_to_float16(x)[1] == 0.0
    assert np.isfinite(F.round_to_bfloat16(x)[0]) and F.round_to_bfloat16(x)[1] > 0
    assert F.round_to_bfloat16(x)[2] == 1.0 and F.round_to_float16(x)[2] != 1.0


def test_rejects_non_float32():
    with pytest.raises(TypeError, match="float32"):
        F.float32_to_bfloat16_bits(np.ones(3))
    with pytest.raises(TypeError, match="float32"):
        F.float32_to_float16_bits(np.ones(3, np.float16))


def test_backends_agree(xp, to_xp):
    x = interesting_float32(3, 20_000)
    np.testing.assert_array_equal(to_numpy(F.float32_to_float16_bits(to_xp(x))),
                                  F.float32_to_float16_bits(x))
    np.testing.assert_array_equal(to_numpy(F.float32_to_bfloat16_bits(to_xp(x))),
                                  F.float32_to_bfloat16_bits(x))
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    np.testing.assert_array_equal(to_numpy(F.float16_bits_to_float32(to_xp(h))).view(np.uint32),
                                  F.float16_bits_to_float32(h).view(np.uint32))


def test_flush_subnormals():
    tiny = np.finfo(np.float32).tiny
    x = np.array([tiny, -tiny, tiny / 2, -tiny / 2, 1e-45, 0.0, -0.0, 1.0, np.inf, np.nan],
                 np.float32)
    y = F.flush_subnormals(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y[:2], x[:2])
    assert np.all(y[2:7] == 0) and list(np.signbit(y[2:7])) == [False, True, False, False, True]
    assert y[7] == 1.0 and y[8] == np.inf and np.isnan(y[9])
