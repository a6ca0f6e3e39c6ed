"""Codes: NF4 construction == bitsandbytes' literals, FP4/Int4 tables, dynamic maps, bounds."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from minipeft.quant import codes as C

# Values from the reference (../shared/reference/quantization.md, sections 1-3, 9.1).
NF4_THRESHOLDS_REF = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]
P_POS_REF = [0.9677082896, 0.9092447758, 0.8507812023, 0.7923176885, 0.7338541746,
             0.6753906012, 0.6169270873, 0.5584635139]
P_NEG_REF = [0.9677082896, 0.9008927941, 0.8340773582, 0.7672618628, 0.7004464269,
             0.6336309314, 0.5668154955]


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def sha16(a):
    return hashlib.sha256(np.asarray(a, np.float32).astype("<f4").tobytes()).hexdigest()[:16]


def ulps_between(a, b):
    """Signed distance in float32 ulps (positive finite values)."""
    return int(bits(np.float32(b))) - int(bits(np.float32(a)))


# ----------------------------------------------------------------------------- NF4
def test_nf4_construction_equals_literals_bit_for_bit():
    built = C.nf4_from_normal_map()
    assert built.dtype == np.float32
    np.testing.assert_array_equal(bits(built), bits(C.NF4))


def test_normal_map_probabilities_and_shape():
    np.testing.assert_allclose(C.linspace_f32(0.9677083, 0.5, 9)[:-1], P_POS_REF, atol=2e-10)
    np.testing.assert_allclose(C.linspace_f32(0.9677083, 0.5, 8)[:-1], P_NEG_REF, atol=2e-10)
    table = C.create_normal_map()
    assert table.shape == (256,) and table.dtype == np.float32
    assert np.all(np.diff(table) >= 0)
    assert (table == 0).sum() == 241 and table.max() == 1.0 and table.min() == -1.0


def test_nf4_layout():
    nf4 = C.NF4
    assert nf4.shape == (16,) and np.all(np.diff(nf4) > 0)
    assert (nf4 < 0).sum() == 7 and (nf4 > 0).sum() == 8 and nf4[7] == 0.0
    assert nf4[0] == -1.0 and nf4[15] == 1.0


def test_nf4_thresholds_are_float32_midpoints():
    np.testing.assert_array_equal(C.midpoints(C.NF4), np.asarray(NF4_THRESHOLDS_REF, np.float32))


def test_nf4_cuda_thresholds_are_the_decimal_literals_rounded_once():
    """dQuantizeNF4's thresholds: each decimal literal rounded once (correctly) to float32."""
    from decimal import Decimal
    from fractions import Fraction

    def to_f32_once(text):
        exact = Fraction(Decimal(text))
        near = np.float32(float(exact))
        candidates = [np.nextafter(near, np.float32(-2)), near, np.nextafter(near, np.float32(2))]
        return min(candidates, key=lambda c: abs(Fraction(float(c)) - exact))

    literals = [repr(t) for t in NF4_THRESHOLDS_REF]
    once = np.asarray([to_f32_once(t) for t in literals], np.float32)
    np.testing.assert_array_equal(bits(C.NF4_THRESHOLDS), bits(once))
    assert [hex(int(b)) for b in bits(C.NF4_THRESHOLDS)[[0, 8, 12, 14]]] == [
        "0xbf591cd9", "0x3df64863", "0x3f006d03", "0x3f5c89d9"]
    # 1 ulp from the float32 midpoints exactly where the float64 midpoint is a float32 tie
    off = [ulps_between(abs(m), abs(t)) for m, t in zip(C.midpoints(C.NF4), C.NF4_THRESHOLDS)]
    assert off == [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, -1, 0, -1]


def test_nf4_index_on_thresholds_and_midpoints():
    t = C.NF4_THRESHOLDS
    np.testing.assert_array_equal(C.nf4_index(t), np.arange(15))         # x > t moves up
    np.testing.assert_array_equal(C.nf4_index(np.nextafter(t, np.float32(2))), np.arange(1, 16))
    # bitsandbytes 0.50.2 (fixture q4.ties.nf4.bs64) puts float32 midpoints 0, 12, 14 up
    idx = C.nf4_index(C.midpoints(C.NF4))
    np.testing.assert_array_equal(np.nonzero(idx != np.arange(15))[0], [0, 12, 14])


def test_normal_map_without_extra_value_is_symmetric():
    table = C.create_normal_map(use_extra_value=False)
    nonzero = np.unique(table[table != 0])
    assert nonzero.size == 14
    np.testing.assert_array_equal(np.sort(-nonzero), nonzero)
    np.testing.assert_allclose(nonzero[nonzero > 0],
                               [0.0910500, 0.1847734, 0.2844414, 0.3949175, 0.5250731,
                                0.6961928, 1.0], atol=1e-7)


def test_linspace_f32_matches_torch_if_available():
    torch = pytest.importorskip("torch")
    for start, end, steps in [(0.1, 1.0, 3), (0.1, 1.0, 65), (0.1, 1.0, 129),
                              (0.9677083, 0.5, 9), (0.9677083, 0.5, 8), (-1.0, 1.0, 255)]:
        ref = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(bits(C.linspace_f32(start, end, steps)), bits(ref))


