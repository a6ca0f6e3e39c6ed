"""Prefix tuning: gradients, peft's K/V layout, the MLP and its removal, files, counts, generate."""
import json

import numpy as np
import pytest

from minipeft.engine import Tensor
from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import (PeftConfig, PrefixTuningConfig, get_peft_model, load_prefix_prompt_embeddings,
                           prefix_prompt_embeddings, remove_reparameterization)
from minipeft.peft.prefix_tuning import split_key_values
from minipeft.testing import gradcheck_module

from . import batch, logits, perturb, tiny_gpt, train


@pytest.fixture(scope="module")
def gpt2_small():
    """GPT-2 small's shape with zero weights (only the shape counts), built once for this file."""
    return GPT(GPTConfig.preset("gpt2"), init_weights=False)


def prefix_model(P=3, dtype="float32", n_embd=16, **kw):
    base = tiny_gpt(dtype, n_embd=n_embd)
    return base, get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=P, **kw))


@pytest.mark.parametrize("kw", [{}, {"prefix_projection": True, "encoder_hidden_size": 3}])
def test_prefix_gradcheck_float64(kw):
    _, model = prefix_model(P=2, dtype="float64", n_embd=8, **kw)
    idx, tg = batch(T=5)
    gradcheck_module(model, lambda m: m(idx).logits)


def test_key_value_layout_is_peft_s():
    """flat[p, ((2i + s) H + h) D + d] is layer i's key (s = 0) or value (s = 1) at head h, position p."""
    L, H, D, P = 3, 2, 4, 5
    flat = np.random.default_rng(0).standard_normal((P, L * 2 * H * D))
    kv = split_key_values(Tensor(flat), L, H)
    ref = flat.reshape(1, P, L * 2, H, D).transpose(2, 0, 3, 1, 4)  # peft's view + permute
    for i, (k, v) in enumerate(kv):
        assert k.shape == v.shape == (1, H, P, D)
        np.testing.assert_array_equal(k.data, ref[2 * i])
        np.testing.assert_array_equal(v.data, ref[2 * i + 1])
        np.testing.assert_array_equal(k.data[0, 1, 3, 2], flat[3, ((2 * i) * H + 1) * D + 2])


def test_forward_is_gpt_with_prefix_key_values():
    base, model = prefix_model(P=4)
    idx, tg = batch()
    out = model(idx, tg)
    assert out.logits.shape == (2, 8, 23)  # no logits for the prefix positions
    flat = model.prompt_encoder["default"].embedding.weight
    assert flat.shape == (4, 2 * 2 * 16)
    ref = base(idx, tg, prefix_key_values=split_key_values(flat, 2, 2))
    np.testing.assert_array_equal(out.logits.data, ref.logits.data)
    assert out.loss.item() == ref.loss.item()
    mask = np.ones((2, 8), int)
    mask[0, :2] = 0
    np.testing.assert_array_equal(
        model(idx, attention_mask=mask).logits.data,
        base(idx, prefix_key_values=split_key_values(flat, 2, 2), attention_mask=mask).logits.data)


@pytest.mark.parametrize("kw", [{}, {"prefix_projection": True}])
def test_only_the_prefix_gets_gradients_and_trains(kw):
    _, model = prefix_model(**kw)
    idx, tg = batch()
    model(idx, tg).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.startswith("prompt_encoder"), n
    model.zero_grad()
    losses = train(model, steps=3, lr=200.0)
    assert losses[-1] < losses[0]


# ------------------------------------------------- reparameterization and files


def test_mlp_shapes_init_and_removal_gives_identical_outputs():
    _, model = prefix_model(P=3, prefix_projection=True, encoder_hidden_size=7)
    enc = model.prompt_encoder["default"]
    assert {n: p.shape for n, p in enc.named_parameters()} == {
        "embedding.weight": (3, 16), "transform.0.weight": (7, 16), "transform.0.bias": (7,),
        "transform.2.weight": (64, 7), "transform.2.bias": (64,)}  # peft's PrefixEncoder names
    assert np.abs(enc.transform[0].weight.data).max() <= 1 / 4  # torch.nn.Linear's U(±1/sqrt(in))
    perturb(model)
    idx, _ = batch()
    y = logits(model, idx)
    flat = prefix_prompt_embeddings(model)
    assert flat.shape == (3, 64)
    remove_reparameterization(model)
    enc = model.prompt_encoder["default"]
    assert not enc.prefix_projection and "transform" not in enc._modules
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    np.testing.assert_array_equal(enc.embedding.weight.data, flat)
    np.testing.assert_array_equal(logits(model, idx), y)
    remove_reparameterization(model)  # a no-op now


