"""Real bfloat16 on the GPU against its exact emulation on the CPU (minipeft.amp).

On CuPy a bfloat16 product is one cuBLAS GEMM of ``ml_dtypes.bfloat16`` arrays with float32
accumulation and a float32 result; on NumPy the same arithmetic is emulated: operands rounded
to bfloat16 (nearest, ties to even), then a float32 product. Products of two bfloat16 values are
exact in float32 (8 + 8 significand bits), so the two differ only in the order of the float32
sums. Tolerance, stated once (:func:`assert_same_sums`): k-long float32 sums in any order are
within k 2^-24 (|a| @ |b|) of the exact sum, so two orders are within twice that.
"""
import sys

import numpy as np
import pytest

from minipeft import amp, engine
from minipeft import functional as F
from minipeft.engine import Tensor
from minipeft.quant import floats

r16 = lambda a: amp.round_to_compute(np.asarray(a, np.float32), "bfloat16")  # noqa: E731


def bf16_step(v) -> np.ndarray:
    """The spacing of bfloat16 values at |v|: 2^(e - 7) for 2^e <= |v| < 2^(e+1)."""
    _, e = np.frexp(np.abs(np.asarray(v, np.float64)))  # |v| = m 2^e, 0.5 <= m < 1
    return np.ldexp(1.0, e - 8)


def assert_same_sums(gpu, cpu, k: int, abs_prod):
    """``gpu`` equals ``cpu`` up to the order of k-long float32 sums (see the module docstring)."""
    gpu, cpu = np.asarray(gpu, np.float64), np.asarray(cpu, np.float64)
    bound = k * 2.0 ** -23 * np.asarray(abs_prod, np.float64) + 1e-30
    err = np.abs(gpu - cpu)
    assert np.all(err <= bound), f"{np.mean(err > bound):.2%} of the entries differ by more than the sum order allows"
    # and the result is not rounded to bfloat16 (cuBLAS wrote its float32 sums)
    assert np.mean(r16(gpu) != gpu) > 0.5, "the GPU result looks rounded to bfloat16"


def test_bfloat16_dtype_names_the_remedy_when_ml_dtypes_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes -> ImportError
    with pytest.raises(ImportError, match="pip install ml_dtypes"):
        amp.bfloat16_dtype()
    # the CPU emulation needs no ml_dtypes
    np.testing.assert_array_equal(r16(np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8], np.float32)),
                                  [1.0, 1.0, 1 + 2**-6])


def test_emulated_product_is_rounded_operands_float32_sums():
    rng = np.random.default_rng(0)
    a0, b0 = rng.normal(size=(32, 200)).astype(np.float32), rng.normal(size=(200, 24)).astype(np.float32)
    a, b = amp.to_compute(a0, "bfloat16"), amp.to_compute(b0, "bfloat16")
    assert a.dtype == np.float32 and np.array_equal(a, floats.round_to_bfloat16(a0))
    y = amp.gemm(a, b)
    np.testing.assert_array_equal(y, a @ b)
    exact = (a.astype(np.float64) @ b.astype(np.float64))  # within float32's sum error of the exact product
    assert np.all(np.abs(y - exact) <= 200 * 2.0 ** -24 * (np.abs(a) @ np.abs(b)))
    assert np.mean(np.abs(y - exact) > bf16_step(exact) / 2) == 0  # far closer than one bfloat16 rounding


@pytest.mark.gpu
def test_cupy_bfloat16_cast_is_the_course_rounding():
    import cupy as cp

    from tests.quant.test_floats import interesting_float32

    x = interesting_float32(5, 50_000)
    x = x[~np.isnan(x)]
    got = cp.asarray(x).astype(amp.bfloat16_dtype()).view(cp.uint16).get()
    np.testing.assert_array_equal(got, floats.float32_to_bfloat16_bits(x))
    np.testing.assert_array_equal(amp.round_to_compute(cp.asarray(x), "bfloat16").get(), floats.round_to_bfloat16(x))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 1024, 128), (13, 64, 40)])
def test_gpu_bfloat16_product_is_a_real_bfloat16_gemm_equal_to_the_emulation(shape):
    import cupy as cp
    from cupy._core import _routines_linalg

    m, k, n = shape
    rng = np.random.default_rng(2)
    a0, b0 = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
    a, b = amp.to_compute(cp.asarray(a0), "bfloat16"), amp.to_compute(cp.asarray(b0), "bfloat16")
    bf16 = amp.bfloat16_dtype()
    assert a.dtype == b.dtype == bf16 and a.nbytes == m * k * 2
    assert cp._core.get_compute_type(bf16) == _routines_linalg.COMPUTE_TYPE_FP32
    y = amp.gemm(a, b.T.copy().T)  # a transposed operand, as AmpLinear's W^T: passed by flag
    assert y.dtype == cp.float32 and y.flags.c_contiguous
    ea, eb = amp.to_compute(a0, "bfloat16"), amp.to_compute(b0, "bfloat16")
    assert_same_sums(y.get(), amp.gemm(ea, eb), k, np.abs(ea) @ np.abs(eb))


