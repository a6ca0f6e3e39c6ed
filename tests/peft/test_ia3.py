"""(IA)³: gradients, exact identity at init, peft's shapes and keys, merge/unmerge, paper_kv_only, counts."""
import json

import numpy as np
import pytest

from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import IA3Config, IA3Layer, PeftConfig, get_peft_model
from minipeft.testing import gradcheck_module

from . import base_weights, batch, linear, logits, perturb, tiny_gpt, train, x_input


@pytest.fixture(scope="module")
def gpt2_small():
    """GPT-2 small's shape with zero weights (only the shape counts), built once for this file."""
    return GPT(GPTConfig.preset("gpt2"), init_weights=False)


def ia3_layer(feedforward: bool, n_in=5, n_out=6, seed=0) -> IA3Layer:
    layer = IA3Layer(linear(n_in, n_out, seed=seed))
    cfg = IA3Config(target_modules=["c_proj"], feedforward_modules=["c_proj"] if feedforward else [])
    layer.update_layer("default", cfg, np.random.default_rng(seed), name="mlp.c_proj")
    layer.set_adapter("default")
    l = layer.ia3_l["default"]
    l.data = 1.0 + 0.5 * np.random.default_rng(seed + 1).standard_normal(l.shape)  # off the ones
    return layer


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_layer_gradcheck_float64(feedforward):
    layer = ia3_layer(feedforward)
    assert layer.ia3_l["default"].shape == ((1, 5) if feedforward else (6, 1))  # peft's shapes
    x = x_input((2, 3, 5))
    gradcheck_module(layer, lambda m: m(x), extra_inputs=[x])


def test_ia3_model_gradcheck_float64():
    model = get_peft_model(tiny_gpt("float64", n_embd=8), IA3Config())
    perturb(model)
    idx, _ = batch(T=5)
    gradcheck_module(model, lambda m: m(idx).logits)


def test_only_ia3_vectors_get_gradients():
    model = get_peft_model(tiny_gpt(), IA3Config())
    idx, tg = batch()
    model(idx, tg).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("ia3_l" in n), n
        assert p.requires_grad == ("ia3_l" in n), n


# ---------------------------------------------------------- identity and maths


@pytest.mark.parametrize("kw", [{}, {"paper_kv_only": True}])
def test_identity_at_init_is_exact(kw):
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = get_peft_model(base, IA3Config(**kw))
    np.testing.assert_array_equal(logits(model, idx), y0)
    assert all((p.data == 1).all() for n, p in model.named_parameters() if "ia3_l" in n)


def test_output_and_input_scaling_formulas():
    x = x_input((4, 5), requires_grad=False)
    out = ia3_layer(False)
    w, b, l = out.base_layer.weight.data, out.base_layer.bias.data, out.ia3_l["default"].data
    np.testing.assert_allclose(out(x).data, (x.data @ w.T + b) * l[:, 0], rtol=1e-12)
    ff = ia3_layer(True)
    w, b, l = ff.base_layer.weight.data, ff.base_layer.bias.data, ff.ia3_l["default"].data
    np.testing.assert_allclose(ff(x).data, (x.data * l[0]) @ w.T + b, rtol=1e-12)


def test_peft_shapes_keys_and_default_targets():
    model = get_peft_model(tiny_gpt(), IA3Config())
    state = model.peft_state_dict()
    assert {k: v.shape for k, v in state.items()} == {
        f"base_model.model.transformer.h.{i}.{m}.ia3_l": s
        for i in range(2) for m, s in (("attn.c_attn", (48, 1)), ("mlp.c_proj", (1, 64)))}
    cfg = model.peft_config["default"]
    assert cfg.target_modules == ["c_attn", "mlp.c_proj"] and cfg.feedforward_modules == ["mlp.c_proj"]
    names = [n for n, _ in model.named_parameters() if "ia3_l" in n]
    assert names[0] == "base_model.model.transformer.h.0.attn.c_attn.ia3_l.default"


def test_paper_kv_only_fixes_the_query_scale():
    model = get_peft_model(tiny_gpt(), IA3Config(paper_kv_only=True))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.ia3_l["default"].shape == (32, 1)  # K and V of C = 16
    assert model.get_nb_trainable_parameters()[0] == 2 * (32 + 64)  # L (d_k + d_v + d_ff), methods.md §9
    layer.ia3_l["default"].data = np.arange(2.0, 34.0, dtype=np.float32)[:, None]
    x = x_input((1, 3, 16), dtype=np.float32, requires_grad=False)
    y, y0 = layer(x).data, layer.base_layer(x).data
    np.testing.assert_array_equal(y[..., :16], y0[..., :16])  # Q untouched
    np.testing.assert_allclose(y[..., 16:], y0[..., 16:] * np.arange(2.0, 34.0), rtol=1e-6)
    assert model.peft_config["default"].to_dict()["paper_kv_only"] is True
    with pytest.raises(ValueError, match="paper_kv_only"):
        get_peft_model(tiny_gpt(), IA3Config(target_modules=["mlp.c_proj"], paper_kv_only=True))


