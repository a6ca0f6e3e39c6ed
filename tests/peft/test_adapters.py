"""Houlsby and Pfeiffer bottleneck adapters: gradients, placement, init, identity, no merge, keys."""
import json

import numpy as np
import pytest

from minipeft.init import trunc_normal
from minipeft.peft import (BottleneckConfig, BottleneckLayer, HoulsbyConfig, PeftConfig, PfeifferConfig,
                           get_peft_model)
from minipeft.peft.adapters import num_adapter_parameters
from minipeft.testing import gradcheck_module

from . import batch, linear, logits, perturb, tiny_gpt, train, x_input


def bottleneck_layer(non_linearity="gelu", d=6, m=3, seed=0) -> BottleneckLayer:
    layer = BottleneckLayer(linear(5, d, seed=seed))
    cfg = BottleneckConfig(adapter_size=m, non_linearity=non_linearity, init_std=0.5)
    layer.update_layer("default", cfg, np.random.default_rng(seed))
    layer.set_adapter("default")
    return layer


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("act", ["relu", "gelu", "tanh", "swish"])
def test_bottleneck_layer_gradcheck_float64(act):
    layer = bottleneck_layer(act)
    x = x_input((2, 3, 5))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [
        "adapter_down.default.weight", "adapter_down.default.bias", "adapter_up.default.weight",
        "adapter_up.default.bias"]
    gradcheck_module(layer, lambda m: m(x), extra_inputs=[x])


@pytest.mark.parametrize("config", [HoulsbyConfig(adapter_size=1), PfeifferConfig(adapter_size=2)])
def test_model_gradcheck_float64(config):
    model = get_peft_model(tiny_gpt("float64", n_embd=8), config)
    perturb(model)
    idx, _ = batch(T=5)
    gradcheck_module(model, lambda m: m(idx).logits)


def test_forward_formula():
    layer = bottleneck_layer("tanh")
    x = x_input((4, 5), requires_grad=False)
    y = layer.base_layer(x).data
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    want = y + np.tanh(y @ down.weight.data.T + down.bias.data) @ up.weight.data.T + up.bias.data
    np.testing.assert_allclose(layer(x).data, want, rtol=1e-12)


# --------------------------------------------------------- placement and init


def test_houlsby_and_pfeiffer_placement_and_counts():
    houlsby = get_peft_model(tiny_gpt(), HoulsbyConfig(adapter_size=4))
    wrapped = sorted(n for n, m in houlsby.base_model.model.named_modules() if isinstance(m, BottleneckLayer))
    assert wrapped == [f"transformer.h.{i}.{s}.c_proj" for i in range(2) for s in ("attn", "mlp")]
    trainable = {n for n, p in houlsby.named_parameters() if p.requires_grad}
    assert "base_model.model.transformer.h.0.ln_1.modules_to_save.default.weight" in trainable  # LNs train
    assert "base_model.model.transformer.ln_f.modules_to_save.default.bias" in trainable
    n_ln = 5 * 2 * 16  # ln_1, ln_2 of two blocks and ln_f: weight and bias
    assert houlsby.get_nb_trainable_parameters()[0] == 4 * num_adapter_parameters(16, 4) + n_ln
    pfeiffer = get_peft_model(tiny_gpt(), PfeifferConfig())  # reduction 16: m = 16 / 16 = 1
    wrapped = sorted(n for n, m in pfeiffer.base_model.model.named_modules() if isinstance(m, BottleneckLayer))
    assert wrapped == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert pfeiffer.get_nb_trainable_parameters()[0] == 2 * num_adapter_parameters(16, 1)
    layer = pfeiffer.base_model.model.transformer.h[0].mlp.c_proj
    assert layer.non_linearity["default"] == "relu" and layer.adapter_down["default"].weight.shape == (1, 16)
    assert num_adapter_parameters(768, 48) == 74_544  # GPT-2 small, reduction 16


def test_trunc_normal_init():
    rng = np.random.default_rng(0)
    w = trunc_normal(rng, (200, 100), std=1e-2)
    assert np.abs(w).max() <= 2e-2 and abs(w.mean()) < 1e-4
    assert abs(w.std() / 1e-2 - 0.8796) < 0.02  # the std of N(0, 1) cut at ±2
    layer = get_peft_model(tiny_gpt(), HoulsbyConfig()).base_model.model.transformer.h[0].mlp.c_proj
    for lin in (layer.adapter_down["default"], layer.adapter_up["default"]):
        assert np.abs(lin.weight.data).max() <= 2e-2 and not lin.bias.data.any()


