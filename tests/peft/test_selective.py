"""BitFit, top-k blocks and full fine-tuning through get_peft_model: choice, gradients, in-place training, files."""
import copy
import json

import numpy as np
import pytest

from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import (BitFitConfig, FullFineTuningConfig, PeftConfig, TopKBlocksConfig, get_peft_model)
from minipeft.testing import gradcheck_module

from . import batch, logits, tiny_gpt, train


@pytest.fixture(scope="module")
def gpt2_small():
    """GPT-2 small's shape with zero weights (only the shape counts), built once for this file."""
    return GPT(GPTConfig.preset("gpt2"), init_weights=False)


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_bitfit_trains_exactly_the_biases():
    model = get_peft_model(tiny_gpt(), BitFitConfig())
    names = trainable(model)
    assert names and all(n.endswith(".bias") for n in names)
    assert len(names) == 2 * 6 + 1  # per block ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj; ln_f
    only = get_peft_model(tiny_gpt(), BitFitConfig(target_modules=["c_attn"]))
    assert trainable(only) == [f"base_model.model.transformer.h.{i}.attn.c_attn.bias" for i in range(2)]


def test_top_k_blocks_choice_and_errors():
    model = get_peft_model(tiny_gpt(n_layer=3), TopKBlocksConfig(top_k_blocks=2))
    names = trainable(model)
    assert {n.split(".")[4] for n in names if ".h." in n} == {"1", "2"}
    assert "base_model.model.transformer.ln_f.weight" in names and not any(".h.0." in n for n in names)
    only_ln = get_peft_model(tiny_gpt(), TopKBlocksConfig(top_k_blocks=0))
    assert trainable(only_ln) == ["base_model.model.transformer.ln_f.weight", "base_model.model.transformer.ln_f.bias"]
    with pytest.raises(ValueError, match="has 2 blocks"):
        get_peft_model(tiny_gpt(), TopKBlocksConfig(top_k_blocks=3))
    with pytest.raises(ValueError, match="block list named 'layers'"):
        get_peft_model(tiny_gpt(), TopKBlocksConfig(layers_pattern="layers"))
    with pytest.raises(ValueError, match="trains nothing"):
        TopKBlocksConfig(top_k_blocks=0, train_ln_f=False)


@pytest.mark.parametrize("config", [BitFitConfig(target_modules=["c_fc", "ln_f"]),
                                    TopKBlocksConfig(top_k_blocks=1, train_ln_f=False)])
def test_gradcheck_float64(config):
    model = get_peft_model(tiny_gpt("float64", n_embd=8, n_inner=8), config)
    idx, _ = batch(T=4)
    gradcheck_module(model, lambda m: m(idx).logits)


@pytest.mark.parametrize("config", [BitFitConfig(), TopKBlocksConfig(top_k_blocks=1), FullFineTuningConfig()])
def test_only_chosen_tensors_get_gradients_and_train_in_place(config):
    base = tiny_gpt()
    before = copy.deepcopy(base)
    model = get_peft_model(base, config)
    chosen = set(trainable(model))
    idx, tg = batch()
    model(idx, tg).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in chosen), n
    model.zero_grad()
    losses = train(model, steps=3, lr=0.5)
    assert losses[-1] < losses[0]
    old = dict(before.named_parameters())
    changed = {n for n, p in base.named_parameters() if not np.array_equal(p.data, old[n].data)}
    assert {"base_model.model." + n for n in changed} <= chosen and changed
    y = logits(model, idx)
    assert model.merge_and_unload() is base  # merging is a no-op: the base holds the trained tensors
    np.testing.assert_array_equal(logits(base, idx), y)


def test_saved_under_base_names_and_round_trip():
    model = get_peft_model(tiny_gpt(), BitFitConfig())
    train(model, steps=2, lr=0.5)
    state = {k: v.copy() for k, v in model.peft_state_dict().items()}
    assert "base_model.model.transformer.h.0.attn.c_attn.bias" in state and len(state) == 13
    cfg = PeftConfig.from_dict(json.loads(json.dumps(model.peft_config["default"].to_dict())))
    assert isinstance(cfg, BitFitConfig)
    fresh = get_peft_model(tiny_gpt(), cfg)
    fresh.load_peft_state_dict(state)
    idx, _ = batch()
    np.testing.assert_array_equal(logits(fresh, idx), logits(model, idx))
    full = get_peft_model(tiny_gpt(), FullFineTuningConfig()).peft_state_dict()
    assert "base_model.model.transformer.wte.weight" in full and "base_model.model.lm_head.weight" not in full  # tied


def test_one_adapter_and_no_disable():
    model = get_peft_model(tiny_gpt(), FullFineTuningConfig())
    with pytest.raises(ValueError, match="one such adapter"):
        model.add_adapter("two", FullFineTuningConfig())
    with pytest.raises(TypeError, match="no untouched base"):
        with model.disable_adapter():
            pass
    frozen = get_peft_model(tiny_gpt(), BitFitConfig(inference_mode=True))
    assert trainable(frozen) == []
    with pytest.raises(ValueError, match="selects no parameter"):
        get_peft_model(tiny_gpt(bias=False), BitFitConfig(target_modules=["c_attn"]))


def test_counts_gpt2_small(gpt2_small, capsys):
    counts = {}
    for cfg in (BitFitConfig(), TopKBlocksConfig(top_k_blocks=2), FullFineTuningConfig()):
        model = get_peft_model(gpt2_small, cfg)
        counts[cfg.peft_type] = model.get_nb_trainable_parameters()
        model.print_trainable_parameters()
        model.unload()  # the next method wraps the plain base again (a wrapped model cannot be wrapped twice)
    assert counts == {"BITFIT": (102_144, 124_439_808), "TOP_K_BLOCKS": (14_177_280, 124_439_808),
                      "FULL": (124_439_808, 124_439_808)}
    assert capsys.readouterr().out.splitlines()[-1] == (
        "trainable params: 124,439,808 || all params: 124,439,808 || trainable%: 100.0000")
