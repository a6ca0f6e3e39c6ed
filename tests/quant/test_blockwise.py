"""Block-wise 8-bit and 4-bit quantization: error bounds, round trips, edge cases, numbers."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.backend import to_numpy
from minipeft.quant import blockwise as B
from minipeft.quant import codes as C

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
H = {name: C.worst_case_error(code) for name, code in C.CODES.items()}
SLACK = 1e-6        # float32 rounding of the scale, the product and off-midpoint FP4 thresholds


def make_data(seed: int, n: int, dist: str, scale: float, dtype, two_d: bool):
    """Deterministic test arrays of several shapes and distributions."""
    rng = np.random.default_rng(seed)
    if dist == "normal":
        x = rng.standard_normal(n)
    elif dist == "uniform":
        x = rng.uniform(-1, 1, n)
    elif dist == "heavy":
        x = rng.standard_t(2, n)
    elif dist == "positive":
        x = rng.lognormal(0.0, 1.0, n)
    elif dist == "sparse":
        x = rng.standard_normal(n) * (rng.random(n) < 0.1)
    elif dist == "zero_blocks":
        x = rng.standard_normal(n)
        for _ in range(3):
            start = int(rng.integers(0, n))
            x[start:start + int(rng.integers(1, 300))] = 0.0
    else:                                    # constant
        x = np.full(n, rng.standard_normal())
    x = x * scale
    if dtype == np.float16:
        x = np.clip(x, -6e4, 6e4)
    x = x.astype(dtype)
    if two_d and n % 3 == 0:
        x = x.reshape(3, n // 3)
    return x


data_args = st.tuples(
    st.integers(0, 2**32 - 1),                                        # seed
    st.integers(1, 3000),                                             # n
    st.sampled_from(["normal", "uniform", "heavy", "positive", "sparse", "zero_blocks",
                     "constant"]),
    st.sampled_from([1e-3, 1.0, 1e3]),                                # scale
    st.sampled_from([np.float32, np.float16]),
    st.booleans(),                                                    # 2-D when possible
)


def block_absmax(x, bs):
    """Reference absmax per block (float32), and the block absmax of every element."""
    flat = x.reshape(-1).astype(np.float32)
    nb = -(-flat.size // bs)
    padded = np.zeros(nb * bs, np.float32)
    padded[: flat.size] = flat
    absmax = np.abs(padded.reshape(nb, bs)).max(axis=1)
    return absmax, np.repeat(absmax, bs)[: flat.size]


# ----------------------------------------------------------------------------- 4-bit properties
@settings(max_examples=300, deadline=None)
@given(data_args, st.sampled_from(BLOCKSIZES), st.sampled_from(["nf4", "fp4", "int4"]))
def test_4bit_error_bound_and_round_trip(args, bs, qt):
    x = make_data(*args)
    n = x.size
    packed, state = B.quantize_4bit(x, blocksize=bs, quant_type=qt)
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == np.uint8
    absmax, per_elem = block_absmax(x, bs)
    np.testing.assert_array_equal(state.absmax, absmax)
    assert state.absmax.dtype == np.float32 and state.shape == x.shape and not state.nested

    deq = B.dequantize_4bit(packed, state, dtype=np.float32)
    assert deq.shape == x.shape
    xf = x.astype(np.float32).reshape(-1)
    err = np.abs(xf - deq.reshape(-1))
    assert np.all(err <= (H[qt] + SLACK) * per_elem)
    assert np.all(deq.reshape(-1)[xf == 0] == 0)                       # zeros stay zero
    # the element holding a block's absmax is reconstructed exactly (+-1 are codes)
    top = np.abs(xf) == per_elem
    np.testing.assert_array_equal(deq.reshape(-1)[top], xf[top])
    assert B.dequantize_4bit(packed, state).dtype == x.dtype

    # dequantize -> quantize gives the same absmax and the same codes (FP4's -0 (0b1000)
    # comes back as +0 (0b0000): both decode to zero, compare decoded values there)
    packed2, state2 = B.quantize_4bit(deq, blocksize=bs, quant_type=qt)
    np.testing.assert_array_equal(state2.absmax, state.absmax)
    if qt == "fp4":
        q1, q2 = B.unpack_4bit(packed, n), B.unpack_4bit(packed2, n)
        np.testing.assert_array_equal(C.FP4[q1], C.FP4[q2])
    else:
        np.testing.assert_array_equal(packed2, packed)


@settings(max_examples=100, deadline=None)
@given(data_args, st.sampled_from([32, 64, 128]), st.sampled_from(["nf4", "fp4"]))
def test_4bit_double_quant_bounds(args, bs, qt):
    x = make_data(*args)
    packed, state = B.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=True)
    plain_packed, plain = B.quantize_4bit(x, blocksize=bs, quant_type=qt)
    np.testing.assert_array_equal(packed, plain_packed)                # same 4-bit codes
    assert state.nested and state.absmax.dtype == np.uint8
    s2 = state.state2
    nb = plain.absmax.size
    assert s2.blocksize == 256 and s2.absmax.shape == (-(-nb // 256),)
    assert s2.absmax.dtype == np.float32 and s2.code.shape == (256,)
    assert state.offset.dtype == np.float32
    assert float(state.offset) == pytest.approx(float(plain.absmax.astype(np.float64).mean()),
                                                rel=1e-6)
    # reconstructed absmax within the dynamic map's bound of its own block's absmax
    rec = B.double_dequantize(state.absmax, state.offset, s2)
    absmax2 = np.repeat(s2.absmax, 256)[:nb]
    abs_err = np.abs(rec - plain.absmax)
    rounding = 2.5e-7 * (np.abs(plain.absmax) + abs(float(state.offset)))  # the "+ offset"
    assert np.all(abs_err <= H["dynamic"] * absmax2 + rounding)
    # each element: its own bound plus the error of its block's scale
    xf = x.astype(np.float32).reshape(-1)
    deq = B.dequantize_4bit(packed, state, dtype=np.float32).reshape(-1)
    per_elem = np.repeat(plain.absmax, bs)[: xf.size]
    scale_err = np.repeat(abs_err, bs)[: xf.size]
    assert np.all(np.abs(deq - xf) <= (H[qt] + SLACK) * per_elem + scale_err * (1 + SLACK))


def test_double_quant_all_zero_block_is_not_exactly_zero_like_bitsandbytes():
    """An all-zero block stores index 0 (CUDA); with nested absmax its scale is not exactly 0."""
    x = np.random.default_rng(0).standard_normal(64 * 8).astype(np.float32)
    x[64:128] = 0.0
    packed, state = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert np.all(B.unpack_4bit(packed, x.size)[64:128] == B.ZERO_BLOCK_INDEX)
    deq = B.dequantize_4bit(packed, state)
    rec = B.double_dequantize(state.absmax, state.offset, state.state2)
    np.testing.assert_array_equal(deq[64:128], -rec[1])                # NF4 index 0 is -1.0
    assert abs(rec[1]) <= H["dynamic"] * float(state.state2.absmax[0]) + 1e-6


# ----------------------------------------------------------------------------- 8-bit properties
@settings(max_examples=100, deadline=None)
@given(data_args, st.sampled_from(BLOCKSIZES), st.booleans())
def test_8bit_error_bound_and_round_trip(args, bs, nested):
    x = make_data(*args)
    q, state = B.quantize_blockwise(x, blocksize=bs, nested=nested)
    assert q.shape == x.shape and q.dtype == np.uint8
    absmax, per_elem = block_absmax(x, bs)
    xf = x.astype(np.float32).reshape(-1)
    deq = B.dequantize_blockwise(q, state, dtype=np.float32).reshape(-1)
    if nested:
        rec = B.double_dequantize(state.absmax, state.offset, state.state2)
        scale_err = np.repeat(np.abs(rec - absmax), bs)[: xf.size]
    else:
        np.testing.assert_array_equal(state.absmax, absmax)
        scale_err = 0.0
    assert np.all(np.abs(deq - xf) <= (H["dynamic"] + SLACK) * per_elem + scale_err * (1 + SLACK))
    if not nested:
        assert np.all(deq[xf == 0] == 0)


@settings(max_examples=40, deadline=None)
@given(data_args, st.sampled_from(BLOCKSIZES))
def test_8bit_round_trip_with_positive_block_maxima(args, bs):
    x = make_data(*args).astype(np.float32).reshape(-1)
    absmax, per_elem = block_absmax(x, bs)
    # flip the sign of each block so its absmax element is positive (the signed map has
    # no -1: a negative absmax element comes back as -0.99296874 * absmax)
    nb = absmax.size
    padded = np.zeros(nb * bs, np.float32)
    padded[: x.size] = x
    blocks = padded.reshape(nb, bs)
    sign = np.sign(blocks[np.arange(nb), np.abs(blocks).argmax(axis=1)])
    x = (blocks * np.where(sign == 0, 1, sign)[:, None]).reshape(-1)[: x.size].astype(np.float32)
    q, state = B.quantize_blockwise(x, blocksize=bs)
    deq = B.dequantize_blockwise(q, state)
    q2, state2 = B.quantize_blockwise(deq, blocksize=bs)
    np.testing.assert_array_equal(state2.absmax, state.absmax)
    np.testing.assert_array_equal(q2, q)


def test_signed_map_negative_absmax_element():
    x = np.array([-2.0, 1.0, 0.5], np.float32)
    q, state = B.quantize_blockwise(x, blocksize=64)
    assert q[0] == 0
    assert B.dequantize_blockwise(q, state)[0] == np.float32(-0.99296874) * np.float32(2.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3000), st.sampled_from(BLOCKSIZES))
def test_8bit_unsigned_map_bound(seed, n, bs):
    x = np.random.default_rng(seed).random(n).astype(np.float32)
    q, state = B.quantize_blockwise(x, code=C.DYNAMIC_UNSIGNED, blocksize=bs)
    deq = B.dequantize_blockwise(q, state)
    _, per_elem = block_absmax(x, bs)
    assert np.all(np.abs(deq - x) <= (H["udynamic"] + SLACK) * per_elem)


# ----------------------------------------------------------------------------- nearest code
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 256))
def test_nearest_code_index_is_argmin_away_from_ties(seed, size):
    rng = np.random.default_rng(seed)
    code = np.sort(rng.uniform(-1, 1, size)).astype(np.float32)
    code = np.unique(code)
    x = rng.uniform(-1.2, 1.2, 2000).astype(np.float32)
    idx = C.nearest_code_index(x, code, tie="even")
    dist = np.abs(x[:, None].astype(np.float64) - code[None, :].astype(np.float64))
    best = dist.min(axis=1)
    chosen = dist[np.arange(x.size), idx]
    np.testing.assert_allclose(chosen, best, atol=1e-7)              # nearest up to rounding
    clear = np.sort(dist, axis=1)[:, 1] - best > 1e-6                  # no near-tie
    np.testing.assert_array_equal(idx[clear], dist.argmin(axis=1)[clear])


def test_tie_rules():
    # NF4: a value exactly on a threshold goes to the lower index (CUDA's x > t tree). The
    # thresholds are CUDA's float literals, 1 ulp off the float32 midpoints at 0, 8, 12, 14:
    # bitsandbytes 0.50.2 puts the float32 midpoints 0, 12, 14 on the upper index (fixture
    # bnb_quant, q4.ties.nf4.bs64 elements 257, 269, 271), so they are not "ties" there.
    x = np.concatenate([[1.0], C.NF4_THRESHOLDS]).astype(np.float32)
    packed, _ = B.quantize_4bit(x, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(B.unpack_4bit(packed, x.size), [15] + list(range(15)))
    x = np.concatenate([[1.0], C.midpoints(C.NF4)]).astype(np.float32)
    packed, _ = B.quantize_4bit(x, blocksize=64, quant_type="nf4")
    expect = np.arange(15) + np.isin(np.arange(15), [0, 12, 14])
    np.testing.assert_array_equal(B.unpack_4bit(packed, x.size), [15] + list(expect))
    # 8-bit: on a midpoint, the even index of the two neighbours
    dmids = C.midpoints(C.DYNAMIC_SIGNED)
    x = np.concatenate([[1.0], dmids]).astype(np.float32)
    q, _ = B.quantize_blockwise(x, blocksize=4096)
    lower = np.arange(255)
    np.testing.assert_array_equal(q[1:], np.where(lower % 2 == 1, lower + 1, lower))
    # FP4: exactly on a threshold -> the smaller magnitude, for both signs
    t = C.FP4_THRESHOLDS
    x = np.concatenate([[1.0], t, -t]).astype(np.float32)
    packed, _ = B.quantize_4bit(x, blocksize=64, quant_type="fp4")
    idx = B.unpack_4bit(packed, x.size)
    ranks = C.FP4_RANK_TO_CODE[:7]
    np.testing.assert_array_equal(idx[1:8], ranks)
    np.testing.assert_array_equal(idx[8:], ranks | 8)
    # tiny negatives keep the sign bit (0b1000, -0), -0.0 itself does not
    packed, _ = B.quantize_4bit(np.array([1.0, -0.001, -0.0], np.float32), quant_type="fp4")
    np.testing.assert_array_equal(B.unpack_4bit(packed, 3), [3, 8, 0])


# ----------------------------------------------------------------------------- layout
def test_nibble_order_and_odd_padding():
    x = np.array([1.0, -1.0, 0.0, 0.5, 1.0], np.float32)
    packed, _ = B.quantize_4bit(x, quant_type="nf4")
    # 0.5 -> nearest NF4 is 0.4407098 (index 12; the midpoint is 0.5016634)
    assert packed.reshape(-1).tolist() == [0xF0, 0x7C, 0xF7]          # pad 0.0 -> NF4 index 7
    packed, _ = B.quantize_4bit(x, quant_type="fp4")
    assert packed.reshape(-1).tolist() == [0x3B, 0x05, 0x30]          # pad 0.0 -> FP4 index 0


def test_all_zero_blocks_and_tiny_inputs():
    x = np.zeros(200, np.float32)
    x[64:128] = np.linspace(-1, 1, 64)
    for qt in ["nf4", "fp4", "int4"]:
        packed, state = B.quantize_4bit(x, blocksize=64, quant_type=qt)
        idx = B.unpack_4bit(packed, x.size)
        assert state.absmax.tolist()[0] == 0 and state.absmax[3] == 0
        assert np.all(idx[:64] == B.ZERO_BLOCK_INDEX) and np.all(idx[128:] == B.ZERO_BLOCK_INDEX)
        deq = B.dequantize_4bit(packed, state)
        assert np.all(deq[:64] == 0) and np.all(deq[128:] == 0)
    q, state = B.quantize_blockwise(x, blocksize=64)
    assert np.all(q[:64] == B.ZERO_BLOCK_INDEX)
    assert np.all(B.dequantize_blockwise(q, state)[:64] == 0)
    packed, state = B.quantize_4bit(np.array([3.0], np.float32), quant_type="nf4")
    assert packed.shape == (1, 1) and packed[0, 0] == 0xF7
    assert B.dequantize_4bit(packed, state).tolist() == [3.0]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_raise(bad):
    x = np.ones(100, np.float32)
    x[37] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        B.quantize_4bit(x, quant_type="nf4")
    with pytest.raises(ValueError, match="NaN/inf"):
        B.quantize_blockwise(x)


@pytest.mark.parametrize("bs", [0, -64, 16, 48, 100, 8192, 3000])
def test_bad_blocksize_raises(bs):
    x = np.ones(100, np.float32)
    with pytest.raises(ValueError, match="power of two"):
        B.quantize_4bit(x, blocksize=bs)
    with pytest.raises(ValueError, match="power of two"):
        B.quantize_blockwise(x, blocksize=bs)


def test_bad_types_raise():
    with pytest.raises(TypeError, match="float32"):
        B.quantize_4bit(np.ones(10))                                   # float64
    with pytest.raises(TypeError, match="supports float32 and float16 arrays.*got int32"):
        B.quantize_blockwise(np.ones(10, np.int32))
    with pytest.raises(TypeError, match="expects a NumPy or CuPy array, got list"):
        B.quantize_4bit([1.0, 2.0])
    with pytest.raises(TypeError, match="blocksize must be an int, got float"):
        B.quantize_4bit(np.ones(64, np.float32), blocksize=64.0)
    with pytest.raises(ValueError, match="quant_type"):
        B.quantize_4bit(np.ones(10, np.float32), quant_type="nf3")
    with pytest.raises(ValueError, match="empty"):
        B.quantize_4bit(np.ones(0, np.float32))
    packed, state = B.quantize_4bit(np.ones(10, np.float32))
    with pytest.raises(TypeError, match="expects packed uint8 bytes, got int8"):
        B.dequantize_4bit(packed.astype(np.int8), state)
    with pytest.raises(TypeError, match="can return float32, float16 or bfloat16, got float64"):
        B.dequantize_4bit(packed, state, dtype=np.float64)
    with pytest.raises(ValueError, match="packed bytes"):
        B.dequantize_4bit(packed[:3], state)
    q, s8 = B.quantize_blockwise(np.ones(10, np.float32))
    with pytest.raises(ValueError, match="quantize_4bit"):
        B.dequantize_4bit(packed, s8)


# ----------------------------------------------------------------------------- the course's numbers
# bitsandbytes' test_4bit_quant limits (mean + 7 std over 200 runs), reference section 9.2
LIMITS = {  # bs: (fp4 err, fp4 relerr, nf4 err, nf4 relerr)
    32: (0.089562, 0.244753, 0.068229, 0.191854), 64: (0.097320, 0.262778, 0.073316, 0.205719),
    128: (0.103907, 0.278848, 0.077468, 0.217974), 256: (0.109958, 0.293310, 0.081051, 0.228891),
    512: (0.115753, 0.306962, 0.084548, 0.239887), 1024: (0.121573, 0.320299, 0.087919, 0.249570),
    2048: (0.127741, 0.333292, 0.091349, 0.259392), 4096: (0.133820, 0.345842, 0.095067, 0.269466),
}


@pytest.fixture(scope="module")
def randn_1024():
    return np.random.default_rng(1234).standard_normal((1024, 1024)).astype(np.float32)


def errors(x, y):
    e = np.abs(x - y)
    return float(e.mean()), float((e / (np.abs(x) + 1e-8)).mean())


def test_4bit_mean_errors_match_bitsandbytes(randn_1024):
    x = randn_1024
    for bs, (fp4_err, fp4_rel, nf4_err, nf4_rel) in LIMITS.items():
        res = {}
        for qt in ["nf4", "fp4", "int4"]:
            packed, state = B.quantize_4bit(x, blocksize=bs, quant_type=qt)
            res[qt] = errors(x, B.dequantize_4bit(packed, state))
        assert res["nf4"][0] < nf4_err and res["nf4"][1] < nf4_rel, (bs, res)
        assert res["fp4"][0] < fp4_err and res["fp4"][1] < fp4_rel, (bs, res)
        assert res["nf4"][1] < res["fp4"][1] < res["int4"][1]          # relative error
        assert res["nf4"][0] < res["fp4"][0] and res["nf4"][0] < res["int4"][0]
        if bs == 64:                                                    # the course's numbers
            assert res["nf4"][0] == pytest.approx(0.0728, abs=6e-4)
            assert res["fp4"][0] == pytest.approx(0.0965, abs=6e-4)


def test_double_quant_adds_little_error(randn_1024):
    x = randn_1024
    p1, s1 = B.quantize_4bit(x, blocksize=64, quant_type="nf4")
    p2, s2 = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    e1, _ = errors(x, B.dequantize_4bit(p1, s1))
    e2, _ = errors(x, B.dequantize_4bit(p2, s2))
    assert e1 < e2 < e1 * 1.003                                         # about +0.1%
    rec = B.double_dequantize(s2.absmax, s2.offset, s2.state2)
    rel = np.abs(rec - s1.absmax) / s1.absmax
    assert rel.max() < 0.015 and rel.mean() < 0.003
    assert float(s2.offset) == pytest.approx(2.596, abs=0.05)


@pytest.mark.parametrize("nested", [False, True])
def test_8bit_mean_errors_match_bitsandbytes(randn_1024, nested):
    x = randn_1024
    for bs in [64, 128, 256, 512, 1024, 2048, 4096]:
        q, state = B.quantize_blockwise(x, blocksize=bs, nested=nested)
        err, rel = errors(x, B.dequantize_blockwise(q, state))
        assert err < 0.011 and rel < 0.018, (bs, err, rel)
    u = np.random.default_rng(1).random((1024, 1024)).astype(np.float32)
    for code, (lim_err, lim_rel) in [(None, (0.0036, 0.015)),
                                     (C.DYNAMIC_UNSIGNED, (0.0023, 0.012))]:
        q, state = B.quantize_blockwise(u, code=code)
        err, rel = errors(u, B.dequantize_blockwise(q, state))
        assert err < lim_err and rel < lim_rel


def test_bits_per_parameter():
    assert B.bits_per_parameter(4, 64) == 4.5
    assert B.bits_per_parameter(4, 64, double_quant=True) == pytest.approx(4.127, abs=5e-4)
    assert B.bits_per_parameter(4, 64, True) == 4 + 8 / 64 + 32 / (64 * 256)
    plain = [B.bits_per_parameter(4, bs) for bs in (32, 64, 128, 256)]
    dq = [round(B.bits_per_parameter(4, bs, True), 4) for bs in (32, 64, 128, 256)]
    assert plain == [5.0, 4.5, 4.25, 4.125]
    assert dq == [4.2539, 4.127, 4.0635, 4.0317]
    saving = B.bits_per_parameter(4, 64) - B.bits_per_parameter(4, 64, True)
    assert saving == 0.373046875 and saving * 65e9 / 8 / 1e9 == pytest.approx(3.03, abs=0.01)
    # exact counts for a real tensor: one partial block, 16 bytes for 31 values, an offset
    assert B.bits_per_parameter(4, 64, numel=31) == (16 * 8 + 32) / 31
    assert B.bits_per_parameter(4, 64, True, numel=31) == (16 * 8 + 8 + 32 + 32) / 31
    assert B.bits_per_parameter(8, 4096) == 8 + 32 / 4096
    with pytest.raises(ValueError, match="blocksize must be positive, got 0"):
        B.bits_per_parameter(4, 0)


# ----------------------------------------------------------------------------- QuantState
@pytest.mark.parametrize("packed_dict", [False, True])
@pytest.mark.parametrize("nested", [False, True])
def test_quant_state_dict_round_trip(packed_dict, nested):
    x = np.random.default_rng(3).standard_normal((33, 65)).astype(np.float16)
    packed, state = B.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=nested)
    d = state.as_dict(packed=packed_dict)
    if packed_dict:
        assert all(hasattr(v, "dtype") for v in d.values())
        assert "quant_state.bitsandbytes__nf4" in d
        d = {f"base_layer.weight.{k}": v for k, v in d.items()}       # prefixes are stripped
    else:
        assert d["dtype"] == "float16" and d["shape"] == (33, 65) and d["quant_type"] == "nf4"
        assert ("nested_offset" in d) == nested
    back = B.QuantState.from_dict(d)
    assert back.nested == nested and back.shape == state.shape and back.dtype == np.float16
    np.testing.assert_array_equal(B.dequantize_4bit(packed, back), B.dequantize_4bit(packed, state))


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("qt", ["nf4", "fp4", "int4"])
def test_backends_agree(xp, to_xp, qt):
    x = make_data(7, 5001, "heavy", 1.0, np.float32, False)
    packed, state = B.quantize_4bit(to_xp(x), blocksize=128, quant_type=qt, compress_statistics=True)
    ref_packed, ref_state = B.quantize_4bit(x, blocksize=128, quant_type=qt, compress_statistics=True)
    np.testing.assert_array_equal(to_numpy(packed), ref_packed)
    np.testing.assert_array_equal(to_numpy(state.state2.absmax), ref_state.state2.absmax)
    np.testing.assert_array_equal(to_numpy(B.dequantize_4bit(packed, state)),
                                  B.dequantize_4bit(ref_packed, ref_state))
    q, s8 = B.quantize_blockwise(to_xp(x), blocksize=256, nested=True)
    q_ref, s8_ref = B.quantize_blockwise(x, blocksize=256, nested=True)
    np.testing.assert_array_equal(to_numpy(q), q_ref)
    np.testing.assert_array_equal(to_numpy(B.dequantize_blockwise(q, s8)),
                                  B.dequantize_blockwise(q_ref, s8_ref))


def test_double_quantize_with_a_given_offset_and_state_to_cpu():
    absmax = np.random.default_rng(4).uniform(0.5, 4.0, 700).astype(np.float32)
    q, offset, s2 = B.double_quantize(absmax)
    assert float(offset) == pytest.approx(float(absmax.astype(np.float64).mean()), rel=1e-6)
    assert q.dtype == np.uint8 and s2.absmax.shape == (3,)
    q2, offset2, _ = B.double_quantize(absmax, offset=np.float32(2.0))
    assert float(offset2) == 2.0
    np.testing.assert_array_equal(q2, B.quantize_blockwise(absmax - np.float32(2.0), blocksize=256)[0])
    x = np.random.default_rng(5).standard_normal(300).astype(np.float32)
    packed, state = B.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    moved = state.to("cpu")
    assert moved is not state and moved.state2 is not state.state2
    np.testing.assert_array_equal(B.dequantize_4bit(packed, moved), B.dequantize_4bit(packed, state))


# ----------------------------------------------------------------------------- CUDA float details
def test_fp4_index_8_decodes_to_negative_zero():
    """bitsandbytes' CUDA FP4 decoder multiplies by the sign bit: 0b1000 -> -0.0."""
    x = np.array([1.0, -0.001, 0.0, -0.5], np.float32)
    packed, state = B.quantize_4bit(x, blocksize=64, quant_type="fp4")
    np.testing.assert_array_equal(B.unpack_4bit(packed, 4), [3, 8, 0, 13])
    deq = B.dequantize_4bit(packed, state)
    assert np.signbit(deq[1]) and deq[1] == 0.0 and not np.signbit(deq[2])
    assert deq[3] == -0.5 * 1.0


