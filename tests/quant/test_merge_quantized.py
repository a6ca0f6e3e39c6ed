"""Merging LoRA into 4-bit and 8-bit bases (quant/requantize.py), against peft + bitsandbytes.

The fixture ``tests/fixtures/bnb_merge.safetensors`` (+ ``bnb_merge.json``) is made by
``tests/fixtures/make_bnb_merge_fixtures.py``: peft 0.21.2's bnb LoRA layers merging and
unmerging the same adapter on bitsandbytes 0.50.2 (CPU). The stored layers must be equal
byte for byte: codes, absmax, nested state and the JSON of the quant state (but for the
double-quantization offset's last bit: see ``_assert_state``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minipeft.engine import Tensor
from minipeft.nn import Linear, Module
from minipeft.peft import LoraConfig, get_peft_model
from minipeft.peft.lora import LoraLayer
from minipeft.quant.blockwise import double_quantize, quantize_4bit
from minipeft.quant.modules import Linear4bit, Linear8bitLt
from minipeft.quant.requantize import requantization_error

HERE = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE, META = HERE / "bnb_merge.safetensors", HERE / "bnb_merge.json"
PRESENT = FIXTURE.exists() and META.exists()
CASES = json.loads(META.read_text())["cases"] if PRESENT else []


@pytest.fixture(scope="module")
def fx():
    if not PRESENT:
        pytest.skip(f"{FIXTURE.name} not found: make it with `python tests/fixtures/make_bnb_merge_fixtures.py` "
                    "(torch CPU, peft 0.21.2, bitsandbytes 0.50.2)")
    from safetensors.numpy import load_file
    return load_file(str(FIXTURE))


def _base(case, W, bias):
    lin = Linear.from_weight(Tensor(W.copy()), Tensor(bias.copy()))
    if case["bits"] == 4:
        return Linear4bit(lin, quant_type=case["quant_type"], blocksize=case["blocksize"],
                          compress_statistics=case["compress_statistics"])
    return Linear8bitLt(lin, threshold=6.0)


def _lora(base, A, B, r=4, alpha=8):
    layer = LoraLayer(base)
    layer.update_layer("default", LoraConfig(r=r, lora_alpha=alpha), np.random.default_rng(0))
    layer.lora_A["default"].weight.data = A.copy()
    layer.lora_B["default"].weight.data = B.copy()
    layer.set_adapter("default")
    return layer


def _state(layer) -> dict:
    base = layer.base_layer
    if isinstance(base, Linear4bit):
        return {k: np.asarray(v) for k, v in base._extra_state().items()}
    return {"weight": base.weight.data, "SCB": base.SCB}


def _same(mine, ref, what):
    mine = np.asarray(mine).reshape(ref.shape) if np.asarray(mine).size == ref.size else np.asarray(mine)
    assert mine.dtype == ref.dtype and mine.shape == ref.shape, f"{what}: {mine.dtype}{mine.shape}"
    assert mine.tobytes() == ref.tobytes(), f"{what}: {int((mine != ref).sum())} of {ref.size} differ from bnb"


def _assert_state(layer, fx, prefix: str, quantized_from):
    """The layer's stored state equals bitsandbytes', byte for byte.

    One exception, as in test_bnb_fixtures.py: double quantization's offset is a float32
    mean whose summation order is PyTorch's, so ours may differ by an ulp. Then the offset
    must be within an ulp, and the nested state, made again from ``quantized_from`` with
    bitsandbytes' offset put in, must be equal byte for byte. And int8 codes are
    ``round(w · (127 / absmax))``: PyTorch's CPU division ``127.0 / absmax`` is not always
    correctly rounded (an ulp low), so a code at a .5 tie may differ by one on rare
    elements (CUDA's ``__fdividef`` likewise; test_bnb_fixtures.py allows 1 in 500); SCB
    must be equal.
    """
    ours = _state(layer)
    blob = next((k for k in ours if "quant_state.bitsandbytes__" in k), None)
    nested = blob is not None and layer.base_layer.compress_statistics
    if nested:
        ref_offset = np.float32(json.loads(bytes(fx[f"{prefix}.{blob}"]))["nested_offset"])
        our_offset = np.float32(layer.base_layer.quant_state.offset)
        if our_offset != ref_offset:
            assert abs(int(our_offset.view(np.int32)) - int(ref_offset.view(np.int32))) <= 1, (our_offset, ref_offset)
            q = layer.base_layer
            _, plain = quantize_4bit(quantized_from, blocksize=q.blocksize, compress_statistics=False,
                                     quant_type=q.quant_type)
            codes, _, state2 = double_quantize(plain.absmax, blocksize=256, offset=ref_offset)
            ours.update({"weight.absmax": codes, "weight.nested_absmax": state2.absmax})
            ours.pop(blob)
    for key, mine in ours.items():
        ref = fx[f"{prefix}.{key}"]
        if isinstance(layer.base_layer, Linear8bitLt) and key == "weight":  # int8 codes: see the docstring
            off = np.abs(mine.astype(np.int16) - ref.astype(np.int16))
            assert mine.shape == ref.shape and off.max() <= 1 and np.count_nonzero(off) <= ref.size / 500, prefix
            continue
        _same(mine, ref, f"{prefix}.{key}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["key"])
def test_merge_and_unmerge_bytes_equal_peft_bitsandbytes(case, fx):
    name = case["key"]
    layer = _lora(_base(case, fx["in.W"], fx["in.bias"]), fx["in.A"], fx["in.B"], case["r"], case["lora_alpha"])
    delta = layer.get_delta_weight("default").data                   # (out, in) s·B·A, exact here
    _assert_state(layer, fx, f"{name}.base", fx["in.W"])
    merged_from = layer.base_weight() + delta
    layer.merge()
    _assert_state(layer, fx, f"{name}.merged", merged_from)
    same = (layer.base_layer.weight.data == fx[f"{name}.merged.weight"]) if case["bits"] == 8 else ...  # int8 ties
    np.testing.assert_array_equal(layer.base_layer.dequantize(np.float32)[same], fx[f"{name}.merged.dequant"][same])
    if case["bits"] == 8:  # unmerge from bitsandbytes' merged codes (not ours, which may differ at a tie)
        layer.base_layer._load_extra_state({k: fx[f"{name}.merged.{k}"] for k in ("weight", "SCB")})
    unmerged_from = layer.base_weight() - delta
    layer.unmerge()
    _assert_state(layer, fx, f"{name}.unmerged", unmerged_from)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_rounding_is_reported_and_bounded(bits):
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((48, 64)) * 0.05).astype(np.float32)
    case = {"bits": bits, "quant_type": "nf4", "blocksize": 64, "compress_statistics": True}
    layer = _lora(_base(case, W, np.zeros(48, np.float32)),
                  (rng.standard_normal((4, 64)) * 0.1).astype(np.float32),
                  (rng.standard_normal((48, 4)) * 0.1).astype(np.float32))
    exact = layer.base_weight() + layer.get_delta_weight("default").data  # (out, in) the sum, unrounded
    predicted = requantization_error(layer.base_layer, exact)
    x = Tensor(rng.standard_normal((3, 64)).astype(np.float32))
    unmerged = layer(x).data
    layer.merge()
    stored = layer.base_layer.dequantize(np.float32)
    assert layer.merge_rounding == predicted == float(np.abs(stored - exact).max()) > 0
    step = np.abs(exact).max() * (0.5 if bits == 4 else 1 / 127)  # bound on one weight's rounding
    assert layer.merge_rounding <= step
    if bits == 8:  # LLM.int8() also quantizes x in forward: no exact product to compare with
        return
    # the merged layer computes with the rounded sum: x · stored^T
    merged = layer(x).data
    np.testing.assert_allclose(merged, x.data @ stored.T, rtol=1e-5, atol=1e-6)
    assert np.abs(merged - unmerged).max() <= np.abs(x.data).sum(axis=1).max() * layer.merge_rounding * 1.01


def test_merge_and_unload_leaves_a_quantized_model():
    class Two(Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(1)
            self.proj = Linear4bit(Linear.from_weight(Tensor((rng.standard_normal((32, 64)) * 0.05)
                                                             .astype(np.float32))))

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Two(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                             init_lora_weights=False))
    x = Tensor(np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32))
    before = model(x).data
    lora = next(m for m in model.modules() if isinstance(m, LoraLayer))
    rounding = requantization_error(lora.base_layer, lora.base_weight() + lora.get_delta_weight("default").data)
    plain = model.merge_and_unload()
    assert isinstance(plain.proj, Linear4bit)
    # each output moves by at most sum_j |x_j| times the largest weight change
    assert np.abs(plain(x).data - before).max() <= np.abs(x.data).sum(axis=1).max() * rounding * 1.01


def test_bad_weights_are_refused_before_storing():
    layer = _base({"bits": 4, "quant_type": "nf4", "blocksize": 64, "compress_statistics": True},
                  np.ones((8, 64), np.float32), np.zeros(8, np.float32))
    codes = layer.weight.data.copy()
    with pytest.raises(ValueError, match="holds NaN or inf; nothing was stored"):
        layer.requantize(np.full((8, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"state is for a weight of shape \(64, 8\)"):
        layer.requantize(np.ones((64, 8), np.float32))
    with pytest.raises(TypeError, match="must be a float array"):
        layer.requantize(np.ones((8, 64), np.int32))
    np.testing.assert_array_equal(layer.weight.data, codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_on_either_backend_stores_the_same_codes(bits, xp):
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((32, 64)) * 0.05).astype(np.float32)
    A = (rng.integers(-8, 9, (4, 64)) / 64).astype(np.float32)
    B = (rng.integers(-8, 9, (32, 4)) / 64).astype(np.float32)
    case = {"bits": bits, "quant_type": "nf4", "blocksize": 64, "compress_statistics": True}
    layers = [_lora(_base(case, W, np.zeros(32, np.float32)), A, B) for _ in range(2)]
    if xp is not np:
        layers[1].to("cuda")
    for layer in layers:
        layer.merge()
    ref, got = (np.asarray(_host(layer.base_layer.weight.data)) for layer in layers)
    np.testing.assert_array_equal(got, ref)
    assert layers[1].merge_rounding == pytest.approx(layers[0].merge_rounding, rel=1e-6)


def _host(a):
    return a.get() if hasattr(a, "get") else a
