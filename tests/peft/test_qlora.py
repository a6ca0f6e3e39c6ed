"""The QLoRA recipe (minipeft.peft.qlora): an NF4 base with double quantization, then LoRA."""
import copy

import numpy as np
import pytest

from minipeft.peft import LoraConfig, LoraLayer, VeraConfig, get_peft_model, get_qlora_model
from minipeft.peft.method import BLOCK_LINEARS
from minipeft.quant.modules import Linear4bit, quantize_model

from . import batch, logits, tiny_gpt, train


def test_recipe_is_quantize_then_lora():
    base = tiny_gpt(n_embd=32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(BLOCK_LINEARS))
    by_hand = copy.deepcopy(base)
    quantize_model(by_hand, quant_type="nf4", blocksize=64, compress_statistics=True, compute_dtype="float32")
    by_hand = get_peft_model(by_hand, cfg)
    model = get_qlora_model(base, cfg, compute_dtype="float32")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4 * 2 and all(isinstance(m.base_layer, Linear4bit) for m in layers)
    q = layers[0].base_layer
    assert (q.quant_type, q.blocksize, q.compress_statistics) == ("nf4", 64, True)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    idx, _ = batch()
    np.testing.assert_array_equal(logits(model, idx), logits(by_hand, idx))
    losses = train(model, steps=3, lr=0.05)
    assert losses[-1] < losses[0]


def test_bad_config_leaves_the_base_unquantized():
    base = tiny_gpt(n_embd=32)
    with pytest.raises(TypeError, match="must be a LoraConfig"):
        get_qlora_model(base, VeraConfig(r=4))
    with pytest.raises(ValueError, match="matches no module"):
        get_qlora_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    assert not any(isinstance(m, Linear4bit) for m in base.modules())