def test_saved_tensor_is_the_mlp_output_and_loads_as_plain_prefix():
    _, model = prefix_model(P=3, prefix_projection=True)
    perturb(model)
    idx, _ = batch()
    y = logits(model, idx)
    state = {k: np.array(v) for k, v in model.peft_state_dict().items()}
    assert list(state) == ["prompt_embeddings"]  # peft-format.md §4.7: the MLP output, not the MLP
    np.testing.assert_array_equal(state["prompt_embeddings"], prefix_prompt_embeddings(model))
    cfg_dict = model.peft_config["default"].to_dict()
    assert cfg_dict["prefix_projection"] is True and cfg_dict["encoder_hidden_size"] == 16
    # as peft loads it: inference_mode builds the plain Embedding(P, L*2*C)
    cfg = PeftConfig.from_dict({**json.loads(json.dumps(cfg_dict)), "inference_mode": True})
    loaded = get_peft_model(tiny_gpt(), cfg)
    assert not loaded.prompt_encoder["default"].prefix_projection
    loaded.load_peft_state_dict(state)
    np.testing.assert_array_equal(logits(loaded, idx), y)
    # into a training-mode adapter with an MLP: the MLP is replaced by the plain prefix
    trainable = get_peft_model(tiny_gpt(), PeftConfig.from_dict(cfg_dict))
    trainable.load_peft_state_dict(state)
    assert trainable.get_nb_trainable_parameters()[0] == 3 * 64
    np.testing.assert_array_equal(logits(trainable, idx), y)


def test_load_prefix_errors_leave_the_model_alone():
    _, model = prefix_model(P=3, prefix_projection=True)
    before = prefix_prompt_embeddings(model)
    with pytest.raises(ValueError, match=r"\(3, 64\)"):
        load_prefix_prompt_embeddings(model, np.zeros((3, 63)))
    with pytest.raises(ValueError, match="NaN"):
        load_prefix_prompt_embeddings(model, np.full((3, 64), np.nan))
    assert model.prompt_encoder["default"].prefix_projection
    np.testing.assert_array_equal(prefix_prompt_embeddings(model), before)
    with pytest.raises(ValueError, match="num_layers=3 \\(model: 2\\)"):
        get_peft_model(tiny_gpt(), PrefixTuningConfig(num_virtual_tokens=3, num_layers=3))
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_and_unload()


def test_zero_init_and_disable():
    base, model = prefix_model(P=2, init_weights="zero")
    assert not model.prompt_encoder["default"].embedding.weight.data.any()
    _, mlp = prefix_model(P=2, prefix_projection=True, init_weights="zero")
    assert not prefix_prompt_embeddings(mlp).any()
    perturb(model)
    idx, _ = batch()
    with model.disable_adapter():
        np.testing.assert_array_equal(logits(model, idx), logits(base, idx))


def test_print_trainable_parameters_gpt2_small(gpt2_small, capsys):
    model = get_peft_model(gpt2_small, PrefixTuningConfig(num_virtual_tokens=20))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 368,640 || all params: 124,808,448 || trainable%: 0.2954\n"
    d = model.peft_config["default"].to_dict()
    peft_4_7 = {"encoder_hidden_size": 768, "num_attention_heads": 12, "num_layers": 12,
                "num_transformer_submodules": 1, "num_virtual_tokens": 20, "peft_type": "PREFIX_TUNING",
                "prefix_projection": False, "task_type": "CAUSAL_LM", "token_dim": 768}
    assert {k: d[k] for k in peft_4_7} == peft_4_7 and "target_modules" not in d
    assert model.peft_state_dict()["prompt_embeddings"].shape == (20, 18432)


# ------------------------------------------------------------------ generate


@pytest.mark.parametrize("kw", [{}, {"prefix_projection": True}])
def test_generate_uses_the_prefix_and_the_cache_changes_nothing(kw):
    base, model = prefix_model(P=3, **kw)
    perturb(model, scale=2.0)
    idx, _ = batch(T=4)
    out = model.generate(idx, 6, greedy=True)
    assert out.shape == (2, 10)
    np.testing.assert_array_equal(out, model.generate(idx, 6, greedy=True, use_cache=False))
    kv = [(k.data, v.data) for k, v in split_key_values(model.prompt_encoder["default"](), 2, 2)]
    np.testing.assert_array_equal(out, base.generate(idx, 6, greedy=True, prefix_key_values=kv))
    with model.disable_adapter():
        np.testing.assert_array_equal(model.generate(idx, 6, greedy=True), base.generate(idx, 6, greedy=True))
