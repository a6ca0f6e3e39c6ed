"""Mixed precision (minipeft.amp): 16-bit products under autocast, loss scaling, training.

On NumPy the 16-bit products are emulated (rounded operands, float32 product, rounded
result); on CuPy they are real float16 or bfloat16 GEMMs. Both are checked against the same formula.
"""
import numpy as np
import pytest

from minipeft import amp, engine
from minipeft import functional as F
from minipeft.data import lm_batches
from minipeft.engine import Tensor
from minipeft.gpt import GPT, GPTConfig
from minipeft.train import TrainConfig, train

r16 = lambda a: amp.round_to_compute(np.asarray(a, np.float32), "float16")  # noqa: E731


def _np(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def test_check_compute_dtype():
    assert amp.check_compute_dtype(np.float16) == "float16"
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        amp.check_compute_dtype("float8")
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        with amp.autocast("int8"):
            pass


def test_autocast_is_scoped_and_only_touches_float32():
    x32, x64 = np.ones(2, np.float32), np.ones(2, np.float64)
    assert amp.autocast_dtype(x32) is None
    with amp.autocast("float16"):
        assert amp.autocast_dtype(x32) == "float16"
        assert amp.autocast_dtype(x32, x64) is None  # float64 gradient checks are never touched
        with amp.autocast(enabled=False):
            assert amp.autocast_dtype(x32) is None
        with amp.autocast("bfloat16"):
            assert amp.autocast_dtype(x32) == "bfloat16"
        assert amp.autocast_dtype(x32) == "float16"
    assert amp.autocast_dtype(x32) is None


@pytest.mark.parametrize("compute_dtype,out", [("float16", 16), ("bfloat16", 16), ("float16", 13)])
def test_linear_under_autocast_is_the_16bit_formula_forward_and_backward(xp, to_xp, compute_dtype, out):
    """out = 13: W and the gradient are zero-padded to 16 rows/columns inside; same numbers."""
    rng = np.random.default_rng(0)
    x0, w0, b0 = (rng.normal(size=s).astype(np.float32) for s in ((2, 5, 24), (out, 24), (out,)))
    g0 = rng.normal(size=(2, 5, out)).astype(np.float32)
    x, w, b = (Tensor(to_xp(a), requires_grad=True) for a in (x0, w0, b0))
    with amp.autocast(compute_dtype):
        y = F.linear(x, w, b)
    y.backward(to_xp(g0))
    r = lambda a: amp.round_to_compute(np.asarray(a, np.float32), compute_dtype)  # noqa: E731
    # operands rounded, float32 sums (kept in float32); the bias added in float32
    np.testing.assert_allclose(_np(y.data), r(x0) @ r(w0).T + b0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(x.grad), r(g0) @ r(w0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(w.grad), r(g0).reshape(-1, out).T @ r(x0).reshape(-1, 24), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(_np(b.grad), g0.sum(axis=(0, 1)), rtol=1e-5)
    assert y.dtype == x.grad.dtype == w.grad.dtype == np.float32  # float32 out, float32 master gradients
    assert y.shape == (2, 5, out) and w.grad.shape == (out, 24) and y.data.flags.c_contiguous
    eps = 2.0 ** -8 if compute_dtype == "float16" else 2.0 ** -5
    y32 = x0 @ w0.T + b0
    np.testing.assert_allclose(_np(y.data), y32, rtol=eps, atol=eps * np.abs(y32).max())
    assert not np.array_equal(_np(y.data), y32)  # it did run in 16 bits


@pytest.mark.parametrize("compute_dtype,out", [("bfloat16", 13), ("float16", 16)])
def test_a_layer_read_in_16_bits_rounds_its_product_once(xp, to_xp, compute_dtype, out):
    """nn.Linear.output_16bit (GPT's lm_head): under autocast x W^T + b is rounded once to the compute dtype, the
    (..., out) view of the padded product (16-bit arrays on the GPU, float32 values on the grid on the CPU); its
    backward is AmpLinear's, on a 16-bit gradient too. Outside autocast it is F.linear."""
    from minipeft.nn import Linear

    rng = np.random.default_rng(5)
    x0, w0, b0 = (rng.normal(size=s).astype(np.float32) for s in ((2, 5, 24), (out, 24), (out,)))
    r = lambda a: amp.round_to_compute(np.asarray(a, np.float32), compute_dtype)  # noqa: E731
    g0 = r(rng.normal(size=(2, 5, out)))  # a gradient on the 16-bit grid: the same in either backward
    lin = Linear.from_weight(Tensor(to_xp(w0), requires_grad=True), Tensor(to_xp(b0), requires_grad=True))
    lin.output_16bit = True
    x = Tensor(to_xp(x0), requires_grad=True)
    np.testing.assert_array_equal(_np(lin(x).data), _np(F.linear(x, lin.weight, lin.bias).data))  # no autocast
    with amp.autocast(compute_dtype):
        y = lin(x)
    assert y._ctx.fn is amp.AmpLinearOut16 and y.shape == (2, 5, out)
    assert y.data.strides[-2] == amp.aligned(out) * y.data.itemsize  # rows of the padded product, not a copy
    if xp.__name__ == "cupy":
        assert y.dtype == amp.device_dtype(compute_dtype)
    y32 = r(x0) @ r(w0).T + b0  # float32 sums, one rounding below
    yh = _np(y.data).astype(np.float32)
    np.testing.assert_array_equal(yh, r(yh))  # on the 16-bit grid
    step = 2.0 ** (-10 if compute_dtype == "float16" else -7)
    np.testing.assert_allclose(yh, r(y32), rtol=step, atol=1e-6)  # the sums' order may flip a rounding
    y.backward(to_xp(g0))
    np.testing.assert_allclose(_np(x.grad), g0 @ r(w0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(lin.weight.grad), g0.reshape(-1, out).T @ r(x0).reshape(-1, 24), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(_np(lin.bias.grad), g0.sum(axis=(0, 1)), rtol=1e-5)
    assert x.grad.dtype == lin.weight.grad.dtype == lin.bias.grad.dtype == np.float32


@pytest.mark.parametrize("compute_dtype", ["float16", "bfloat16"])
def test_autocast_saves_16bit_operands_on_the_gpu(xp, to_xp, compute_dtype):
    leaf = Tensor(to_xp(np.ones((64, 32), np.float32)), requires_grad=True)
    w = Tensor(to_xp(np.ones((48, 32), np.float32)), requires_grad=True)
    x = leaf * 1.0  # an activation (saved bytes count activations, not the float32 weights)
    before = engine.saved_bytes()
    y = F.linear(x, w)
    full = engine.saved_bytes() - before
    with amp.autocast(compute_dtype):
        y16 = F.linear(x, w)
    cast = engine.saved_bytes() - before - full
    assert full == 64 * 32 * 4
    # the 16-bit x and the 16-bit copy of W are held for backward: float16 or bfloat16 on
    # the GPU (2 bytes, what the memory calculator counts for 16-bit activations), rounded
    # float32 values in the NumPy emulation
    assert cast == (64 * 32 + 48 * 32) * (2 if xp.__name__ == "cupy" else 4)
    del y, y16


def test_batched_matmul_stays_float32_and_attention_runs_in_16_bits_under_autocast(xp, to_xp):
    """CuPy runs batched float16 GEMMs by converting to float32 and back (a batched bfloat16 ``@`` it
    refuses): a batched matmul stays float32. Attention has its own 16-bit path
    (minipeft/kernels/amp_attention.py, tested there)."""
    rng = np.random.default_rng(1)
    q0, k0, v0 = (rng.normal(size=(2, 3, 8, 16)).astype(np.float32) for _ in range(3))
    g0 = rng.normal(size=(2, 3, 8, 16)).astype(np.float32)
    outs = {}
    for mode in ("float32", "float16", "bfloat16"):
        q, k, v = (Tensor(to_xp(a), requires_grad=True) for a in (q0, k0, v0))
        with amp.autocast(mode):
            y = F.scaled_dot_product_attention(q, k, v, causal=True)
            z = F.matmul(q, F.transpose(k, (0, 1, 3, 2)))
        (y * Tensor(to_xp(g0))).sum().backward()
        z.backward(to_xp(np.ones(z.shape, np.float32)))
        outs[mode] = [_np(t) for t in (y.data, z.data, q.grad, k.grad, v.grad)]
    for mode in ("float16", "bfloat16"):
        np.testing.assert_array_equal(outs[mode][1], outs["float32"][1])  # the batched matmul
        for i in (0, 2, 3, 4):  # attention's output and gradients: 16-bit products, float32 softmax
            a32, a16 = outs["float32"][i], outs[mode][i]
            assert not np.array_equal(a16, a32)
            tol = 2.0 ** (-8 if mode == "float16" else -5) * np.abs(a32).max()
            np.testing.assert_allclose(a16, a32, rtol=0, atol=tol)


def test_2d_matmul_under_autocast_is_the_16bit_formula(xp, to_xp):
    rng = np.random.default_rng(3)
    a0, b0, g0 = (rng.normal(size=s).astype(np.float32) for s in ((6, 20), (20, 5), (6, 5)))
    a, b = Tensor(to_xp(a0), requires_grad=True), Tensor(to_xp(b0), requires_grad=True)
    with amp.autocast("float16"):
        z = F.matmul(a, b)
    z.backward(to_xp(g0))
    np.testing.assert_allclose(_np(z.data), r16(a0) @ r16(b0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(a.grad), r16(g0) @ r16(b0).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(b.grad), r16(a0).T @ r16(g0), rtol=1e-6, atol=1e-6)


def test_float16_gradients_underflow_without_loss_scaling_and_not_with_it():
    x = Tensor(np.full((4, 8), 1e-3, np.float32), requires_grad=True)
    w = Tensor(np.full((2, 8), 1e-3, np.float32), requires_grad=True)
    tiny = np.full((4, 2), 1e-8, np.float32)  # below float16's smallest subnormal, 6e-8
    with amp.autocast("float16"):
        F.linear(x, w).backward(tiny)
    assert np.all(w.grad == 0)  # lost
    w.grad = x.grad = None
    scaler = amp.GradScaler(init_scale=2.0 ** 16)
    with amp.autocast("float16"):
        F.linear(x, w).backward(tiny * scaler.scale)
    assert not scaler.unscale_([x, w])
    np.testing.assert_allclose(w.grad, np.full((2, 8), 4e-11), rtol=2e-3)  # 4 rows x 1e-8 x 1e-3


def test_grad_scaler_unscales_exactly_and_backs_off_on_overflow():
    p = Tensor(np.zeros(3, np.float32), requires_grad=True)
    s = amp.GradScaler(init_scale=1024.0, growth_interval=2)
    p.grad = np.array([1024.0, -2048.0, 3.0], np.float32)
    assert s.unscale_([p]) is False
    np.testing.assert_array_equal(p.grad, [1.0, -2.0, 3.0 / 1024])  # a power of two: exact
    s.update(False)
    assert s.scale == 1024.0
    s.update(False)
    assert s.scale == 2048.0 and s.good_steps == 0  # grew after growth_interval clean steps
    p.grad = np.array([np.inf, 0, 0], np.float32)
    assert s.unscale_([p]) is True
    s.update(True)
    assert s.scale == 1024.0 and s.skipped_steps == 1
    p.grad = np.array([np.nan, 0, 0], np.float32)
    assert s.unscale_([p]) is True
    off = amp.GradScaler(enabled=False)
    assert off.scale == 1.0 and off.unscale_([p]) is False
    t = Tensor(np.float32(2.0), requires_grad=True)
    assert float(off.scale_loss(t).data) == 2.0 and float(s.scale_loss(t).data) == 2048.0
    with pytest.raises(ValueError, match="init_scale"):
        amp.GradScaler(init_scale=0)
    with pytest.raises(ValueError, match="growth_interval"):
        amp.GradScaler(growth_interval=0)
    s2 = amp.GradScaler()
    s2.load_state_dict(s.state_dict())
    assert s2.state_dict() == s.state_dict()


def _tiny_run(compute_dtype, steps=60):
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=32, vocab_size=64)
    model = GPT(cfg, seed=0)
    data = np.random.default_rng(0).integers(0, 8, size=4000) * 3 % 64  # a learnable pattern
    tc = TrainConfig(max_steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, progress=False,
                     compute_dtype=compute_dtype)
    return train(model, lambda rng: lm_batches(data, 8, 32, rng), config=tc)


def test_train_in_float16_follows_float32_with_master_weights():
    r32, r16 = _tiny_run("float32"), _tiny_run("float16")
    l32, l16 = np.array(r32.losses), np.array(r16.losses)
    assert l16[-1] < 0.6 * l16[0]  # it learns
    assert abs(l16[-1] - l32[-1]) < 0.03 * l32[-1]  # and tracks float32
    assert not np.array_equal(l16, l32)
    assert r16.final["skipped_steps"] == r16.skipped_steps == 0  # 2^16 never overflows here
    assert r32.final["skipped_steps"] == 0
    rb = _tiny_run("bfloat16", steps=20)
    assert np.all(np.isfinite(rb.losses)) and rb.losses[-1] < rb.losses[0]
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        TrainConfig(compute_dtype="half")


def test_train_skips_a_step_whose_scaled_gradients_overflow():
    cfg = GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=16, vocab_size=32)
    model = GPT(cfg, seed=0)
    data = np.arange(2000) % 32
    before = {n: p.data.copy() for n, p in model.named_parameters()}

    def huge_loss(m, batch):  # a loss whose scaled gradients do not fit in float16
        x, y = batch
        return m(x, targets=y).loss * 1e6

    res = train(model, lambda rng: lm_batches(data, 4, 16, rng), loss_fn=huge_loss,
                config=TrainConfig(max_steps=3, batch_size=4, progress=False, compute_dtype="float16"))
    assert res.skipped_steps >= 1
    if res.skipped_steps == 3:  # every step skipped: the weights are untouched
        for n, p in model.named_parameters():
            np.testing.assert_array_equal(p.data, before[n])


@pytest.mark.gpu
def test_gpu_float16_products_are_real_float16_gemms():
    import cupy as cp

    rng = np.random.default_rng(2)
    a0, b0 = rng.normal(size=(256, 1024)).astype(np.float32), rng.normal(size=(1024, 128)).astype(np.float32)
    a, b = amp.to_compute(cp.asarray(a0), "float16"), amp.to_compute(cp.asarray(b0), "float16")
    assert a.dtype == b.dtype == cp.float16
    from cupy._core import _routines_linalg

    assert cp._core.get_compute_type(np.float16) == _routines_linalg.COMPUTE_TYPE_FP32
    y = amp.gemm(a, b)
    assert y.dtype == cp.float32
    y = y.get()
    a16, b16 = r16(a0).astype(np.float64), r16(b0).astype(np.float64)
    ref = a16 @ b16  # exact sums of the float16 operands
    # float32 accumulation: float32's worst-case sum error, k u |a| |b| with u = 2^-24 (float16
    # sums, u = 2^-11, would be off by ~2^13 times more)
    bound = 1024 * 2.0 ** -24 * (np.abs(a16) @ np.abs(b16))
    err = np.abs(y - ref)
    assert np.all(err <= bound), f"{np.mean(err > bound):.1%} of the entries exceed the float32-sum bound"
    assert np.mean(r16(y) != y) > 0.5  # the float32 sums themselves, not rounded to float16


@pytest.mark.gpu
def test_gpu_train_in_float16_matches_the_cpu_emulation():
    import cupy as cp  # noqa: F401

    cfg = GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32, vocab_size=64)
    data = np.random.default_rng(0).integers(0, 8, size=4000) * 3 % 64
    losses = {}
    for device in ("cpu", "cuda"):
        model = GPT(cfg, seed=0).to(device)
        tc = TrainConfig(max_steps=20, batch_size=8, lr=3e-3, progress=False, compute_dtype="float16")
        losses[device] = train(model, lambda rng: lm_batches(data, 8, 32, rng), config=tc).losses
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=5e-3)