def test_linspace_f32_rejects_one_step():
    with pytest.raises(ValueError, match="needs steps >= 2, got 1"):
        C.linspace_f32(0.0, 1.0, 1)


# ----------------------------------------------------------------------------- FP4
def test_fp4_table():
    mag = [0.0, 0.0052083335, 0.6666667, 1.0, 0.33333334, 0.5, 0.16666667, 0.25]
    np.testing.assert_array_equal(C.FP4_MAGNITUDE, np.asarray(mag, np.float32))
    np.testing.assert_array_equal(C.FP4[8:], -C.FP4[:8])
    # bitsandbytes' get_4bit_type("fp4") writes the Python int -0, so its code tensor holds
    # +0.0 at index 8 (fixture bnb_quant: every q4.*.fp4.*.code has bits 0x00000000 there);
    # its CUDA dequantizer still decodes 0b1000 as -0.0 (tested in test_blockwise.py)
    assert C.FP4[8] == 0.0 and not np.signbit(C.FP4[8])
    # the 4-bit FP4 index of each magnitude rank, decoded, is increasing
    ranked = C.FP4_MAGNITUDE[C.FP4_RANK_TO_CODE]
    assert np.all(np.diff(ranked) > 0)


def test_fp4_thresholds_offsets_from_midpoints():
    ranked = C.FP4_MAGNITUDE[C.FP4_RANK_TO_CODE]
    mids = (ranked[:-1] + ranked[1:]) / np.float32(2)
    offsets = [ulps_between(m, t) for m, t in zip(mids, C.FP4_THRESHOLDS)]
    # reference section 2: 14 ulp above, exact, 1 below, 1 below, exact, 6 below, 1 below
    assert offsets == [14, 0, -1, -1, 0, -6, -1]


def test_int4_table():
    expected = np.asarray([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7], np.float32) / 7
    np.testing.assert_array_equal(bits(C.INT4), bits(expected))
    assert np.signbit(C.INT4[8])


def test_get_4bit_type_copies_and_rejects_unknown():
    t = C.get_4bit_type("nf4")
    t[0] = 5.0
    assert C.NF4[0] == -1.0
    with pytest.raises(ValueError, match="unknown 4-bit type"):
        C.get_4bit_type("nf3")


def test_tables_are_read_only():
    with pytest.raises(ValueError, match="read-only"):
        C.NF4[0] = 0.0
    with pytest.raises(ValueError, match="read-only"):
        C.DYNAMIC_SIGNED[0] = 0.0


# ----------------------------------------------------------------------------- dynamic maps
def test_dynamic_map_checksums():
    assert sha16(C.DYNAMIC_SIGNED) == "e732639a65f497b4"
    assert sha16(C.DYNAMIC_UNSIGNED) == "305f002cc11278fb"


@pytest.mark.parametrize("signed", [True, False])
def test_create_dynamic_map_equals_literals(signed):
    ref = C.DYNAMIC_SIGNED if signed else C.DYNAMIC_UNSIGNED
    np.testing.assert_array_equal(bits(C.create_dynamic_map(signed=signed)), bits(ref))


def test_dynamic_map_layout():
    s, u = C.DYNAMIC_SIGNED, C.DYNAMIC_UNSIGNED
    assert s.shape == u.shape == (256,)
    assert np.all(np.diff(s) > 0) and np.all(np.diff(u) > 0)
    assert s[127] == 0.0 and s[255] == 1.0 and s[0] == np.float32(-0.99296874)
    assert u[0] == 0.0 and u[255] == 1.0
    assert s[128] == np.float32(5.5000004e-07) and u[1] == np.float32(3.2500003e-07)
    top_s = s[(s >= 0.1) & (s < 1)]
    top_u = u[(u >= 0.1) & (u < 1)]
    np.testing.assert_allclose(np.diff(top_s), 0.0140625, atol=1e-6)
    np.testing.assert_allclose(np.diff(top_u), 0.00703125, atol=1e-6)
    # values per decade 1e-7..1 (positive side)
    edges = 10.0 ** np.arange(-7, 1)
    counts_s = np.histogram(s[s > 0][:-1], bins=edges)[0]
    counts_u = np.histogram(u[u > 0][:-1], bins=edges)[0]
    assert counts_s.tolist() == [1, 2, 4, 8, 16, 32, 64]
    assert counts_u.tolist() == [2, 4, 8, 16, 32, 64, 128]


# ----------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("name,expected", [
    ("nf4", 0.1519036), ("fp4", 0.16666666), ("int4", 1 / 14),
    ("dynamic", 0.0070313), ("udynamic", 0.0035157),
])
def test_worst_case_error(name, expected):
    assert C.worst_case_error(C.CODES[name]) == pytest.approx(expected, abs=1e-6)


def test_worst_case_error_is_attained_and_never_exceeded():
    for name, code in C.CODES.items():
        lo = -1.0 if code.min() < 0 else 0.0
        x = np.linspace(lo, 1.0, 40001)
        err = np.abs(np.unique(code.astype(np.float64))[None, :] - x[:, None]).min(axis=1)
        h = C.worst_case_error(code)
        assert err.max() <= h + 1e-12
        assert err.max() >= h - 1e-4, name