@pytest.mark.gpu
@pytest.mark.parametrize("out", [48, 50])  # 50: W and the gradient zero-padded to 56 rows inside
def test_gpu_bfloat16_linear_step_matches_the_cpu_emulation(out):
    """AmpLinear forward and backward (dL/dx, dL/dW, dL/db) under autocast("bfloat16"), CuPy vs NumPy."""
    import cupy as cp

    rng = np.random.default_rng(3)
    k = 96
    x0, w0, b0 = (rng.normal(size=s).astype(np.float32) for s in ((4, 16, k), (out, k), (out,)))
    g0 = rng.normal(size=(4, 16, out)).astype(np.float32)
    res = {}
    for xp in (np, cp):
        leaf = Tensor(xp.asarray(x0), requires_grad=True)
        w, b = Tensor(xp.asarray(w0), requires_grad=True), Tensor(xp.asarray(b0), requires_grad=True)
        x = leaf * 1.0  # an activation
        before = engine.saved_bytes()
        with amp.autocast("bfloat16"):
            y = F.linear(x, w, b)
        saved = engine.saved_bytes() - before
        y.backward(xp.asarray(g0))
        res[xp.__name__] = [np.asarray(t.get() if hasattr(t, "get") else t)
                            for t in (y.data, leaf.grad, w.grad, b.grad)]
        itemsize = 2 if xp.__name__ == "cupy" else 4  # the bfloat16 x and W copy are held for backward on the GPU
        assert saved == (4 * 16 * k + amp.aligned(out) * k) * itemsize
        assert y.dtype == leaf.grad.dtype == w.grad.dtype == np.float32
    (yg, xg, wg, bg), (yc, xc, wc, bc) = res["cupy"], res["numpy"]
    r = lambda a: r16(a).astype(np.float64)  # noqa: E731
    assert_same_sums(yg.astype(np.float64) - b0, yc.astype(np.float64) - b0, k + 1,
                     np.abs(r(x0)) @ np.abs(r(w0)).T + np.abs(b0))
    assert_same_sums(xg, xc, out, np.abs(r(g0)) @ np.abs(r(w0)))
    assert_same_sums(wg, wc, 64, np.abs(r(g0)).reshape(-1, out).T @ np.abs(r(x0)).reshape(-1, k))
    np.testing.assert_allclose(bg, bc, rtol=1e-5)  # float32 sums of the float32 gradient


@pytest.mark.gpu
def test_gpu_linear4bit_in_bfloat16_matches_the_cpu_emulation():
    """QLoRA's frozen layer: NF4 dequantized to bfloat16 (CPU: float32, rounded), one bfloat16 GEMM."""
    from minipeft.nn import Linear
    from minipeft.quant.modules import Linear4bit

    rng = np.random.default_rng(4)
    q_cpu = Linear4bit(Linear(128, 64, bias=False, rng=0), compute_dtype="bfloat16")
    q_gpu = Linear4bit(Linear(128, 64, bias=False, rng=0), compute_dtype="bfloat16").to("cuda")
    x0, g0 = rng.normal(size=(8, 128)).astype(np.float32), rng.normal(size=(8, 64)).astype(np.float32)
    outs = {}
    for q, dev in ((q_cpu, "cpu"), (q_gpu, "cuda")):
        x = Tensor(x0, requires_grad=True).to(dev)
        y = q(x)
        y.backward(Tensor(g0).to(dev).data)
        outs[dev] = [np.asarray(a.get() if hasattr(a, "get") else a) for a in (y.data, x.grad)]
    W = r16(q_cpu.dequantize()).astype(np.float64)
    assert_same_sums(outs["cuda"][0], outs["cpu"][0], 128, np.abs(r16(x0)) @ np.abs(W).T)
    assert_same_sums(outs["cuda"][1], outs["cpu"][1], 64, np.abs(r16(g0)) @ np.abs(W))


@pytest.mark.gpu
def test_gpu_train_in_bfloat16_matches_the_cpu_emulation():
    from minipeft.data import lm_batches
    from minipeft.gpt import GPT, GPTConfig
    from minipeft.train import TrainConfig, train

    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32, vocab_size=64)
    data = np.random.default_rng(0).integers(0, 8, size=4000) * 3 % 64
    losses = {}
    for device in ("cpu", "cuda"):
        model = GPT(cfg, seed=0).to(device)
        tc = TrainConfig(max_steps=20, batch_size=8, lr=3e-3, progress=False, compute_dtype="bfloat16")
        losses[device] = np.array(train(model, lambda rng: lm_batches(data, 8, 32, rng), config=tc).losses)
    # the first loss differs only by the order of float32 sums (and the roundings of operands that
    # order flips); later steps carry those differences through the updates (bfloat16 keeps 8 bits:
    # 2^-8 = 4e-3)
    np.testing.assert_allclose(losses["cuda"][0], losses["cpu"][0], rtol=1e-3)
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=2e-2)
    assert losses["cuda"][-1] < losses["cuda"][0]