def test_flush_to_zero_like_cuda():
    """Subnormal inputs count as zero (fixture q8/q4.subnormal: absmax 0, every index 0)."""
    x = np.ones(128, np.float32)
    x[:64] = np.float32(3e-40) * np.linspace(-1, 1, 64, dtype=np.float32)   # subnormals
    for quant_type in ("nf4", "fp4"):
        packed, state = B.quantize_4bit(x, blocksize=64, quant_type=quant_type)
        assert state.absmax[0] == 0 and np.all(packed[:32] == 0)
    q, state = B.quantize_blockwise(x, blocksize=64)
    assert state.absmax[0] == 0 and np.all(q[:64] == 0)
    # a subnormal scaled value is -0 (not < 0), so FP4 keeps no sign bit for it
    y = np.array([1e30, -1e-10, -1e30], np.float32)                     # -1e-10/1e30 underflows
    packed, _ = B.quantize_4bit(y, blocksize=64, quant_type="fp4")
    np.testing.assert_array_equal(B.unpack_4bit(packed, 3), [3, 0, 11])


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("qt", ["nf4", "fp4", "int4"])
def test_4bit_dequantize_to_bfloat16_rounds_the_float32_result_once(xp, to_xp, qt, nested):
    """bfloat16 output (QLoRA's compute dtype): each float32 value rounded once, nearest even, the
    course's rounding on the bits; every spelling of the dtype gives it."""
    pytest.importorskip("ml_dtypes")
    from minipeft.backend import bfloat16_dtype
    from minipeft.quant.floats import float32_to_bfloat16_bits

    x = np.random.default_rng(3).standard_normal((33, 129)).astype(np.float32) * 40
    x[0, :5] = [3.0e38, -3.0e38, 1e-39, 0.0, -0.0]                    # overflow to inf, flushed, zeros
    packed, state = B.quantize_4bit(to_xp(x), blocksize=64, quant_type=qt, compress_statistics=nested)
    y32 = to_numpy(B.dequantize_4bit(packed, state, dtype=np.float32))
    for spelling in ("bfloat16", bfloat16_dtype(), bfloat16_dtype().type):
        y = B.dequantize_4bit(packed, state, dtype=spelling)
        assert y.dtype == bfloat16_dtype() and y.shape == x.shape
        np.testing.assert_array_equal(to_numpy(y).view(np.uint16), float32_to_bfloat16_bits(y32))
    with pytest.raises(TypeError, match="float32 or float16, got bfloat16"):     # 8-bit: no bfloat16 output
        q, s8 = B.quantize_blockwise(to_xp(x))
        B.dequantize_blockwise(q, s8, dtype="bfloat16")


def test_quant_state_cache_is_not_state():
    """The launch cache a GPU dequantize keeps on a QuantState is not compared, printed or moved."""
    packed, state = B.quantize_4bit(np.ones(100, np.float32), quant_type="nf4", compress_statistics=True)
    state.cache["anything"] = object()
    assert "cache" not in repr(state) and "anything" not in repr(state)
    assert state.to("cpu").cache == {} and state.to("cpu").state2.cache == {}
    assert "cache" not in state.as_dict() and B.QuantState.from_dict(state.as_dict()).cache == {}
    twin = copy.deepcopy(state)
    assert twin.cache == {} and state.cache and twin.state2.cache == {}
    np.testing.assert_array_equal(B.dequantize_4bit(packed, twin), B.dequantize_4bit(packed, state))