# ------------------------------------------------------------------ merging


@pytest.mark.parametrize("kw", [{}, {"paper_kv_only": True}])
def test_train_then_merged_equals_unmerged_and_unmerge_restores(kw):
    model = get_peft_model(tiny_gpt(), IA3Config(**kw))
    w0 = base_weights(model)
    perturb(model, scale=0.3)
    losses = train(model, steps=3, lr=50.0)
    assert losses[-1] < losses[0]
    idx, _ = batch(seed=3)
    y = logits(model, idx)
    model.merge_adapter()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.merged
    np.testing.assert_allclose(logits(model, idx), y, atol=2e-6)  # float32 precision
    l = layer.scale("default").data[:, 0]
    np.testing.assert_allclose(layer.base_layer.bias.data,
                               w0["base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"] * l, rtol=1e-6)
    ff = model.base_model.model.transformer.h[0].mlp.c_proj
    np.testing.assert_array_equal(ff.base_layer.bias.data,  # an input scale leaves the bias alone
                                  w0["base_model.model.transformer.h.0.mlp.c_proj.base_layer.bias"])
    model.unmerge_adapter()
    for n, w in base_weights(model).items():
        np.testing.assert_allclose(w, w0[n], rtol=1e-6, atol=1e-7, err_msg=n)
    plain = model.merge_and_unload()
    assert isinstance(plain, GPT)
    np.testing.assert_allclose(logits(plain, idx), y, atol=2e-6)


def test_disable_and_several_adapters():
    base = tiny_gpt()
    idx, _ = batch()
    y0 = logits(base, idx)
    model = get_peft_model(base, IA3Config())
    perturb(model)
    y1 = logits(model, idx)
    with model.disable_adapter():
        np.testing.assert_array_equal(logits(model, idx), y0)
    model.add_adapter("two", IA3Config())
    model.set_adapter("two")
    np.testing.assert_array_equal(logits(model, idx), y0)  # the new adapter is the identity
    model.add_weighted_adapter(["default", "two"], [0.5, 0.5], "avg")
    model.set_adapter("avg")
    layer = model.base_model.model.transformer.h[1].mlp.c_proj
    np.testing.assert_allclose(layer.ia3_l["avg"].data, 0.5 * layer.ia3_l["default"].data + 0.5, rtol=1e-6)
    model.set_adapter("default")
    np.testing.assert_array_equal(logits(model, idx), y1)


# ------------------------------------------------------- configs and counting


def test_print_trainable_parameters_gpt2_small(gpt2_small, capsys):
    model = get_peft_model(gpt2_small, IA3Config())
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 64,512 || all params: 124,504,320 || trainable%: 0.0518\n"
    model.unload()


PEFT_FORMAT_4_5 = {  # peft-format.md §4.5, GPT-2 small with the default targets
    "auto_mapping": None, "base_model_name_or_path": "gpt2", "fan_in_fan_out": True,
    "feedforward_modules": ["mlp.c_proj"], "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None,
    "peft_type": "IA3", "revision": None, "target_modules": ["c_attn", "mlp.c_proj"], "task_type": "CAUSAL_LM",
}


def test_config_json_is_peft_and_errors():
    cfg = IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                    base_model_name_or_path="gpt2", fan_in_fan_out=True, inference_mode=True)
    d = cfg.to_dict()
    assert set(d) - set(PEFT_FORMAT_4_5) == {"exclude_modules"} and list(d) == sorted(d)
    assert {k: d[k] for k in PEFT_FORMAT_4_5} == PEFT_FORMAT_4_5
    back = PeftConfig.from_dict(json.loads(json.dumps(d)))
    assert isinstance(back, IA3Config) and back.to_dict() == d
    with pytest.raises(ValueError, match="subset of target_modules"):
        IA3Config(target_modules=["c_attn"], feedforward_modules=["c_fc"])
    with pytest.raises(TypeError, match="feedforward_modules"):
        IA3Config(feedforward_modules=3)
    with pytest.raises(TypeError, match="multiplicative"):
        get_peft_model(tiny_gpt(), IA3Config()).base_model.model.transformer.h[0].attn.c_attn.get_delta_weight(
            "default")
