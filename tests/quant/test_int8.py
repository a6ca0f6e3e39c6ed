"""Vector-wise int8, int32-accumulated int8 matmul, LLM.int8() outlier decomposition."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.backend import to_numpy
from minipeft.quant import int8 as I


def frac_outside(out, ref, atol, rtol):
    return float((~np.isclose(out, ref, atol=atol, rtol=rtol)).mean())


def xavier(rng, out_f, in_f):
    bound = np.sqrt(6.0 / (in_f + out_f))
    return rng.uniform(-bound, bound, (out_f, in_f)).astype(np.float32)


# ----------------------------------------------------------------------------- vector-wise quant
@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 70),
       st.sampled_from([0.0, 2.0, 3.0, 6.0]), st.sampled_from([np.float32, np.float16]),
       st.sampled_from([0.1, 1.0, 4.0]))
def test_vectorwise_quant_properties(seed, rows, cols, threshold, dtype, scale):
    rng = np.random.default_rng(seed)
    A = (rng.standard_normal((rows, cols)) * scale).astype(dtype)
    if rows > 2:
        A[1] = 0                                                        # an all-zero row
    CA, stats, outliers = I.int8_vectorwise_quant(A, threshold=threshold)
    assert CA.dtype == np.int8 and CA.shape == A.shape and stats.dtype == np.float32
    Af = A.astype(np.float32)
    mask = np.abs(Af) >= threshold if threshold > 0 else np.zeros(A.shape, bool)
    kept = np.where(mask, 0, Af)
    np.testing.assert_array_equal(stats, np.abs(kept).max(axis=1))   # outliers excluded
    if threshold > 0:
        np.testing.assert_array_equal(outliers, np.nonzero(mask.any(axis=0))[0])
        np.testing.assert_array_equal(outliers, I.outlier_columns(A, threshold))
        assert np.all(CA[:, outliers] == 0)
    else:
        assert outliers is None
    # error of the non-outlier columns within absmax / 254
    inlier_cols = np.ones(cols, bool)
    if threshold > 0:
        inlier_cols[outliers] = False
    deq = I.int8_vectorwise_dequant(CA, stats)
    err = np.abs(deq - Af)[:, inlier_cols]
    u = np.finfo(np.float32).eps / 2  # float32 rounding of x * (127 / absmax) and of the dequantize, as in
    assert np.all(err <= stats[:, None] / 254 * (1 + 10 * u * 127) + 1e-30)  # tests/quant/test_absmax.py
    assert np.all(CA[stats == 0] == 0)
    assert np.abs(CA.astype(int)).max() <= 127


def test_vectorwise_quant_matches_torch_formula_if_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    A = (rng.standard_normal((64, 96)) * 3).astype(np.float16)
    CA, stats, _ = I.int8_vectorwise_quant(A)
    At = torch.from_numpy(A)
    row_stats = torch.max(At.abs(), dim=1).values.float()
    ref = torch.round(At * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8).numpy()
    np.testing.assert_array_equal(stats, row_stats.numpy())
    np.testing.assert_array_equal(CA, ref)


def test_vectorwise_quant_rows_over_leading_axes_and_one_row():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((2, 3, 8)).astype(np.float32)
    CA, stats, _ = I.int8_vectorwise_quant(A)
    CA2, stats2, _ = I.int8_vectorwise_quant(A.reshape(6, 8))
    np.testing.assert_array_equal(CA.reshape(6, 8), CA2)
    np.testing.assert_array_equal(stats, stats2)
    x = np.array([[1.0, 7.0, -2.0]], np.float32)                      # rows == 1
    CA, stats, cols = I.int8_vectorwise_quant(x, threshold=6.0)
    assert cols.tolist() == [1] and stats.tolist() == [2.0]
    assert CA.tolist() == [[64, 0, -127]]                              # round(63.5) = 64 (even)


# ----------------------------------------------------------------------------- int8 matmul
def test_int8_linear_matmul_accumulates_in_int32():
    A = np.full((4, 64), 127, np.int8)
    B = np.full((3, 64), 127, np.int8)
    C = I.int8_linear_matmul(A, B)
    assert C.dtype == np.int32 and np.all(C == 127 * 127 * 64)
    wrapped = np.matmul(A, B.T)                                        # what NumPy does with int8
    assert wrapped.dtype == np.int8 and np.all(wrapped != 127 * 127 * 64)
    rng = np.random.default_rng(0)
    A = rng.integers(-127, 128, (5, 7, 33)).astype(np.int8)
    B = rng.integers(-127, 128, (9, 33)).astype(np.int8)
    ref = A.astype(np.int64) @ B.astype(np.int64).T
    np.testing.assert_array_equal(I.int8_linear_matmul(A, B), ref)
    np.testing.assert_array_equal(I.int8_linear_matmul(A, B, accumulate="float64"), ref)
    with pytest.raises(ValueError, match="B must be"):
        I.int8_linear_matmul(A, B[:, :5])
    with pytest.raises(TypeError, match="A must be int8, got int16"):
        I.int8_linear_matmul(A.astype(np.int16), B)
    with pytest.raises(ValueError, match="accumulate must be 'int32' or 'float64', got 'int8'"):
        I.int8_linear_matmul(A, B, accumulate="int8")


def test_int8_mm_dequant():
    assert I.MM_DEQUANT_CONST == np.float32(1 / 16129)
    rng = np.random.default_rng(0)
    C = rng.integers(-2_000_000, 2_000_000, (16, 24)).astype(np.int32)
    row = rng.uniform(0.1, 8, 16).astype(np.float32)
    col = rng.uniform(0.1, 3, 24).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    ref = C.astype(np.float64) * (row[:, None] / 127.0) * (col[None, :] / 127.0) + bias
    out32 = I.int8_mm_dequant(C, row, col, dtype=np.float32, bias=bias)
    np.testing.assert_allclose(out32, ref, rtol=1e-6, atol=1e-6)
    out16 = I.int8_mm_dequant(C, row, col, bias=bias)                  # bitsandbytes' default
    assert out16.dtype == np.float16
    np.testing.assert_array_equal(out16, out32.astype(np.float16))
    # bitsandbytes' check: after dividing by the column std, atol 0.015 / rtol 0.1
    std = ref.std(axis=0)
    np.testing.assert_allclose(out16 / std, ref / std, atol=0.015, rtol=0.1)
    with pytest.raises(TypeError, match="expects the int32 product, got int64"):
        I.int8_mm_dequant(C.astype(np.int64), row, col)


def test_vectorwise_pipeline_32x32():
    rng = np.random.default_rng(0)
    for _ in range(5):
        A = (rng.standard_normal((32, 32)) * 0.5).astype(np.float32)
        W = xavier(rng, 32, 32)
        CA, SA, _ = I.int8_vectorwise_quant(A)
        CW, SW, _ = I.int8_vectorwise_quant(W)
        out = I.int8_mm_dequant(I.int8_linear_matmul(CA, CW), SA, SW, dtype=np.float32)
        ref = A.astype(np.float64) @ W.astype(np.float64).T
        np.testing.assert_allclose(out, ref, atol=0.025, rtol=0.05)
        # the per-element bound of reference section 9.1
        dx, dw = SA[:, None] / 254.0, SW[:, None] / 254.0
        bound = (np.abs(A) @ np.broadcast_to(dw, W.shape).T + np.broadcast_to(dx, A.shape) @ np.abs(W).T
                 + np.broadcast_to(dx, A.shape) @ np.broadcast_to(dw, W.shape).T)
        assert np.all(np.abs(out - ref) <= bound * (1 + 1e-4) + 1e-6)


# ----------------------------------------------------------------------------- LLM.int8()
def test_outlier_columns():
    X = np.zeros((2, 3, 10), np.float32)
    X[0, 1, 4] = 6.0
    X[1, 2, 7] = -7.5
    X[1, 0, 2] = 5.99
    assert I.outlier_columns(X).tolist() == [4, 7]
    assert I.outlier_columns(X, threshold=5.0).tolist() == [2, 4, 7]
    assert I.outlier_columns(X, threshold=0.0).size == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_llm_int8_matches_float64_like_bitsandbytes_matmullt(seed):
    """bitsandbytes' test_matmullt: A (64, 32) with 1/8 of its columns set to 6.0, B xavier."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((64, 32)).astype(np.float32)
    A[:, rng.integers(0, 32, 4)] = 6.0
    W = xavier(rng, 48, 32)
    bias = rng.standard_normal(48).astype(np.float32)
    ref = A.astype(np.float64) @ W.astype(np.float64).T + bias
    out = I.llm_int8_matmul(A, W, threshold=6.0, bias=bias)
    assert out.dtype == np.float32 and out.shape == (64, 48)
    assert frac_outside(out, ref, 0.01, 0.1) <= 0.021
    assert frac_outside(out, ref, 0.035, 0.2) <= 0.001
    out16 = I.llm_int8_matmul(A.astype(np.float16), W.astype(np.float16), threshold=6.0)
    assert out16.dtype == np.float16
    assert frac_outside(out16, ref - bias, 0.01, 0.1) <= 0.0175


