"""Linear4bit, Linear8bitLt and quantize_model: exact forward, dequantize-again backward,
nothing saved, state-dict round trips, model bytes, and QLoRA (LoRA on a 4-bit base)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from minipeft import engine
from minipeft.engine import Tensor, no_grad
from minipeft.gpt import GPT, GPTConfig
from minipeft.nn import Linear
from minipeft.peft import LoraConfig, get_peft_model
from minipeft.quant import bits_per_parameter, dequantize_4bit, llm_int8_matmul
from minipeft.quant.modules import (Linear4bit, Linear8bitLt, model_nbytes, quantize_model,
                                    round_to_compute)
from minipeft.testing import gradcheck


def linear(n_in=96, n_out=40, seed=0, bias=True, dtype=np.float32) -> Linear:
    return Linear(n_in, n_out, bias=bias, rng=seed, dtype=dtype)


def x_in(shape, seed=1, dtype=np.float32, requires_grad=True) -> Tensor:
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype), requires_grad=requires_grad)


def tiny_gpt(seed=0) -> GPT:
    cfg = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPT(cfg, seed=seed).eval()


def batch(seed=0, B=2, T=8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 23, (B, T)), rng.integers(0, 23, (B, T))


# ------------------------------------------------------------------ Linear4bit
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_forward_is_x_times_dequantized_weight(quant_type, dq, bias):
    lin = linear(bias=bias)
    q = Linear4bit(lin, quant_type=quant_type, blocksize=64, compress_statistics=dq)
    x = x_in((3, 5, 96))
    W = dequantize_4bit(q.weight.data, q.quant_state)                  # (40, 96)
    expected = x.data @ W.T + (lin.bias.data if bias else 0)
    np.testing.assert_array_equal(q(x).data, expected)
    np.testing.assert_array_equal(q.dequantize(), W)
    assert q.weight.dtype == np.uint8 and q.weight.shape == ((96 * 40 + 1) // 2, 1)
    assert q.quant_state.nested is dq and q.in_features == 96 and q.out_features == 40
    assert 0.0 < np.abs(W - lin.weight.data).max() <= 0.17 * np.abs(lin.weight.data).max()


def test_linear4bit_backward_matches_float_reference_and_weight_gets_no_grad():
    lin = linear()
    q = Linear4bit(lin)
    x = x_in((4, 96))
    g = np.random.default_rng(5).standard_normal((4, 40)).astype(np.float32)
    q(x).backward(g)
    np.testing.assert_allclose(x.grad, g @ q.dequantize(), rtol=1e-6, atol=1e-6)
    assert [n for n, p in q.named_parameters()] == ["bias"]
    assert not any(p.requires_grad for p in q.parameters())
    assert q.bias.grad is None and q.weight.grad is None


def test_linear4bit_gradcheck_input_and_bias_float64():
    q = Linear4bit(linear(n_in=64, n_out=6, dtype=np.float64))
    q.bias.requires_grad = True                                        # e.g. peft bias="all"
    x = x_in((2, 3, 64), dtype=np.float64)
    gradcheck(lambda x, b: q(x), [x, q.bias])


def test_linear4bit_saves_nothing_for_backward():
    """The dequantized weight (and x) must not be kept between forward and backward."""
    q = Linear4bit(linear(n_in=256, n_out=128))
    x = x_in((2, 256))
    before = engine.saved_bytes()
    y = q(x)
    assert engine.saved_bytes() - before == 0 < 256 * 128 * 4          # W_deq would be 128 KiB
    (y * y).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("compute_dtype", ["float16", "bfloat16"])
def test_linear4bit_16bit_compute_rounds_operands(compute_dtype):
    lin = linear()
    q32 = Linear4bit(lin)
    q16 = Linear4bit(lin, compute_dtype=compute_dtype)
    x = x_in((4, 96))
    W = q32.dequantize()
    r = lambda a: round_to_compute(a, compute_dtype)                  # noqa: E731
    expected = r(x.data) @ r(W).T + lin.bias.data  # rounded operands, float32 sums, float32 bias (amp's)
    y16 = q16(x).data
    np.testing.assert_array_equal(y16, expected)
    assert y16.dtype == np.float32
    eps = 2.0 ** -10 if compute_dtype == "float16" else 2.0 ** -7
    np.testing.assert_allclose(y16, q32(x).data, rtol=4 * eps, atol=4 * eps)
    assert not np.array_equal(y16, q32(x).data)


def test_linear4bit_state_dict_round_trip_and_bnb_keys():
    lin = linear()
    q = Linear4bit(lin, quant_type="nf4", compress_statistics=True)
    sd = q.state_dict()
    assert set(sd) == {"bias", "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"]).decode())
    assert meta["blocksize"] == 64 and meta["quant_type"] == "nf4" and meta["shape"] == [40, 96]
    assert meta["nested_blocksize"] == 256
    other = Linear4bit(linear(seed=9), quant_type="nf4", compress_statistics=True)
    x = x_in((3, 96), requires_grad=False)
    assert not np.array_equal(other(x).data, q(x).data)
    other.load_state_dict({k: np.array(v, copy=True) for k, v in sd.items()})
    np.testing.assert_array_equal(other(x).data, q(x).data)
    fp4 = Linear4bit(linear(), quant_type="fp4", compress_statistics=False)
    with pytest.raises(ValueError, match="missing keys"):
        fp4.load_state_dict(sd)


def test_linear4bit_load_checks_shape_and_to_cpu_keeps_outputs():
    q = Linear4bit(linear(bias=False))
    with pytest.raises(ValueError, match="shape"):
        Linear4bit(linear(n_in=64, bias=False)).load_state_dict(q.state_dict())
    x = x_in((2, 96), requires_grad=False)
    before = q(x).data
    np.testing.assert_array_equal(q.to("cpu")(x).data, before)
    assert q.device == "cpu"


def test_linear4bit_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit(object())
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(linear(), quant_type="nf3")
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit(linear(), compute_dtype="float64")
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit(linear(), blocksize=48)
    with pytest.raises(ValueError, match="features"):
        Linear4bit(linear())(x_in((2, 95)))


# ------------------------------------------------------------------ Linear8bitLt
def test_linear8bitlt_close_to_float_and_equal_to_llm_int8():
    lin = linear(n_in=128, n_out=64)
    q = Linear8bitLt(lin, threshold=6.0)
    x = x_in((16, 128), requires_grad=False)
    x.data[:, [3, 70]] *= 20.0                                         # outlier feature columns
    ref = x.data @ lin.weight.data.T + lin.bias.data
    y = q(x).data
    w16 = lin.weight.data.astype(np.float16).astype(np.float32)  # Int8Params quantizes the float16 weight
    np.testing.assert_array_equal(y, llm_int8_matmul(x.data, w16, 6.0, bias=lin.bias.data))
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    plain = Linear8bitLt(lin, threshold=0.0)(x).data
    rel_plain = np.linalg.norm(plain - ref) / np.linalg.norm(ref)
    assert rel < 0.01 and rel < rel_plain / 3


def test_linear8bitlt_backward_uses_dequantized_weight_and_saves_nothing():
    lin = linear(n_in=64, n_out=32)
    q = Linear8bitLt(lin)
    x = x_in((5, 64))
    before = engine.saved_bytes()
    y = q(x)
    assert engine.saved_bytes() == before
    g = np.ones((5, 32), np.float32)
    y.backward(g)
    np.testing.assert_allclose(x.grad, g @ q.dequantize(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x.grad, g @ lin.weight.data, atol=0.05 * np.abs(x.grad).mean())
    assert not any(p.requires_grad for p in q.parameters())


def test_linear8bitlt_state_dict_round_trip():
    q = Linear8bitLt(linear())
    sd = q.state_dict()
    assert set(sd) == {"weight", "SCB", "bias"} and sd["weight"].dtype == np.int8
    other = Linear8bitLt(linear(seed=4))
    other.load_state_dict(sd)
    x = x_in((2, 96), requires_grad=False)
    np.testing.assert_array_equal(other(x).data, q(x).data)


# ------------------------------------------------------------------ quantize_model
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_model_replaces_linears_and_shrinks_bytes(bits):
    model = tiny_gpt()
    idx, tg = batch()
    with no_grad():
        ref = model(idx, tg).loss.item()
    before = model_nbytes(model)
    report = quantize_model(model, bits=bits)
    names = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                   "mlp.c_proj")]
    assert sorted(report.replaced) == sorted(names)
    kind = Linear4bit if bits == 4 else Linear8bitLt
    assert all(isinstance(model.get_submodule(n), kind) for n in names)
    assert type(model.lm_head) is Linear and model.lm_head.weight is model.transformer.wte.weight
    assert report.bytes_before == before and report.bytes_after == model_nbytes(model) < before
    n_w = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names)
    n_b = sum(model.get_submodule(n).out_features for n in names)
    assert report.linear_bytes_before == 4 * (n_w + n_b)
    assert report.linear_bytes_after < report.linear_bytes_before / (4 if bits == 4 else 3)
    with no_grad():
        loss = model(idx, tg).loss.item()
    assert abs(loss - ref) < 0.05 * ref


@pytest.mark.parametrize("dq", [False, True])
def test_held_bytes_are_bits_per_parameter(dq):
    """The bytes a Linear4bit holds are the storage arithmetic of bits_per_parameter, plus its code tables."""
    q = Linear4bit(linear(n_in=256, n_out=200, bias=False), compress_statistics=dq)
    n = 256 * 200
    tables = 16 * 4 + (256 * 4 if dq else 0)                          # NF4 code (+ the 8-bit dynamic map)
    assert model_nbytes(q) == bits_per_parameter(4, 64, dq, numel=n) * n / 8 + tables
    q8 = Linear8bitLt(linear(n_in=256, n_out=200, bias=False))
    assert model_nbytes(q8) == n + 4 * 200                             # int8 weight + one float32 absmax per row


def test_quantize_model_choice_and_errors():
    model = tiny_gpt()
    report = quantize_model(model, modules=["c_attn"], quant_type="fp4", compress_statistics=False)
    assert report.replaced == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert model.transformer.h[0].attn.c_attn.quant_type == "fp4"
    with pytest.raises(ValueError, match="match no nn.Linear"):
        quantize_model(tiny_gpt(), modules=["q_proj"])
    with pytest.raises(ValueError, match="tied"):
        quantize_model(tiny_gpt(), skip=())
    with pytest.raises(ValueError, match="bits"):
        quantize_model(tiny_gpt(), bits=3)
    with pytest.raises(TypeError, match="list"):
        quantize_model(tiny_gpt(), modules="c_attn")


def test_quantized_model_state_dict_round_trip():
    a, b = tiny_gpt(seed=0), tiny_gpt(seed=1)
    quantize_model(a)
    quantize_model(b)
    idx, _ = batch()
    with no_grad():
        assert not np.array_equal(a(idx).logits.data, b(idx).logits.data)
        b.load_state_dict(a.state_dict())
        np.testing.assert_array_equal(a(idx).logits.data, b(idx).logits.data)


# ------------------------------------------------------------------ QLoRA
def test_qlora_lora_on_linear4bit_trains_only_adapters():
    model = tiny_gpt()
    quantize_model(model, quant_type="nf4", compress_statistics=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, Linear4bit)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    np.testing.assert_array_equal(layer.base_weight(), layer.base_layer.dequantize())
    params = [p for p in peft_model.parameters() if p.requires_grad]
    idx, tg = batch(seed=3)
    losses = []
    for _ in range(5):
        peft_model.zero_grad()
        loss = peft_model(idx, tg).loss
        loss.backward()
        losses.append(loss.item())
        assert all(p.grad is not None for p in params)
        assert all(p.grad is None for p in peft_model.parameters() if not p.requires_grad)
        for p in params:
            p.data = p.data - 0.5 * p.grad
    assert losses[-1] < losses[0]
