"""The 16-bit-output layer norm (minipeft.amp_layernorm): the float32 layer norm rounded once, with the
float32 layer norm's backward and saved arrays; GPT asks for it only where a plain Linear is the one reader.

On the CPU the output is float32 values on the 16-bit grid, and a whole GPT step is bit for bit the step
without it (the Linear would have rounded the same values). On the GPU (``gpu`` tests) the kernel writes a
float16 / bfloat16 array, bit for bit the float32 kernel's output cast to 16 bits.
"""
from __future__ import annotations

import numpy as np
import pytest

from minipeft import amp, nn
from minipeft import functional as F
from minipeft import gpt as gpt_module
from minipeft.amp_layernorm import AmpLayerNormOut16, layer_norm_output_16bit
from minipeft.backend import to_numpy
from minipeft.engine import Tensor
from minipeft.gpt import GPT, GPTConfig, reads_16bit
from minipeft.peft import LoraConfig, get_peft_model, get_qlora_model

MODES = ["float16", "bfloat16"]


def _ln_inputs(xp, shape=(3, 5, 48), seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    b = (0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    return [Tensor(xp.asarray(a), requires_grad=True) for a in (x, w, b)]


def _forward_backward(fn, xp, mode, seed=0):
    """``fn(x, w, b)`` read by a Linear (its consumer), under autocast; the output and every gradient."""
    x, w, b = _ln_inputs(xp, seed=seed)
    rng = np.random.default_rng(seed + 1)
    W = Tensor(xp.asarray((0.2 * rng.standard_normal((24, x.shape[-1]))).astype(np.float32)), requires_grad=True)
    g = xp.asarray(rng.standard_normal(x.shape[:-1] + (24,)).astype(np.float32))
    with amp.autocast(mode):
        y = fn(x, w, b)
        out = F.linear(y, W)  # (..., 24) float32
    out.backward(g)
    return y.data, x.grad, w.grad, b.grad, W.grad


@pytest.mark.parametrize("mode", MODES)
def test_output_is_the_float32_layer_norm_rounded_once_and_the_backward_is_its(mode):
    y16, *g16 = _forward_backward(lambda x, w, b: layer_norm_output_16bit(x, w, b, 1e-5), np, mode)
    y32, *g32 = _forward_backward(lambda x, w, b: F.layer_norm(x, w, b, 1e-5), np, mode)
    assert y16.dtype == np.float32 and np.array_equal(y16, amp.round_to_compute(y32, mode))
    assert not np.array_equal(y16, y32)  # it did round: the values are not all on the grid already
    for a, b in zip(g16, g32):  # the rounding passes the gradient on as it is; the Linear rounds y so anyway
        assert np.array_equal(a, b)


def test_without_autocast_it_is_the_float32_layer_norm():
    x, w, b = _ln_inputs(np)
    assert np.array_equal(layer_norm_output_16bit(x, w, b).data, F.layer_norm(x, w, b).data)
    with amp.autocast("float32"):
        assert np.array_equal(layer_norm_output_16bit(x, w, b).data, F.layer_norm(x, w, b).data)


def test_only_a_plain_linear_reads_16bit():
    lin = nn.Linear(4, 3, rng=0)
    assert reads_16bit(lin)
    assert not reads_16bit(nn.LayerNorm(4)) and not reads_16bit(None)


def _model():
    return GPT(GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32), seed=0)


def _step(model, idx, mode, monkeypatch=None, **kw):
    calls = []
    inner = AmpLayerNormOut16.forward

    def counting(ctx, *args):
        calls.append(args[0].shape)
        return inner(ctx, *args)

    if monkeypatch is not None:
        monkeypatch.setattr(AmpLayerNormOut16, "forward", staticmethod(counting))
    for p in model.parameters():
        p.grad = None
    with amp.autocast(mode):
        out = model(idx, targets=idx, **kw)
    out.loss.backward()
    grads = [None if p.grad is None else to_numpy(p.grad).copy() for p in model.parameters()]
    if monkeypatch is not None:
        monkeypatch.setattr(AmpLayerNormOut16, "forward", staticmethod(inner))
    return out.loss.item(), grads, len(calls)


@pytest.mark.parametrize("mode", MODES)
def test_gpt_step_is_bit_for_bit_the_step_without_it(mode, monkeypatch):
    model = _model()
    idx = np.random.default_rng(0).integers(0, 61, (2, 12))
    loss, grads, n = _step(model, idx, mode, monkeypatch)
    assert n == 2 * 2 + 1  # ln_1 and ln_2 of both blocks, ln_f
    monkeypatch.setattr(gpt_module, "reads_16bit", lambda m: False)
    loss0, grads0, n0 = _step(model, idx, mode, monkeypatch)
    assert n0 == 0 and loss == loss0
    assert all(np.array_equal(a, b) for a, b in zip(grads, grads0))


def test_not_asked_for_a_kept_hidden_state(monkeypatch):
    idx = np.random.default_rng(1).integers(0, 61, (2, 12))
    *_, n = _step(_model(), idx, "bfloat16", monkeypatch, output_hidden_states=True)
    assert n == 4  # ln_f's output is a hidden state someone reads in float32


def _lora(dropout=0.0, qlora=False, targets=("c_attn", "c_fc", "c_proj"), device="cpu"):
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets))
    base = _model().to(device)
    return get_qlora_model(base, cfg, compute_dtype="bfloat16") if qlora else get_peft_model(base, cfg)