def test_decomposition_recovers_the_float_result_with_large_outliers():
    """Outlier features of magnitude 20-60 in 4 of 32 dims (as in large LLMs)."""
    rng = np.random.default_rng(0)
    errs = {"paper": [], "bnb": [], "none": []}
    for _ in range(5):
        A = rng.standard_normal((64, 32)).astype(np.float32)
        cols = rng.choice(32, 4, replace=False)
        A[:, cols] = rng.uniform(20, 60, (64, 4)) * rng.choice([-1, 1], (64, 4))
        W = xavier(rng, 48, 32)
        ref = A.astype(np.float64) @ W.astype(np.float64).T
        paper = I.llm_int8_matmul(A, W, threshold=6.0, keep_float_outliers=True)
        bnb = I.llm_int8_matmul(A, W, threshold=6.0)
        none = I.llm_int8_matmul(A, W, threshold=0.0)                  # no decomposition
        assert frac_outside(paper, ref, 0.01, 0.1) <= 0.021            # within bnb's tolerances
        assert frac_outside(paper, ref, 0.035, 0.2) <= 0.001
        assert frac_outside(none, ref, 0.035, 0.2) > 0.005             # visibly not
        for key, out in (("paper", paper), ("bnb", bnb), ("none", none)):
            errs[key].append(np.abs(out - ref).mean())
    mean = {k: float(np.mean(v)) for k, v in errs.items()}
    assert mean["none"] > 10 * mean["paper"]
    # bitsandbytes >= 0.45 multiplies the outliers by the int8-dequantized weight: in between
    assert mean["paper"] < mean["bnb"] < mean["none"]


