"""The float32 -> float16 / bfloat16 cast kernel (minipeft/kernels/cast16.py) against its twin.

The twin is :func:`minipeft.amp.cast_16bit` run with the fast paths off: CuPy's ``astype`` (into
a zero-filled array when an axis is padded). Same bits for every non-NaN float32 (ties, the
16-bit overflow thresholds, subnormals), a NaN stays a NaN; padded rows and columns are +0.
The first test runs the twin's padding on NumPy (no GPU needed).
"""
from __future__ import annotations

import numpy as np
import pytest

from minipeft import amp, fast
from tests.quant.test_floats import interesting_float32


def test_the_twin_pads_with_zeros_on_numpy():
    x = np.arange(6, dtype=np.float32).reshape(2, 3) + 0.1
    y = fast.call(amp.cast_16bit, x, np.float16, 5, -1)
    assert y.dtype == np.float16 and y.shape == (2, 5)
    np.testing.assert_array_equal(y[:, :3], x.astype(np.float16))
    assert not y[:, 3:].any()
    y0 = amp.cast_16bit(x, np.float16, 4, 0)
    assert y0.shape == (4, 3) and not y0[2:].any() and np.array_equal(y0[:2], x.astype(np.float16))
    assert amp.cast_16bit(x, np.float16).shape == (2, 3)


def _bits_equal(got, ref):
    g, r = got.view(np.uint16).get(), ref.view(np.uint16).get()
    nan = np.isnan(ref.astype(np.float32).get())
    np.testing.assert_array_equal(g[~nan], r[~nan])
    assert np.isnan(got.astype(np.float32).get()[nan]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_cast_kernel_gives_cupys_bits(name, monkeypatch):
    import cupy as cp

    dt = np.dtype(np.float16) if name == "float16" else amp.bfloat16_dtype()
    x = cp.asarray(interesting_float32(7, 100_003))  # odd length: the vector part and a tail
    assert [p.name for p in fast.paths(amp.cast_16bit)] == ["minipeft.kernels.cast16.cast_16bit_cuda"]
    cases = [(x, None, -1), (x[1:], None, -1),  # x[1:]: not 16-byte aligned, the scalar path
             (x[:1000 * 37].reshape(1000, 37), 40, -1),  # a gradient's columns padded
             (x[:13 * 64].reshape(13, 64), 16, 0),  # a weight's rows padded
             (x[:24].reshape(2, 3, 4), 8, -1), (x[:0].reshape(0, 5), 8, -1), (x[:7], 8, -1),
             # strided views: attention's q of c_attn's output, (B, T, 3C) -> (B, H, T, D); a transpose;
             # a reversed axis (negative stride); a 1-D step
             (x[:2 * 5 * 3 * 8].reshape(2, 5, 24)[..., :8].reshape(2, 5, 2, 4).transpose(0, 2, 1, 3), None, -1),
             (x[:37 * 41].reshape(37, 41).T, None, -1), (x[:60].reshape(3, 20)[::-1, 1::3], None, -1),
             (x[:999:3], None, -1)]
    for a, n, axis in cases:
        got = amp.cast_16bit(a, dt, n, axis)
        monkeypatch.setenv("MINIPEFT_KERNELS", "0")
        ref = amp.cast_16bit(a, dt, n, axis)
        monkeypatch.delenv("MINIPEFT_KERNELS")
        assert got.dtype == ref.dtype == dt and got.shape == ref.shape and got.flags.c_contiguous
        _bits_equal(got, ref)
        assert ref.flags.c_contiguous  # the twin's contract too (batched GEMMs take C-contiguous operands)


@pytest.mark.gpu
def test_to_compute_uses_the_kernel_and_keeps_the_emulations_values():
    import cupy as cp

    x0 = np.random.default_rng(0).normal(size=(33, 50)).astype(np.float32)
    for name in ("float16", "bfloat16"):
        got = amp.to_compute_padded(cp.asarray(x0), name, 56)
        assert got.shape == (33, 56) and got.dtype.itemsize == 2
        np.testing.assert_array_equal(got.astype(cp.float32).get()[:, :50], amp.round_to_compute(x0, name))
        assert not got[:, 50:].astype(cp.float32).any()
