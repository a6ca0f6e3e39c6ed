"""minipeft.fast: the one registry of fast paths, consulted in one place, with one switch.

A fast path is tested here with a stand-in that runs on the CPU (a Function registered for
float64 arrays); the real ones (CUDA kernels) are checked against their twins by the
``gpu`` tests in ``tests/kernels``.
"""
import numpy as np
import pytest

from minipeft import amp, fast
from minipeft import functional as F
from minipeft.engine import Function, Tensor
from minipeft.ops.attention import Attention
from minipeft.ops.linalg import Linear, MatMul
from minipeft.ops.loss import CrossEntropy
from minipeft.ops.norm_act import GELU, LayerNorm
from minipeft.optim.core import adamw_update
from minipeft.quant import blockwise, int8


class Square(Function):
    """The reference: x * x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (2 * x * g,)


class MarkedSquare(Square):
    """A 'fast path' that computes the same and leaves a mark in its output and gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x + 1000

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (2 * x * g + 1000,)


def _float64(x) -> bool:
    return x.dtype == np.float64


@pytest.fixture
def marked():
    path = fast.register(Square, MarkedSquare, when=_float64)
    yield path
    fast.unregister(path)


def test_function_apply_runs_the_registered_path_forward_and_backward(marked, monkeypatch):
    monkeypatch.delenv("MINIPEFT_KERNELS", raising=False)
    x64 = Tensor(np.full(3, 2.0), requires_grad=True)
    y = Square.apply(x64)
    assert y._ctx.fn is MarkedSquare  # the graph records the Function that ran: its backward runs
    np.testing.assert_array_equal(y.data, 1004.0)
    y.sum().backward()
    np.testing.assert_array_equal(x64.grad, 1004.0)
    x32 = Tensor(np.full(3, 2.0, np.float32), requires_grad=True)
    assert Square.apply(x32)._ctx.fn is Square  # `when` says no: the reference
    assert fast.paths(Square) == [marked] and marked in fast.paths()


def test_minipeft_kernels_0_turns_every_switchable_path_off(marked, monkeypatch):
    monkeypatch.setenv("MINIPEFT_KERNELS", "0")
    assert not fast.enabled()
    y = Square.apply(Tensor(np.full(3, 2.0), requires_grad=True))
    assert y._ctx.fn is Square
    np.testing.assert_array_equal(y.data, 4.0)


def test_a_precision_path_ignores_the_switch(monkeypatch):
    path = fast.register(Square, MarkedSquare, when=_float64, switch=False)
    try:
        monkeypatch.setenv("MINIPEFT_KERNELS", "0")
        assert fast.choose(Square, np.ones(2)) is MarkedSquare
    finally:
        fast.unregister(path)
    assert fast.choose(Square, np.ones(2)) is Square


def test_dispatch_and_call_for_plain_functions(monkeypatch):
    monkeypatch.delenv("MINIPEFT_KERNELS", raising=False)

    @fast.dispatch
    def double(a, scale=1):
        """The reference."""
        return 2 * a * scale

    def fast_double(a, scale=1):
        return np.full_like(a, -1)

    assert double.__doc__ == "The reference." and double(np.ones(2)).tolist() == [2.0, 2.0]
    fast.register(double, fast_double, when=lambda a, scale=1: a.dtype == np.float64)
    assert double(np.ones(2), scale=3).tolist() == [-1.0, -1.0]
    assert double(np.ones(2, np.float32), scale=3).tolist() == [6.0, 6.0]
    assert fast.call(double, np.ones(2)).tolist() == [-1.0, -1.0]
    assert fast.call(double, np.ones(2), allow_fast=False).tolist() == [2.0, 2.0]  # a per-caller override
    monkeypatch.setenv("MINIPEFT_KERNELS", "0")
    assert double(np.ones(2)).tolist() == [2.0, 2.0]  # ... and the switch wins over the registry


def test_register_checks_when():
    with pytest.raises(TypeError, match="when must be a function of the op's arguments"):
        fast.register(Square, MarkedSquare, when=True)
    with pytest.raises(ValueError, match="is not registered"):
        fast.unregister(fast.FastPath(Square, MarkedSquare, _float64))


def test_numpy_arrays_never_reach_a_gpu_kernel():
    """Every kernel registered by minipeft.kernels declines NumPy arrays: the CPU runs the reference."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w, c = rng.standard_normal((4, 8)).astype(np.float32), np.ones(8, np.float32)
    q = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    calls = [(GELU, (x,)), (LayerNorm, (x, c, c, 1e-5)), (Linear, (x, w)), (Linear, (x, w, w[:, 0])),
             (CrossEntropy, (x[0], np.zeros(3, np.int64), -100, 0.0)), (Attention, (q, q, q, True, None, 0.5)),
             (adamw_update, (c, c, c.copy(), c.copy(), 1, 1e-3, (0.9, 0.999), 1e-8, 0.0)),
             (blockwise.quantize_4bit, (x,)), (blockwise.quantize_blockwise, (x,)),
             (int8.int8_vectorwise_quant, (x,)), (amp.cast_16bit, (x, np.float16)),
             (amp.matmul_16bit, (x[0].astype(np.float16), x[0].T.astype(np.float16))),
             (amp.matmul_16bit_bias, (x[0].astype(np.float16), x[0].T.astype(np.float16), np.zeros(3, np.float32)))]
    for reference, args in calls:
        assert fast.paths(reference), f"{reference.__name__} has no registered fast path"
        assert fast.choose(reference, *args) is reference, reference.__name__


def test_autocast_chooses_the_16bit_functions_even_with_kernels_off(monkeypatch):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    assert fast.choose(Linear, x, w) is Linear and fast.choose(MatMul, x, w.T) is MatMul
    monkeypatch.setenv("MINIPEFT_KERNELS", "0")  # autocast asks for other numbers: not a kernel switch
    with amp.autocast("float16"):
        assert fast.choose(Linear, x, w) is amp.AmpLinear
        assert fast.choose(MatMul, x, w.T) is amp.AmpMatMul
        assert fast.choose(MatMul, x[None], w.T[None]) is MatMul  # batched products stay float32
        y = F.linear(Tensor(x), Tensor(w))
    r = lambda a: amp.round_to_compute(a, "float16")  # noqa: E731
    np.testing.assert_allclose(y.data, r(x) @ r(w).T, rtol=1e-6, atol=1e-6)


def test_cross_entropy_backward_is_the_forwards_own():
    """The loss's graph node holds the Function that ran its forward (no guessing in backward)."""
    logits = Tensor(np.zeros((4, 5), np.float32), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([0, 1, -100, 2]))
    assert loss._ctx.fn is CrossEntropy
    loss.backward()
    np.testing.assert_allclose(logits.grad.sum(axis=1), 0.0, atol=1e-7)
