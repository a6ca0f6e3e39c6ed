"""VeRA: shared seeded projections, b = 0 / d = 0.1, identity at init, gradients, merge/unmerge."""
import math

import numpy as np
import pytest

from minipeft.peft import VeraConfig, get_peft_model
from minipeft.testing import gradcheck_module

from . import base_weights, batch, logits, perturb, tiny_gpt, train, x_input

TARGETS = ["c_attn", "c_fc"]


def vera_model(**kw):
    return get_peft_model(tiny_gpt(**kw.pop("gpt", {})), VeraConfig(**{"r": 8, "target_modules": TARGETS, **kw}))


def test_projections_shared_seeded_and_sized_for_the_largest_layer():
    model = vera_model(projection_prng_key=3)
    tuner = model.base_model
    A, B = tuner.vera_A["default"].data, tuner.vera_B["default"].data
    assert A.shape == (8, 16) and B.shape == (64, 8)  # max in = 16, max out = 64 (c_fc)
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(A, rng.uniform(-math.sqrt(6 / 16), math.sqrt(6 / 16), (8, 16)).astype(np.float32))
    np.testing.assert_array_equal(B, rng.uniform(-math.sqrt(6 / 8), math.sqrt(6 / 8), (64, 8)).astype(np.float32))
    layers = [model.base_model.model.transformer.h[i].attn.c_attn for i in (0, 1)]
    assert layers[0]._vera_A is layers[1]._vera_A is tuner.vera_A  # one pair for every layer
    assert not any("vera_A" in n for n, _ in model.named_parameters())  # frozen buffers, not parameters
    assert "base_model.vera_A.default" in model.state_dict()
    again = vera_model(projection_prng_key=3)
    np.testing.assert_array_equal(again.base_model.vera_A["default"].data, A)


def test_init_identity_and_trainable_count():
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = get_peft_model(base, VeraConfig(r=8, target_modules=TARGETS))
    np.testing.assert_array_equal(logits(model, idx), y0)
    layer = model.base_model.model.transformer.h[0].mlp.c_fc
    assert not layer.vera_lambda_b["default"].data.any()
    np.testing.assert_array_equal(layer.vera_lambda_d["default"].data, np.full(8, 0.1, np.float32))
    assert model.get_nb_trainable_parameters()[0] == 2 * ((48 + 8) + (64 + 8))  # out + r per layer


def test_forward_delta_and_gradcheck_float64():
    model = vera_model(gpt={"dtype": "float64"})
    perturb(model)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    x = x_input((3, 16))
    A = model.base_model.vera_A["default"].data[:, :16]
    B = model.base_model.vera_B["default"].data[:48]
    b, d = layer.vera_lambda_b["default"].data, layer.vera_lambda_d["default"].data
    delta = b[:, None] * (B * d[None, :]) @ A
    np.testing.assert_allclose(layer.get_delta_weight("default").data, delta, rtol=1e-12)
    np.testing.assert_allclose(layer(x).data, layer.base_layer(x).data + x.data @ delta.T, rtol=1e-10)
    gradcheck_module(layer, lambda m: m(x), extra_inputs=[x])


def test_train_merge_unmerge_and_saved_keys():
    model = vera_model()
    w0 = base_weights(model)
    losses = train(model, steps=3, lr=0.5)
    assert losses[-1] < losses[0]
    idx, _ = batch(seed=5)
    y = logits(model, idx)
    model.merge_adapter()
    np.testing.assert_allclose(logits(model, idx), y, atol=1e-5)
    model.unmerge_adapter()
    for n, w in base_weights(model).items():
        np.testing.assert_allclose(w, w0[n], atol=1e-6, err_msg=n)
    keys = list(model.peft_state_dict())
    assert "base_model.vera_A" in keys and "base_model.vera_B" in keys
    assert "base_model.model.transformer.h.0.attn.c_attn.vera_lambda_b" in keys
    assert "base_model.vera_A" not in vera_model(save_projection=False).peft_state_dict()


def test_second_adapter_reuses_projections_and_key_must_match():
    model = vera_model()
    model.add_adapter("other", VeraConfig(r=8, target_modules=TARGETS))
    assert model.base_model.vera_A["other"] is model.base_model.vera_A["default"]
    with pytest.raises(ValueError, match="projection_prng_key"):
        model.add_adapter("x", VeraConfig(r=8, projection_prng_key=1, target_modules=TARGETS))
    with pytest.raises(ValueError, match="too small"):
        model.add_adapter("y", VeraConfig(r=16, target_modules=TARGETS))
    assert "y" not in model.peft_config and "y" not in model.base_model.vera_A  # rolled back
    assert all("y" not in m.vera_lambda_b for m in model.modules() if hasattr(m, "vera_lambda_b"))


def test_rank_may_exceed_layer_width_and_errors():
    model = vera_model(r=100)  # VeRA's r is the shared projection's rank, often > the layer width
    assert model.base_model.vera_A["default"].shape == (100, 16)
    with pytest.raises(ValueError, match="exclude_modules"):
        VeraConfig(exclude_modules=["c_fc"])
    with pytest.raises(ValueError, match="bias"):
        VeraConfig(bias="lora_only")