@pytest.mark.parametrize("qlora", [False, True])
def test_a_fused_lora_reader_gets_16bit_and_the_step_is_the_same(qlora, monkeypatch):
    """LoRA's fused op (on a Linear or QLoRA's 4-bit base) only rounds x to 16 bits, once: the layer norms
    before c_attn and c_fc write 16 bits, and the step (loss, every gradient) is the step without it."""
    idx = np.random.default_rng(1).integers(0, 61, (2, 12))
    model = _lora(qlora=qlora)
    loss, grads, n = _step(model, idx, "bfloat16", monkeypatch)
    assert n == 2 * 2 + 1
    monkeypatch.setattr(gpt_module, "reads_16bit", lambda m: False)
    loss0, grads0, n0 = _step(model, idx, "bfloat16", monkeypatch)
    assert n0 == 0 and loss == loss0
    assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(grads, grads0))


def test_not_asked_where_lora_runs_its_reference(monkeypatch):
    """Dropout in training, or MINIPEFT_KERNELS=0 (no fused op): the LoRA layer adds and drops its input in
    float32, so ln_1 and ln_2 stay float32; ln_f (read by the plain LM head) still writes 16 bits."""
    idx = np.random.default_rng(1).integers(0, 61, (2, 12))
    *_, n = _step(_lora(dropout=0.1), idx, "bfloat16", monkeypatch)
    assert n == 1
    monkeypatch.setenv("MINIPEFT_KERNELS", "0")
    *_, n = _step(_lora(), idx, "bfloat16", monkeypatch)
    assert n == 1
    monkeypatch.delenv("MINIPEFT_KERNELS")
    *_, n = _step(_lora(targets=("c_attn",)), idx, "bfloat16", monkeypatch)
    assert n == 5  # c_fc stays a plain Linear


def test_a_replaced_layer_norm_is_called_as_before():
    """Houlsby adapters train per-adapter copies of the layer norms: a wrapper that takes x alone."""
    model = _model()
    block = model.transformer.h[0]

    class Wrapped(nn.Module):
        def __init__(self, ln):
            super().__init__()
            self.ln = ln

        def forward(self, x):
            return self.ln(x)

    block.ln_1 = Wrapped(block.ln_1)
    idx = np.random.default_rng(2).integers(0, 61, (1, 8))
    with amp.autocast("float16"):
        assert np.isfinite(model(idx, targets=idx).loss.item())


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_gpu_output_is_16bit_and_the_float32_kernel_cast(mode, kernels, cp, monkeypatch):
    """The kernel (and, with MINIPEFT_KERNELS=0, the twin) writes a float16 / bfloat16 array equal, bit for
    bit, to the float32 layer norm's output cast to 16 bits; the gradients are the float32 layer norm's."""
    monkeypatch.setenv("MINIPEFT_KERNELS", kernels)
    y16, *g16 = _forward_backward(lambda x, w, b: layer_norm_output_16bit(x, w, b, 1e-5), cp, mode, seed=4)
    y32, *g32 = _forward_backward(lambda x, w, b: F.layer_norm(x, w, b, 1e-5), cp, mode, seed=4)
    assert y16.dtype == amp.device_dtype(mode)
    assert cp.array_equal(y16.view(cp.uint16), y32.astype(amp.device_dtype(mode)).view(cp.uint16))
    for a, b in zip(g16, g32):
        assert a.dtype == b.dtype == cp.float32 and cp.array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_gpt_step_casts_no_layer_norm_output_and_is_the_same_step(mode, cp, monkeypatch):
    """A GPT step on the GPU: the layer norms feed their Linears 16-bit arrays (no float32 -> 16-bit cast of
    a (B, T, C) activation is left), and the loss and every gradient are those of the step without it."""
    model = _model().to("cuda")
    idx = np.random.default_rng(5).integers(0, 61, (2, 12))
    casts = []
    inner = amp.cast_16bit

    def counting(a, dtype, n=None, axis=-1):
        casts.append(a.shape)
        return inner(a, dtype, n, axis)

    def activation_casts():  # (B, T, C) float32 activations cast to 16 bits: layer-norm outputs, c_proj inputs
        return sum(1 for s in casts if s == (2, 12, 32))

    monkeypatch.setattr(amp, "cast_16bit", counting)
    loss, grads, n = _step(model, idx, mode, monkeypatch)
    with_it = activation_casts()
    monkeypatch.setattr(gpt_module, "reads_16bit", lambda m: False)
    casts.clear()
    loss0, grads0, n0 = _step(model, idx, mode, monkeypatch)
    assert n == 5 and n0 == 0 and activation_casts() - with_it == 5  # one cast fewer per layer norm
    assert loss == loss0 and all(np.array_equal(a, b) for a, b in zip(grads, grads0))


@pytest.mark.gpu
@pytest.mark.parametrize("qlora", [False, True])
def test_gpu_fused_lora_reads_the_16bit_layer_norm_and_the_step_is_the_same(qlora, cp, monkeypatch):
    """On the GPU the fused LoRA op (on a Linear, or QLoRA's 4-bit base) takes the 16-bit layer-norm
    output as it is; the loss and every gradient are the step's without it, bit for bit."""
    idx = np.random.default_rng(6).integers(0, 61, (2, 12))
    model = _lora(qlora=qlora, device="cuda")
    loss, grads, n = _step(model, idx, "bfloat16", monkeypatch)
    monkeypatch.setattr(gpt_module, "reads_16bit", lambda m: False)
    loss0, grads0, n0 = _step(model, idx, "bfloat16", monkeypatch)
    assert n == 5 and n0 == 0 and loss == loss0
    assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(grads, grads0))
