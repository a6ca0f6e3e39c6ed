"""Every row of the method table (``minipeft.peft.method_table()``), run through the same checks.

The table is what the lessons compare and what the memory calculator predicts; a method
that declares a recipe is tested here with no edit to this file: it builds on a GPT,
trains (one batch, the recipe's own learning rate), saves and loads back to the same
outputs, merges to the same outputs where it can, and, where the calculator models it,
has exactly the parameter counts the calculator predicts.
"""
import numpy as np
import pytest

from minipeft.memory import METHODS as MEMORY_METHODS
from minipeft.memory import MethodConfig, estimate_memory
from minipeft.optim import AdamW
from minipeft.peft import FAMILIES, REGISTRY, from_pretrained, get_peft_model, method_table, save_adapter

from . import batch, logits, tiny_gpt

TABLE = method_table()
SHAPE = dict(n_layer=2, n_embd=16, vocab_size=256, block_size=32)  # byte ids (prompt TEXT init); room for P=20


def build(recipe, seed: int = 0):
    config = recipe.config(SHAPE["n_layer"], SHAPE["n_embd"])
    config.seed = seed
    return get_peft_model(tiny_gpt(**SHAPE), config)


COURSE = ["full", "top_k", "bitfit", "lora", "rslora", "dora", "loha", "lokr", "vera", "houlsby", "pfeiffer", "ia3",
          "prefix", "prompt"]  # the methods the peft_methods lesson compares (a new method may join them)


def test_the_table_lists_the_course_methods_by_family():
    assert [n for n in TABLE if n in COURSE] == COURSE
    families = [FAMILIES.index(r.family) for r in TABLE.values()]
    assert families == sorted(families)
    for r in TABLE.values():
        assert r.config(2, 16).peft_type in REGISTRY and r.lr > 0, r.name
        assert r.memory is None or r.memory(2, 16)["method"] in MEMORY_METHODS, r.name


@pytest.mark.parametrize("name", list(TABLE))
def test_recipe_trains_saves_loads_and_merges(name, tmp_path):
    recipe = TABLE[name]
    model = build(recipe)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=recipe.lr, weight_decay=0.0)
    idx, tg = batch(seed=5)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(idx, tg).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (name, losses)
    model.eval()
    want = logits(model, idx)

    save_adapter(model, tmp_path)
    loaded = from_pretrained(tiny_gpt(**SHAPE), tmp_path)
    np.testing.assert_allclose(logits(loaded, idx), want, rtol=0, atol=1e-6, err_msg=name)
    if model.method.mergeable:
        np.testing.assert_allclose(logits(model.merge_and_unload(), idx), want, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("name", [n for n, r in TABLE.items() if r.memory is not None])
def test_memory_calculator_counts_the_recipe_as_built(name):
    recipe = TABLE[name]
    model = build(recipe)
    predicted = estimate_memory(model.get_base_model().config, MethodConfig(**recipe.memory(2, 16)))
    assert (predicted.n_trainable, predicted.n_params) == model.get_nb_trainable_parameters()
