"""LoRA, rsLoRA, DoRA: gradients, identity at init, merge/unmerge, init, errors, weighted adapters."""
import math

import numpy as np
import pytest

from minipeft import functional as F
from minipeft.engine import Tensor
from minipeft.peft import LoraConfig, LoraLayer, get_peft_model
from minipeft.testing import gradcheck_module

from . import base_weights, batch, linear, logits, perturb, tiny_gpt, train, x_input


def lora_layer(n_in=5, n_out=7, r=3, seed=0, **kw) -> LoraLayer:
    layer = LoraLayer(linear(n_in, n_out, seed=seed))
    layer.update_layer("default", LoraConfig(r=r, **kw), np.random.default_rng(seed))
    layer.set_adapter("default")
    return layer


# ----------------------------------------------------------------- gradients


def test_lora_layer_gradcheck_float64():
    layer = lora_layer()
    layer.lora_B["default"].weight.data = np.random.default_rng(2).standard_normal((7, 3))  # B != 0: A gets a gradient
    x = x_input((2, 4, 5))
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert names == ["lora_A.default.weight", "lora_B.default.weight"]
    gradcheck_module(layer, lambda m: m(x), extra_inputs=[x])


def test_dora_gradcheck_magnitude_and_input():
    layer = lora_layer(use_dora=True)
    layer.lora_B["default"].weight.data = np.random.default_rng(2).standard_normal((7, 3))
    layer.lora_magnitude_vector["default"].data = 1.0 + np.random.default_rng(3).random(7)
    x = x_input((3, 5))
    # the norm ||W0 + sBA|| is a constant in backward (DoRA §4.3): freeze its value so the
    # finite differences see the same function the engine differentiates
    norm = layer.dora_weight_norm("default").copy()
    layer.dora_weight_norm = lambda adapter: norm
    gradcheck_module(layer, lambda m: m(x), extra_inputs=[x])


def test_dora_norm_gets_no_gradient():
    """With the norm live, dL/dB differs from finite differences: the norm is detached, as in peft."""
    layer = lora_layer(use_dora=True)
    layer.lora_B["default"].weight.data = np.random.default_rng(2).standard_normal((7, 3))
    x = x_input((3, 5), requires_grad=False)
    with pytest.raises(AssertionError, match="lora_[AB]"):
        gradcheck_module(layer, lambda m: m(x))


def test_only_lora_parameters_get_gradients():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    idx, tg = batch()
    model(idx, tg).loss.backward()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n


# ----------------------------------------------------------- identity at init


@pytest.mark.parametrize("kw", [{}, {"init_lora_weights": "gaussian"}, {"use_rslora": True},
                                {"use_dora": True}, {"lora_dropout": 0.1}])
def test_identity_at_init_is_exact(kw):
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], **kw))
    np.testing.assert_array_equal(logits(model, idx), y0)


def test_init_distributions_and_seed():
    layer = lora_layer(n_in=400, n_out=300, r=64)
    a, b = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / ((1 + 5) in)) = 1/sqrt(in)
    assert a.shape == (64, 400) and b.shape == (300, 64) and a.dtype == np.float64
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.02 * bound and not b.any()
    g = lora_layer(n_in=400, n_out=300, r=64, init_lora_weights="gaussian").lora_A["default"].weight.data
    assert abs(g.std() - 1 / 64) < 0.01 / 64 and abs(g.mean()) < 1e-3
    rb = lora_layer(r=3, init_lora_weights=False).lora_B["default"].weight.data
    assert rb.any() and np.abs(rb).max() <= 1 / math.sqrt(3)  # False: B random (debug only)
    np.testing.assert_array_equal(lora_layer(seed=4).lora_A["default"].weight.data,
                                  lora_layer(seed=4).lora_A["default"].weight.data)


def test_seed_gives_same_adapter_and_layers_differ():
    def a_of(seed, name="transformer.h.0.attn.c_attn"):
        m = get_peft_model(tiny_gpt(), LoraConfig(r=2, seed=seed))
        return m.base_model.model.get_submodule(name).lora_A["default"].weight.data
    np.testing.assert_array_equal(a_of(0), a_of(0))
    assert not np.array_equal(a_of(0), a_of(1))
    assert not np.array_equal(a_of(0), a_of(0, "transformer.h.1.attn.c_attn"))


