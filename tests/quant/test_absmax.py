"""Absmax (symmetric) and zero-point (asymmetric) int8 quantization."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.backend import to_numpy
from minipeft.quant import absmax as A


def make(seed, rows, cols, dist, scale, dtype):
    rng = np.random.default_rng(seed)
    if dist == "normal":
        x = rng.standard_normal((rows, cols))
    elif dist == "relu":
        x = np.maximum(rng.standard_normal((rows, cols)), 0)
    elif dist == "heavy":
        x = rng.standard_t(2, (rows, cols))
    elif dist == "positive":
        x = rng.uniform(3, 5, (rows, cols))
    else:
        x = np.zeros((rows, cols))
    big = float(np.finfo(dtype).max) / 2                   # t(2) * 1e3 can overflow float16
    return np.clip(x * scale, -big, big).astype(dtype)


arrays = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(1, 50),
                   st.sampled_from(["normal", "relu", "heavy", "positive", "zeros"]),
                   st.sampled_from([1e-3, 1.0, 1e3]),
                   st.sampled_from([np.float32, np.float64, np.float16]))
pers = st.sampled_from(["tensor", "row", "column"])


def group_reduce(x, per, fn):
    axes = {"tensor": None, "row": 1, "column": 0}[per]
    return fn(x, axis=axes, keepdims=True)


@settings(max_examples=100, deadline=None)
@given(arrays, pers, st.sampled_from([8, 4]))
def test_absmax_bound(args, per, bits):
    x = make(*args)
    q, absmax = A.absmax_quantize(x, per=per, bits=bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == np.int8 and q.shape == x.shape
    assert np.abs(q.astype(int)).max() <= qmax
    xf = x.astype(np.float64)
    ref = group_reduce(np.abs(xf), per, np.max)
    np.testing.assert_array_equal(absmax.astype(np.float64), ref)
    deq = A.absmax_dequantize(q, absmax, bits=bits).astype(np.float64)
    # half a step, plus the compute dtype's rounding (unit u): x * fl(qmax / absmax) is off by at most
    # 2u qmax codes before rint (so a value 109.49999 codes in exact arithmetic may round from 109.5:
    # seed 9, 6x7 'positive' 1e-3 float32, per row), and dequantizing adds 3u |x^|: in all
    # (1 + 10 u qmax) times the half step
    u = np.finfo(np.float64 if x.dtype == np.float64 else np.float32).eps / 2
    assert np.all(np.abs(deq - xf) <= ref / (2 * qmax) * (1 + 10 * u * qmax) + 1e-30)
    assert np.all(deq[xf == 0] == 0)
    # re-quantizing the dequantized values gives the same codes
    q2, _ = A.absmax_quantize(A.absmax_dequantize(q, absmax, bits=bits), per=per, bits=bits)
    np.testing.assert_array_equal(q2, q)


@settings(max_examples=100, deadline=None)
@given(arrays, pers)
def test_zeropoint_bound(args, per):
    x = make(*args)
    q, scale, zp = A.zeropoint_quantize(x, per=per)
    assert q.dtype == np.int8 and zp.dtype == np.int32
    xf = x.astype(np.float64)
    lo, hi = group_reduce(xf, per, np.min), group_reduce(xf, per, np.max)
    span = np.where(hi == lo, 1.0, hi - lo)
    deq = A.zeropoint_dequantize(q, scale, zp).astype(np.float64)
    tol = span / 510 * (1 + 1e-4) + 1e-6 * np.maximum(np.abs(lo), np.abs(hi))
    assert np.all(np.abs(deq - xf) <= tol)
    # the minimum uses code -128 and the whole range is used
    assert np.all(group_reduce(q.astype(int), per, np.min) == -128)
    wide = (hi - lo) > 0
    assert np.all(group_reduce(q.astype(int), per, np.max)[wide] >= 126)
    # 0 comes back exactly whenever it lies in the group's range
    zero_in = np.broadcast_to((lo <= 0) & (hi >= 0), x.shape)
    assert np.all(deq[(xf == 0) & zero_in] == 0)


def test_zeropoint_beats_absmax_on_relu_data():
    x = np.maximum(np.random.default_rng(0).standard_normal((256, 256)), 0).astype(np.float32)
    qa, am = A.absmax_quantize(x)
    qz, s, z = A.zeropoint_quantize(x)
    err_abs = np.abs(A.absmax_dequantize(qa, am) - x).mean()
    err_zp = np.abs(A.zeropoint_dequantize(qz, s, z) - x).mean()
    assert err_zp < 0.6 * err_abs                           # about half: twice the levels in use
    assert (qa >= 0).all() and qa.min() == 0                # absmax wastes the negative codes
    assert qz.min() == -128 and qz.max() == 127


def test_finer_scales_isolate_an_outlier():
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    x[5, 7] = 100.0
    errs = {}
    for per in ["tensor", "row", "column"]:
        q, am = A.absmax_quantize(x, per=per)
        errs[per] = np.abs(A.absmax_dequantize(q, am) - x)
    others = np.ones(x.shape, bool)
    others[5, :] = False
    others[:, 7] = False
    assert errs["row"][others].mean() < 0.1 * errs["tensor"][others].mean()
    assert errs["column"][others].mean() < 0.1 * errs["tensor"][others].mean()


def test_formula_matches_the_course():
    x = np.array([[1.0, -2.0, 0.5], [4.0, 0.0, -1.0]], np.float32)
    q, am = A.absmax_quantize(x)
    c = 127 / 4.0
    np.testing.assert_array_equal(q, np.rint(c * x).astype(np.int8))
    q, am = A.absmax_quantize(x, per="row")
    np.testing.assert_array_equal(am, [[2.0], [4.0]])
    np.testing.assert_array_equal(q[0], np.rint(x[0] * 127 / 2.0))
    assert np.rint(np.float32(2.5)) == 2.0                  # half to even, like torch.round


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        A.absmax_quantize(np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        A.zeropoint_quantize(np.array([1.0, np.inf], np.float32))
    with pytest.raises(TypeError, match="expects a float array, got int32"):
        A.absmax_quantize(np.array([1, 2], np.int32))
    with pytest.raises(ValueError, match="per"):
        A.absmax_quantize(np.ones((2, 2), np.float32), per="block")
    with pytest.raises(ValueError, match="per='tensor'"):
        A.absmax_quantize(np.ones(4, np.float32), per="row")
    with pytest.raises(ValueError, match="bits"):
        A.absmax_quantize(np.ones(4, np.float32), bits=9)
    with pytest.raises(ValueError, match="empty"):
        A.zeropoint_quantize(np.ones(0, np.float32))


def test_backends_agree(xp, to_xp):
    x = make(1, 16, 33, "heavy", 1.0, np.float32)
    for per in ["tensor", "row", "column"]:
        q, am = A.absmax_quantize(to_xp(x), per=per)
        q_ref, am_ref = A.absmax_quantize(x, per=per)
        np.testing.assert_array_equal(to_numpy(q), q_ref)
        qz, s, z = A.zeropoint_quantize(to_xp(x), per=per)
        qz_ref, s_ref, z_ref = A.zeropoint_quantize(x, per=per)
        np.testing.assert_array_equal(to_numpy(qz), qz_ref)
        np.testing.assert_array_equal(to_numpy(A.zeropoint_dequantize(qz, s, z)),
                                      A.zeropoint_dequantize(qz_ref, s_ref, z_ref))
