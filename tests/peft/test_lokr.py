"""LoKr: factorization, Kronecker product, shapes, identity at init, merge/unmerge."""
import numpy as np
import pytest

from minipeft.engine import Tensor
from minipeft.peft import LoKrConfig, LoKrLayer, get_peft_model
from minipeft.peft.lokr import factorization, kron
from minipeft.testing import gradcheck, gradcheck_module

from . import base_weights, batch, linear, logits, tiny_gpt, train, x_input


def lokr_layer(n_in=6, n_out=8, r=1, seed=0, **kw) -> LoKrLayer:
    layer = LoKrLayer(linear(n_in, n_out, seed=seed))
    layer.update_layer("default", LoKrConfig(r=r, **kw), np.random.default_rng(seed))
    layer.set_adapter("default")
    return layer


def test_factorization_examples():
    assert factorization(256) == (16, 16) and factorization(128) == (8, 16)  # methods.md §5
    assert factorization(127) == (1, 127) and factorization(128, 4) == (4, 32)
    assert factorization(768) == (24, 32) and factorization(2304) == (48, 48) and factorization(3072) == (48, 64)
    assert factorization(128, 3) == (2, 64)  # 3 does not divide 128: the search stops at m <= 3


def test_kron_matches_numpy_and_gradcheck():
    rng = np.random.default_rng(0)
    a = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    b = Tensor(rng.standard_normal((4, 5)), requires_grad=True)
    np.testing.assert_array_equal(kron(a, b).data, np.kron(a.data, b.data))
    gradcheck(kron, [a, b])


@pytest.mark.parametrize("kw", [{}, {"decompose_both": True}, {"r": 4}, {"init_weights": "lycoris"}])
def test_lokr_layer_gradcheck_float64(kw):
    kw = {"r": 1, **kw}
    layer = lokr_layer(**kw)
    for _, p in layer.named_parameters():
        if p.requires_grad and not p.data.any():
            p.data = np.random.default_rng(4).standard_normal(p.shape)  # leave the zero init
    x = x_input((2, 6))
    gradcheck_module(layer, lambda m: m(x), extra_inputs=[x])


def test_shapes_follow_peft_rules():
    # c_attn of GPT-2 small: in 768 = 24*32, out 2304 = 48*48
    layer = LoKrLayer(linear(768, 2304, dtype=np.float32))
    layer.update_layer("a", LoKrConfig(r=8), np.random.default_rng(0))
    assert layer.lokr_w1["a"].shape == (48, 24)  # W1 (out_l, in_m), full
    assert layer.lokr_w2_a["a"].shape == (48, 8) and layer.lokr_w2_b["a"].shape == (8, 32)  # r < max(48, 32)/2
    assert not layer.lokr_w1["a"].data.any()  # W1 = 0: identity at init
    layer.update_layer("b", LoKrConfig(r=24), np.random.default_rng(0))
    assert layer.lokr_w2["b"].shape == (48, 32)  # r >= 24: W2 full
    layer.update_layer("c", LoKrConfig(r=8, decompose_both=True), np.random.default_rng(0))
    assert layer.lokr_w1_a["c"].shape == (48, 8) and layer.lokr_w1_b["c"].shape == (8, 24)
    assert not layer.lokr_w1_a["c"].data.any() and layer.lokr_w1_b["c"].data.any()


def test_delta_is_scaled_kronecker():
    layer = lokr_layer(r=4, alpha=6)
    layer.lokr_w1["default"].data = np.random.default_rng(1).standard_normal(layer.lokr_w1["default"].shape)
    w1, w2 = layer.lokr_w1["default"].data, layer.lokr_w2["default"].data
    np.testing.assert_allclose(layer.get_delta_weight("default").data, 1.5 * np.kron(w1, w2), rtol=1e-12)


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_identity_at_init(init):
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = get_peft_model(base, LoKrConfig(r=2, init_weights=init, target_modules=["c_attn", "c_fc", "c_proj"]))
    np.testing.assert_array_equal(logits(model, idx), y0)


def test_train_merge_unmerge():
    model = get_peft_model(tiny_gpt(), LoKrConfig(r=2, alpha=2, target_modules=["c_attn", "mlp.c_proj"]))
    w0 = base_weights(model)
    losses = train(model, steps=3)
    assert losses[-1] < losses[0]
    idx, _ = batch(seed=5)
    y = logits(model, idx)
    model.merge_adapter()
    np.testing.assert_allclose(logits(model, idx), y, atol=1e-5)
    model.unmerge_adapter()
    for n, w in base_weights(model).items():
        np.testing.assert_allclose(w, w0[n], atol=1e-6, err_msg=n)


def test_errors():
    with pytest.raises(ValueError, match="decompose_factor"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="init_weights"):
        LoKrConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="positive integer"):
        LoKrConfig(r=-1)