def test_scaling_lora_and_rslora():
    assert lora_layer(r=4, lora_alpha=8).scaling["default"] == 2.0
    assert lora_layer(n_in=32, n_out=32, r=16, lora_alpha=8, use_rslora=True).scaling["default"] == 2.0  # 8/sqrt(16)
    assert lora_layer(n_in=32, n_out=32, r=16, lora_alpha=8).scaling["default"] == 0.5


def test_forward_formula_and_delta_weight():
    layer = lora_layer(lora_alpha=6)
    layer.lora_B["default"].weight.data = np.random.default_rng(2).standard_normal((7, 3))
    x = x_input((4, 5), requires_grad=False)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    want = x.data @ base.weight.data.T + base.bias.data + 2.0 * (x.data @ A.T) @ B.T
    np.testing.assert_allclose(layer(x).data, want, rtol=1e-12)
    np.testing.assert_allclose(layer.get_delta_weight("default").data, 2.0 * B @ A, rtol=1e-12)


# ----------------------------------------------------------- merge / unmerge


def test_train_then_merged_equals_unmerged_and_unmerge_restores():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"]))
    w0 = base_weights(model)
    losses = train(model, steps=4)
    assert losses[-1] < losses[0]
    assert model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight.data.any()
    idx, _ = batch(seed=7)
    y = logits(model, idx)
    model.merge_adapter()
    np.testing.assert_allclose(logits(model, idx), y, atol=1e-5)
    assert not np.array_equal(base_weights(model)["base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"],
                              w0["base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"])
    model.unmerge_adapter()
    for n, w in base_weights(model).items():
        np.testing.assert_allclose(w, w0[n], atol=1e-6, err_msg=n)
    np.testing.assert_allclose(logits(model, idx), y, atol=1e-6)


def test_dora_magnitude_init_merge_unmerge():
    base = tiny_gpt()
    w = base.transformer.h[1].attn.c_attn.weight.data.copy()
    model = get_peft_model(base, LoraConfig(r=4, use_dora=True))
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    m = layer.lora_magnitude_vector["default"].data
    np.testing.assert_allclose(m, np.linalg.norm(w, axis=1), rtol=1e-6)  # ||W0|| per output row
    assert m.shape == (48,)
    perturb(model)
    idx, _ = batch()
    y = logits(model, idx)
    w0 = base_weights(model)
    model.merge_adapter()
    np.testing.assert_allclose(logits(model, idx), y, atol=1e-5)
    model.unmerge_adapter()
    for n, v in base_weights(model).items():
        np.testing.assert_allclose(v, w0[n], atol=1e-6, err_msg=n)


def test_dora_forward_formula():
    layer = lora_layer(use_dora=True, lora_alpha=6)
    rng = np.random.default_rng(5)
    layer.lora_B["default"].weight.data = rng.standard_normal((7, 3))
    layer.lora_magnitude_vector["default"].data = 1 + rng.random(7)
    x = x_input((4, 5), requires_grad=False).data
    W, b = layer.base_layer.weight.data, layer.base_layer.bias.data
    A, B, m = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data, \
        layer.lora_magnitude_vector["default"].data
    Wp = W + 2.0 * B @ A
    want = x @ (m[:, None] * Wp / np.linalg.norm(Wp, axis=1, keepdims=True)).T + b  # W' = m (W0 + ΔV)/||.||_c
    np.testing.assert_allclose(layer(Tensor(x)).data, want, rtol=1e-10)


def test_dropout_only_in_training():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=4, lora_dropout=0.5))
    perturb(model)
    idx, _ = batch()
    y_eval = logits(model, idx)
    model.train()
    assert not np.allclose(logits(model, idx), y_eval)
    model.eval()
    np.testing.assert_array_equal(logits(model, idx), y_eval)


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, match", [
    ({"r": 0}, "positive integer"), ({"r": -2}, "positive integer"), ({"r": 2.5}, "positive integer"),
    ({"bias": "some"}, "bias"), ({"init_lora_weights": "eva"}, "init_lora_weights"),
    ({"lora_dropout": 1.0}, r"\[0, 1\)"), ({"target_modules": 3}, "target_modules"),
    ({"target_modules": "(unclosed"}, "regular expression"), ({"loftq_config": {"bits": 4}}, "loftq"),
    ({"layers_pattern": "h"}, "layers_to_transform"),
])
def test_config_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LoraConfig(**kw)