def test_identity_exact_with_zero_up_and_near_identity_with_trunc_normal():
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    exact = get_peft_model(base, HoulsbyConfig(init_weights="mam_adapter"))
    np.testing.assert_array_equal(logits(exact, idx), y0)
    near = get_peft_model(tiny_gpt(), HoulsbyConfig(init_std=1e-2))
    drift = np.abs(logits(near, idx) - y0).max()
    assert 0 < drift < 1e-3  # methods.md §8 target 1: small drift with a Gaussian init


def test_only_adapter_parameters_get_gradients_and_training_helps():
    model = get_peft_model(tiny_gpt(), HoulsbyConfig(adapter_size=4))
    idx, tg = batch()
    model(idx, tg).loss.backward()
    for n, p in model.named_parameters():
        mine = "adapter_" in n or "modules_to_save" in n
        assert (p.grad is not None) == mine, n
    model.zero_grad()
    losses = train(model, steps=4, lr=0.5)
    assert losses[-1] < losses[0]


def test_cannot_merge_disable_gives_base():
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = get_peft_model(base, HoulsbyConfig())
    perturb(model)
    assert np.abs(logits(model, idx) - y0).max() > 1e-3
    with model.disable_adapter():
        np.testing.assert_array_equal(logits(model, idx), y0)
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(TypeError, match="non-linear"):
        model.base_model.model.transformer.h[0].mlp.c_proj.merge()
    plain = model.unload()  # as peft: adapters removed, the trained LayerNorm copies kept
    assert type(plain.transformer.h[0].ln_1).__name__ == "LayerNorm"
    assert np.abs(plain.transformer.ln_f.bias.data).max() > 0
    pfeiffer = get_peft_model(tiny_gpt(), PfeifferConfig())
    perturb(pfeiffer)
    np.testing.assert_array_equal(logits(pfeiffer.unload(), idx), y0)


# -------------------------------------------------------------- files, configs


def test_saved_keys_and_round_trip():
    model = get_peft_model(tiny_gpt(), HoulsbyConfig(adapter_size=3))
    perturb(model)
    state = {k: v.copy() for k, v in model.peft_state_dict().items()}
    m = "base_model.model.transformer.h.1.attn.c_proj"
    assert state[f"{m}.adapter_down.weight"].shape == (3, 16) and state[f"{m}.adapter_down.bias"].shape == (3,)
    assert state[f"{m}.adapter_up.weight"].shape == (16, 3) and state[f"{m}.adapter_up.bias"].shape == (16,)
    assert state["base_model.model.transformer.h.0.ln_1.weight"].shape == (16,)
    assert state["base_model.model.transformer.ln_f.bias"].shape == (16,)
    assert len(state) == 4 * 4 + 5 * 2
    cfg = PeftConfig.from_dict(json.loads(json.dumps(model.peft_config["default"].to_dict())))
    assert isinstance(cfg, BottleneckConfig) and cfg.to_dict()["peft_type"] == "BOTTLENECK"
    fresh = get_peft_model(tiny_gpt(), cfg)
    fresh.load_peft_state_dict(state)
    idx, _ = batch()
    np.testing.assert_array_equal(logits(fresh, idx), logits(model, idx))


def test_config_sizes_and_errors():
    cfg = BottleneckConfig(reduction_factor=8)
    assert cfg.bottleneck(768) == 96 and BottleneckConfig(adapter_size=5).bottleneck(768) == 5
    with pytest.raises(ValueError, match="no bottleneck"):
        BottleneckConfig(reduction_factor=32).bottleneck(16)
    for kw, match in [({"adapter_size": 0}, "adapter_size"), ({"non_linearity": "elu"}, "non_linearity"),
                      ({"init_weights": "bert"}, "init_weights"), ({"init_std": -1}, "init_std"),
                      ({"reduction_factor": 0}, "reduction_factor")]:
        with pytest.raises(ValueError, match=match):
            BottleneckConfig(**kw)
