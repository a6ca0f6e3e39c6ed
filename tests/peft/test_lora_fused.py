"""The fused LoRA Function (minipeft/peft/lora_fused.py) against the reference layer (five ops).

Same forward and the same gradients (x, A, B, bias; W0 when it trains) in float32 and under a
16-bit autocast, on NumPy and (``gpu``) CuPy; chosen only where it applies.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest

from minipeft import amp, engine, fast
from minipeft.engine import Tensor
from minipeft.nn import Linear
from minipeft.quant.modules import Linear4bit
from minipeft.peft import LoraConfig, LoraLayer
from minipeft.peft.lora import lora_forward
from minipeft.peft.lora_fused import LoraLinear, fused_forward


def _layer(xp, n_in=24, n_out=13, r=4, alpha=8, four_bit=None, **kw) -> LoraLayer:
    rng = np.random.default_rng(0)
    base = Linear(n_in, n_out, rng=0)
    layer = LoraLayer(base if four_bit is None else Linear4bit(base, compute_dtype=four_bit))
    layer.update_layer("default", LoraConfig(r=r, lora_alpha=alpha, **kw), rng)
    layer.set_adapter("default")
    layer.lora_B["default"].weight.data = rng.standard_normal((n_out, r)).astype(np.float32)  # B != 0
    layer.get_base_layer().weight.requires_grad = False  # frozen, as get_peft_model leaves it
    if four_bit is not None:
        layer.get_base_layer().bias.requires_grad = False
    return layer.to("cuda") if xp.__name__ == "cupy" else layer


def _run(layer, x0, g0, compute_dtype, xp, kernels: bool, monkeypatch):
    monkeypatch.setenv("MINIPEFT_KERNELS", "1" if kernels else "0")
    for p in layer.parameters():
        p.grad = None
    leaf = Tensor(xp.asarray(x0), requires_grad=True)
    x = leaf * 1.0  # an activation
    gc.collect()  # graphs of earlier calls release their arrays now, not during the measurement
    before = engine.saved_bytes()
    with amp.autocast(compute_dtype):
        y = layer(x)
    saved = engine.saved_bytes() - before
    fn = y._ctx.fn.__name__  # the Function that ran
    y.backward(xp.asarray(g0))
    base = layer.get_base_layer()
    got = [y.data, leaf.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    got += [base.weight.grad] if base.weight.requires_grad else []
    got += [np.full(1, saved)]  # the bytes held for backward, compared as one more output
    return fn, [np.asarray(a.get() if hasattr(a, "get") else a, np.float64) for a in got]


@pytest.mark.parametrize("compute_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("train_base", [False, True])
def test_fused_lora_gives_the_reference_numbers(xp, compute_dtype, train_base, monkeypatch):
    layer = _layer(xp)
    layer.get_base_layer().weight.requires_grad = train_base
    layer.get_base_layer().bias.requires_grad = True
    rng = np.random.default_rng(1)
    x0, g0 = rng.standard_normal((3, 5, 24)).astype(np.float32), rng.standard_normal((3, 5, 13)).astype(np.float32)
    fn_f, fused = _run(layer, x0, g0, compute_dtype, xp, True, monkeypatch)
    fn_r, ref = _run(layer, x0, g0, compute_dtype, xp, False, monkeypatch)
    assert fn_f == "LoraLinear" and fn_r != "LoraLinear"  # one op instead of the reference's five
    for i, (f, r) in enumerate(zip(fused[:-1], ref[:-1])):
        # float32: the same products up to sum order; 16-bit: a sum order can flip one rounding of an operand
        tol = 1e-5 if compute_dtype == "float32" else 2.0 ** -7
        np.testing.assert_allclose(f, r, rtol=0, atol=tol * np.abs(r).max(), err_msg=f"output {i}")
    assert len(fused) == (6 if train_base else 5)
    # the arrays held for backward: the reference's, less the scaling its Mul holds (a 0-d float32) and,
    # in 16 bits, less the zero rows its lora_A pads A with (r = 4 -> 8 rows: amp.aligned); and with a
    # trainable W0, less the reference base's own 16-bit copy of x (the fused op casts x once)
    item = 2 if xp.__name__ == "cupy" else 4
    extra = 4 + ((8 - 4) * 24 * item + (15 * 24 * item if train_base else 0) if compute_dtype != "float32" else 0)
    assert ref[-1][0] - extra == fused[-1][0] > 0


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_fused_lora_on_a_4bit_base_gives_the_reference_numbers(xp, compute_dtype, monkeypatch):
    """QLoRA: W0 dequantized in forward and backward, never held (the saved bytes are the reference's)."""
    layer = _layer(xp, n_in=64, n_out=40, four_bit="float32")  # the 4-bit layer follows the autocast
    rng = np.random.default_rng(4)
    x0, g0 = rng.standard_normal((2, 3, 64)).astype(np.float32), rng.standard_normal((2, 3, 40)).astype(np.float32)
    fn_f, fused = _run(layer, x0, g0, compute_dtype, xp, True, monkeypatch)
    fn_r, ref = _run(layer, x0, g0, compute_dtype, xp, False, monkeypatch)
    assert fn_f == "LoraLinear" and fn_r != "LoraLinear"
    tol = 1e-5 if compute_dtype == "float32" else 2.0 ** -7
    for i, (f, r) in enumerate(zip(fused[:-1], ref[:-1])):
        np.testing.assert_allclose(f, r, rtol=0, atol=tol * np.abs(r).max(), err_msg=f"output {i}")
    item = 2 if xp.__name__ == "cupy" else 4
    assert ref[-1][0] - 4 - (4 * 64 * item if compute_dtype != "float32" else 0) == fused[-1][0] > 0  # as above
    mixed = _layer(np, four_bit="bfloat16")  # the 4-bit base in bfloat16, the adapter in float32: the reference
    assert fast.choose(lora_forward, mixed, Tensor(np.ones((2, 24), np.float32))) is lora_forward


def test_fused_lora_equals_the_formula_on_numpy(monkeypatch):
    """y = x W0^T + b + s (x A^T) B^T with s = alpha / r, and dL/dA, dL/dB by hand."""
    layer = _layer(np, r=4, alpha=8)  # s = 2
    rng = np.random.default_rng(2)
    x0, g0 = rng.standard_normal((6, 24)).astype(np.float32), rng.standard_normal((6, 13)).astype(np.float32)
    _, (y, gx, gA, gB, _) = _run(layer, x0, g0, "float32", np, True, monkeypatch)
    base = layer.get_base_layer()
    W, b = base.weight.data.astype(np.float64), base.bias.data.astype(np.float64)
    A = layer.lora_A["default"].weight.data.astype(np.float64)
    B = layer.lora_B["default"].weight.data.astype(np.float64)
    x, g, s = x0.astype(np.float64), g0.astype(np.float64), 2.0
    np.testing.assert_allclose(y, x @ W.T + b + s * (x @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gB, s * g.T @ (x @ A.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gA, (s * g @ B).T @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, g @ W + (s * g @ B) @ A, rtol=1e-5, atol=1e-5)


def test_the_fused_path_is_taken_only_where_it_applies():
    x = Tensor(np.ones((2, 24), np.float32))
    layer = _layer(np)
    assert fast.choose(lora_forward, layer, x) is fused_forward
    assert fast.choose(lora_forward, layer, Tensor(np.ones((2, 24)))) is lora_forward  # float64 input
    drop = _layer(np, lora_dropout=0.1)
    assert fast.choose(lora_forward, drop, x) is lora_forward  # dropout in training
    assert fast.choose(lora_forward, drop.eval(), x) is fused_forward  # no dropout in eval
    assert fast.choose(lora_forward, _layer(np, use_dora=True), x) is lora_forward
    sliced = _layer(np, n_out=12, enable_lora=[True, False, True])
    assert fast.choose(lora_forward, sliced, x) is lora_forward
    two = _layer(np)
    two.update_layer("other", LoraConfig(r=2), np.random.default_rng(3))
    two.set_adapter(["default", "other"])
    assert fast.choose(lora_forward, two, x) is lora_forward
    layer.merge()
    assert fast.choose(lora_forward, layer, x) is lora_forward
    assert LoraLinear.__name__ == "LoraLinear"
