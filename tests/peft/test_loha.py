"""LoHa: HadaWeight's hand-written backward, identity at init, merge/unmerge, dropouts."""
import math

import numpy as np
import pytest

from minipeft import functional as F
from minipeft.engine import Tensor
from minipeft.peft import LoHaConfig, LoHaLayer, get_peft_model
from minipeft.peft.loha import HadaWeight
from minipeft.testing import gradcheck, gradcheck_module

from . import base_weights, batch, linear, logits, perturb, tiny_gpt, train, x_input


def loha_layer(n_in=5, n_out=7, r=2, seed=0, **kw) -> LoHaLayer:
    layer = LoHaLayer(linear(n_in, n_out, seed=seed))
    layer.update_layer("default", LoHaConfig(r=r, **kw), np.random.default_rng(seed))
    layer.set_adapter("default")
    return layer


def test_hada_weight_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    ws = [Tensor(rng.standard_normal(s), requires_grad=True) for s in [(6, 2), (2, 4), (6, 2), (2, 4)]]
    gradcheck(lambda a, b, c, d: HadaWeight.apply(a, b, c, d, 1.5), ws)
    composite = F.matmul(ws[0], ws[1]) * F.matmul(ws[2], ws[3]) * 1.5
    np.testing.assert_allclose(HadaWeight.apply(*ws, 1.5).data, composite.data, rtol=1e-12)


def test_loha_layer_gradcheck_float64():
    layer = loha_layer()
    layer.hada_w2_b["default"].data = np.random.default_rng(3).standard_normal((2, 5))  # leave the zero init
    x = x_input((2, 3, 5))
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == [
        "hada_w1_a.default", "hada_w1_b.default", "hada_w2_a.default", "hada_w2_b.default"]
    gradcheck_module(layer, lambda m: m(x), extra_inputs=[x])


def test_init_shapes_and_delta_formula():
    layer = loha_layer(n_in=40, n_out=30, r=4, alpha=6)
    w1a, w1b = layer.hada_w1_a["default"].data, layer.hada_w1_b["default"].data
    w2a, w2b = layer.hada_w2_a["default"].data, layer.hada_w2_b["default"].data
    assert (w1a.shape, w1b.shape, w2a.shape, w2b.shape) == ((30, 4), (4, 40), (30, 4), (4, 40))
    assert not w2b.any() and np.abs(w1a).max() <= 1 / math.sqrt(4) and np.abs(w1b).max() <= 1 / math.sqrt(40)
    layer.hada_w2_b["default"].data = np.random.default_rng(1).standard_normal((4, 40))
    want = (w1a @ w1b) * (w2a @ layer.hada_w2_b["default"].data) * 1.5  # alpha / r
    np.testing.assert_allclose(layer.get_delta_weight("default").data, want, rtol=1e-12)
    x = x_input((3, 40), requires_grad=False)
    np.testing.assert_allclose(layer(x).data, layer.base_layer(x).data + x.data @ want.T, rtol=1e-10)


def test_identity_at_init_and_parameter_count():
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = get_peft_model(base, LoHaConfig(r=3, target_modules=["c_attn", "c_fc"]))
    np.testing.assert_array_equal(logits(model, idx), y0)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * (2 * 3 * (16 + 48) + 2 * 3 * (16 + 64))  # 2r(in + out) per layer


def test_train_merge_unmerge():
    model = get_peft_model(tiny_gpt(), LoHaConfig(r=2, alpha=4, target_modules=["c_attn", "c_proj"]))
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


def test_rank_and_module_dropout_only_while_training():
    from minipeft.random import manual_seed
    model = get_peft_model(tiny_gpt(), LoHaConfig(r=2, rank_dropout=0.5, module_dropout=0.5))
    perturb(model)
    idx, _ = batch()
    y = logits(model, idx)
    model.train()
    manual_seed(0)
    outs = [logits(model, idx) for _ in range(4)]
    assert any(not np.allclose(o, y) for o in outs)
    model.eval()
    np.testing.assert_array_equal(logits(model, idx), y)


def test_errors():
    with pytest.raises(ValueError, match="positive integer"):
        LoHaConfig(r=0)
    with pytest.raises(ValueError, match="Conv2d"):
        LoHaConfig(use_effective_conv2d=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LoHaConfig(module_dropout=1.5)