def test_matmul_8bit_shapes_and_errors():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 5, 16)).astype(np.float32)
    W = xavier(rng, 12, 16)
    CB, SCB, _ = I.int8_vectorwise_quant(W)
    out = I.matmul_8bit(X, CB, SCB)
    assert out.shape == (2, 5, 12)
    np.testing.assert_array_equal(out.reshape(10, 12), I.matmul_8bit(X.reshape(10, 16), CB, SCB))
    with pytest.raises(ValueError, match="NaN"):
        I.matmul_8bit(np.full((2, 16), np.nan, np.float32), CB, SCB)
    with pytest.raises(TypeError, match="supports float16 and float32 arrays, got float64"):
        I.llm_int8_matmul(X.astype(np.float64), W)
    with pytest.raises(ValueError, match="threshold must be >= 0, got -1.0"):
        I.int8_vectorwise_quant(X, threshold=-1.0)


def test_backends_agree(xp, to_xp):
    rng = np.random.default_rng(5)
    A = rng.standard_normal((40, 64)).astype(np.float32)
    A[:, [3, 9]] = 8.0
    W = xavier(rng, 24, 64)
    CA, S, cols = I.int8_vectorwise_quant(to_xp(A), threshold=6.0)
    CA_ref, S_ref, cols_ref = I.int8_vectorwise_quant(A, threshold=6.0)
    np.testing.assert_array_equal(to_numpy(CA), CA_ref)
    np.testing.assert_array_equal(to_numpy(cols), cols_ref)
    out = I.llm_int8_matmul(to_xp(A), to_xp(W))
    np.testing.assert_allclose(to_numpy(out), I.llm_int8_matmul(A, W), rtol=1e-6, atol=1e-6)