def test_rank_larger_than_layer_is_an_error():
    with pytest.raises(ValueError, match=r"r=17 .*min\(in=16"):
        get_peft_model(tiny_gpt(), LoraConfig(r=17))
    with pytest.raises(ValueError, match="min"):
        lora_layer(n_in=5, n_out=7, r=6)


# --------------------------------------------------------- weighted adapters


def two_adapters():
    model = get_peft_model(tiny_gpt(), LoraConfig(r=4, lora_alpha=8), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"]))
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        for t in model.adapter_state_dict(name).values():
            t.data = rng.standard_normal(t.shape).astype(t.dtype)
    return model


def test_add_weighted_adapter_cat_is_weighted_sum_of_deltas():
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type="cat")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.r["ab"] == 8 and layer.scaling["ab"] == 1.0
    want = 0.7 * layer.get_delta_weight("a").data - 0.4 * layer.get_delta_weight("b").data
    np.testing.assert_allclose(layer.get_delta_weight("ab").data, want, rtol=1e-5, atol=1e-6)
    fc = model.base_model.model.transformer.h[0].mlp.c_fc  # only "b" is there
    np.testing.assert_allclose(fc.get_delta_weight("ab").data[:, :], -0.4 * fc.get_delta_weight("b").data, atol=1e-6)
    assert not model.adapter_state_dict("ab")["base_model.model.transformer.h.0.attn.c_attn.lora_A.ab.weight"] \
        .requires_grad  # a new adapter starts frozen
    assert model.peft_config["ab"].target_modules == ["c_attn", "c_fc"]


def test_add_weighted_adapter_linear_follows_peft():
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "ab", combination_type="linear")
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    sa, sb = math.sqrt(0.7 * layer.scaling["a"]), math.sqrt(0.4 * layer.scaling["b"])
    A = sa * layer.lora_A["a"].weight.data + sb * layer.lora_A["b"].weight.data
    B = sa * layer.lora_B["a"].weight.data + sb * layer.lora_B["b"].weight.data
    np.testing.assert_allclose(layer.get_delta_weight("ab").data, B @ A, rtol=1e-5, atol=1e-5)
    single = two_adapters()
    single.add_weighted_adapter(["a"], [0.3], "a3", combination_type="linear")  # one adapter: exactly w·ΔW
    lay = single.base_model.model.transformer.h[1].attn.c_attn
    np.testing.assert_allclose(lay.get_delta_weight("a3").data, 0.3 * lay.get_delta_weight("a").data, atol=1e-6)
    single.add_weighted_adapter(["a", "b"], [0.5, -1.0], "neg", combination_type="linear")  # peft: sign on A only
    ra, rb = math.sqrt(0.5 * lay.scaling["a"]), math.sqrt(1.0 * lay.scaling["b"])
    A = ra * lay.lora_A["a"].weight.data - rb * lay.lora_A["b"].weight.data
    B = ra * lay.lora_B["a"].weight.data + rb * lay.lora_B["b"].weight.data
    np.testing.assert_allclose(lay.get_delta_weight("neg").data, B @ A, rtol=1e-5, atol=1e-5)


def test_add_weighted_adapter_svd_and_errors():
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "s", combination_type="svd", svd_rank=8)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    want = layer.get_delta_weight("a").data + layer.get_delta_weight("b").data  # rank 8: kept exactly
    np.testing.assert_allclose(layer.get_delta_weight("s").data, want, atol=1e-4)
    model.add_adapter("c", LoraConfig(r=2))
    with pytest.raises(ValueError, match="equal ranks"):
        model.add_weighted_adapter(["a", "c"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "s", combination_type="cat")
    with pytest.raises(ValueError, match="unknown adapters"):
        model.add_weighted_adapter(["a", "zz"], [1, 1], "y", combination_type="cat")
    with pytest.raises(ValueError, match="combination_type"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "y", combination_type="average")
    # the combined adapter is usable: activating it changes the output as its delta says
    model.set_adapter("s")
    idx, _ = batch()
    y = logits(model, idx)
    model.merge_adapter()
    np.testing.assert_allclose(logits(model, idx), y, atol=1e-5)


def test_lora_uses_engine_ops_and_skips_frozen_weight_grad():
    layer = lora_layer()
    x = x_input((2, 5))
    out = layer(x)
    F.sum(out).backward()
    assert layer.base_layer.weight.grad is None and x.grad is not None
