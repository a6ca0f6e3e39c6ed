"""Guards against silent corruption: wrapping twice, quantizing adapters, wrapping targets, NaN settings.

Each case used to run without an error and give a wrong model or a wrong number; each must
now raise a ValueError that says what to do instead, and leave the objects as they were.
"""
import copy
import math

import numpy as np
import pytest

import minipeft.functional as F
from minipeft.engine import Tensor
from minipeft.gpt import GPT, GPTConfig
from minipeft.optim import SGD, AdamW
from minipeft.peft import (IA3Config, LoHaConfig, LoraConfig, PromptTuningConfig, get_peft_model, load_adapter,
                           save_adapter)
from minipeft.quant.modules import quantize_model
from minipeft.train import TrainConfig

NAN, INF = float("nan"), float("inf")


def tiny(seed=0) -> GPT:
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16), seed=seed).eval()


def lora_A_shapes(model) -> list:
    return [m.lora_A["default"].weight.shape for m in model.modules() if hasattr(m, "lora_A")]


# ------------------------------------------------------------------ get_peft_model twice


@pytest.mark.parametrize("second", [LoraConfig(r=8), LoHaConfig(r=2), PromptTuningConfig(num_virtual_tokens=3)],
                         ids=["lora", "loha", "prompt"])
def test_second_get_peft_model_on_the_same_base_is_refused(second):
    base = tiny()
    first = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"]))
    before = lora_A_shapes(first)
    with pytest.raises(ValueError, match=r"already wrapped.*add_adapter.*copy\.deepcopy"):
        get_peft_model(base, second)
    # the first PeftModel is untouched: its config still describes its weights
    assert first.peft_config["default"].r == 4 and lora_A_shapes(first) == before == [(4, 16)] * 2
    assert first.get_nb_trainable_parameters()[0] == 2 * (4 * 16 + 48 * 4)


def test_a_method_without_layers_is_refused_too_and_the_remedies_work(tmp_path):
    base = tiny()
    pt = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=3))  # no layer inside base: the record says
    with pytest.raises(ValueError, match="PROMPT_TUNING PeftModel .* wraps it"):
        get_peft_model(base, IA3Config())
    other = get_peft_model(copy.deepcopy(tiny()), IA3Config())  # a copy taken before wrapping: fine
    assert other is not pt
    pt.add_adapter("second", PromptTuningConfig(num_virtual_tokens=2))  # the way to add another adapter
    assert list(pt.peft_config) == ["default", "second"]
    plain = pt.unload()  # unloading gives the plain base back, which may be wrapped again
    assert get_peft_model(plain, LoraConfig(r=2)).peft_config["default"].r == 2


def test_a_failed_load_does_not_mark_the_model_wrapped(tmp_path):
    save_adapter(get_peft_model(tiny(), LoraConfig(r=2)), tmp_path / "a")
    wrong = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    with pytest.raises(ValueError, match="model unchanged"):
        load_adapter(wrong, tmp_path / "a")
    assert get_peft_model(wrong, LoraConfig(r=2)).peft_config["default"].r == 2


# ------------------------------------------------------------------ quantize_model on a PEFT model


def test_quantize_model_refuses_a_peft_model_and_leaves_it_trainable():
    peft = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["c_attn"]))
    trainable = peft.get_nb_trainable_parameters()
    for target in (peft, peft.get_base_model()):  # the wrapper, or the base holding the LoRA layers
        with pytest.raises(ValueError, match=r"already holds PEFT adapters.*Quantize the base first"):
            quantize_model(target)
    assert peft.get_nb_trainable_parameters() == trainable
    assert not any(type(m).__name__.startswith("Linear4bit") for m in peft.modules())
    base = tiny()
    quantize_model(base)  # QLoRA's order still works: quantize, then wrap
    assert get_peft_model(base, LoraConfig(r=4)).get_nb_trainable_parameters()[0] > 0


# ------------------------------------------------------------------ targets outside [0, V)


@pytest.mark.parametrize("bad", [-1, 50, 258, -101])
def test_targets_outside_the_vocabulary_are_refused(bad):
    model = tiny()
    x = np.zeros((1, 4), np.int64)
    y = np.array([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 50\) or ignore_index"):
        model(x, targets=y)
    with pytest.raises(ValueError, match="outside"):
        F.cross_entropy(Tensor(np.zeros((4, 50), np.float32)), y[0])


def test_ignore_index_targets_still_count_for_nothing():
    model = tiny()
    x = np.zeros((1, 4), np.int64)
    full = model(x, targets=np.array([[1, 2, 3, 4]])).loss.item()
    part = model(x, targets=np.array([[1, 2, -100, -100]])).loss.item()
    custom = model(x, targets=np.array([[1, 2, -1, -1]]), ignore_index=-1).loss.item()
    assert math.isfinite(full) and part == pytest.approx(custom) and part != pytest.approx(full)


# ------------------------------------------------------------------ non-finite settings


@pytest.mark.parametrize("make", [
    lambda: LoraConfig(r=4, lora_alpha=NAN), lambda: LoraConfig(r=4, lora_alpha=INF),
    lambda: LoraConfig(r=4, alpha_pattern={"c_attn": NAN}), lambda: LoHaConfig(r=2, alpha=-INF),
    lambda: LoraConfig(r=4, lora_dropout=NAN),
    lambda: GPTConfig(layer_norm_epsilon=INF), lambda: GPTConfig(layer_norm_epsilon=NAN),
    lambda: GPTConfig(dropout=NAN),
    lambda: TrainConfig(lr=NAN), lambda: TrainConfig(lr=INF), lambda: TrainConfig(min_lr=NAN),
    lambda: TrainConfig(weight_decay=INF), lambda: TrainConfig(grad_clip=INF),
    lambda: AdamW(tiny(), lr=NAN), lambda: AdamW(tiny(), eps=NAN), lambda: AdamW(tiny(), weight_decay=NAN),
    lambda: SGD(tiny(), momentum=NAN), lambda: SGD(tiny(), weight_decay=INF),
], ids=["lora_alpha=nan", "lora_alpha=inf", "alpha_pattern nan", "loha alpha=-inf", "lora_dropout=nan",
        "ln_eps=inf", "ln_eps=nan", "dropout=nan", "lr=nan", "lr=inf", "min_lr=nan", "weight_decay=inf",
        "grad_clip=inf", "adamw lr=nan", "adamw eps=nan", "adamw wd=nan", "sgd momentum=nan", "sgd wd=inf"])
def test_non_finite_settings_are_refused(make):
    with pytest.raises(ValueError, match=r"finite|must be in|positive number|must be a probability"):
        make()
