"""Prompt tuning: gradients, peft's runtime (positions, mask, loss), inits, counts, files, generate."""
import json

import numpy as np
import pytest

from minipeft import functional as F
from minipeft.data.tokenizer import ByteTokenizer
from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import PeftConfig, PromptTuningConfig, get_peft_model
from minipeft.testing import gradcheck_module

from . import batch, logits, perturb, tiny_gpt, train


@pytest.fixture(scope="module")
def gpt2_small():
    """GPT-2 small's shape with zero weights (only the shape counts), built once for this file."""
    return GPT(GPTConfig.preset("gpt2"), init_weights=False)


def prompt_model(P=3, **kw):
    base = tiny_gpt(**{k: kw.pop(k) for k in ("dtype", "vocab_size") if k in kw})
    return base, get_peft_model(base, PromptTuningConfig(num_virtual_tokens=P, **kw))


def test_prompt_gradcheck_float64():
    _, model = prompt_model(dtype="float64")
    idx, tg = batch(T=5)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    gradcheck_module(model, lambda m: m(idx).logits)
    gradcheck_module(model, lambda m: m(idx, tg).loss)


def test_runtime_matches_peft_semantics():
    """Prompt before wpe (positions 0..P-1), P leading mask ones, loss on the real tokens only."""
    base, model = prompt_model(P=4)
    idx, tg = batch()
    prompt = model.prompt_encoder["default"].embedding.weight.data  # (P, C)
    out = model(idx, tg)
    assert out.logits.shape == (2, 4 + 8, 23)
    ref = base(idx, inputs_embeds_prefix=prompt[None])
    np.testing.assert_array_equal(out.logits.data, ref.logits.data)
    # by hand: the embeddings [prompt; wte(idx)] + wpe(0..P+T-1), through the blocks
    tr = base.transformer
    x = F.concatenate([np.broadcast_to(prompt, (2, 4, 16)), tr.wte(idx)], axis=1) + tr.wpe(np.arange(12))
    for block in tr.h:
        x, _ = block(x)
    np.testing.assert_allclose(base.lm_head(tr.ln_f(x)).data, out.logits.data, atol=1e-6)
    want = F.cross_entropy(out.logits[:, 4:, :], tg).item()
    assert abs(out.loss.item() - want) < 1e-6
    mask = np.ones((2, 8), int)
    mask[1, :3] = 0  # left padding: the prompt stays visible
    np.testing.assert_array_equal(model(idx, attention_mask=mask).logits.data,
                                  base(idx, inputs_embeds_prefix=prompt[None], attention_mask=mask).logits.data)


def test_only_the_prompt_gets_gradients_and_trains():
    _, model = prompt_model()
    idx, tg = batch()
    model(idx, tg).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.startswith("prompt_encoder"), n
    model.zero_grad()
    losses = train(model, steps=3, lr=500.0)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------- inits


def test_random_and_sample_vocab_inits():
    _, model = prompt_model(P=40)
    w = model.prompt_encoder["default"].embedding.weight.data
    assert w.shape == (40, 16) and abs(w.mean()) < 0.1 and abs(w.std() - 1) < 0.1  # N(0, 1), as peft
    _, again = prompt_model(P=40)
    np.testing.assert_array_equal(again.prompt_encoder["default"].embedding.weight.data, w)  # seeded
    base, model = prompt_model(P=6, prompt_tuning_init="SAMPLE_VOCAB")
    wte = base.transformer.wte.weight.data
    for row in model.prompt_encoder["default"].embedding.weight.data:
        assert any(np.array_equal(row, r) for r in wte)


@pytest.mark.parametrize("text, P, expect", [("ab", 5, "ababa"), ("hello", 2, "he"), ("hi!", 3, "hi!")])
def test_text_init_repeats_or_truncates(text, P, expect):
    base, model = prompt_model(P=P, vocab_size=259, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    ids = ByteTokenizer().encode(expect)
    np.testing.assert_array_equal(model.prompt_encoder["default"].embedding.weight.data,
                                  base.transformer.wte.weight.data[ids])
    assert model.peft_config["default"].tokenizer_name_or_path == "minipeft/byte"


def test_text_init_with_a_given_tokenizer_and_errors():
    class Toy:
        def encode(self, text):
            return [len(text) % 23, 1]
    base, model = prompt_model(P=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="abcd", tokenizer=Toy(),
                               tokenizer_name_or_path="toy")
    np.testing.assert_array_equal(model.prompt_encoder["default"].embedding.weight.data,
                                  base.transformer.wte.weight.data[[4, 1, 4]])
    assert "tokenizer" not in model.peft_config["default"].to_dict()
    with pytest.raises(ValueError, match="vocabulary has 23"):
        prompt_model(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="cannot load the tokenizer 'gpt2'"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
                           tokenizer_name_or_path="gpt2")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuningConfig()
    with pytest.raises(ValueError, match="prompt_tuning_init"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="UNIFORM")
    with pytest.raises(ValueError, match="token_dim=8 \\(model: 16\\)"):
        get_peft_model(tiny_gpt(), PromptTuningConfig(num_virtual_tokens=3, token_dim=8))


# ------------------------------------------------------- counts and files


def test_print_trainable_parameters_gpt2_small(gpt2_small, capsys):
    model = get_peft_model(gpt2_small, PromptTuningConfig(num_virtual_tokens=20))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 15,360 || all params: 124,455,168 || trainable%: 0.0123\n"
    d = model.peft_config["default"].to_dict()
    peft_4_6 = {"num_attention_heads": 12, "num_layers": 12, "num_transformer_submodules": 1,
                "num_virtual_tokens": 20, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None, "task_type": "CAUSAL_LM", "token_dim": 768,
                "tokenizer_kwargs": None, "tokenizer_name_or_path": None, "auto_mapping": None, "revision": None}
    assert {k: d[k] for k in peft_4_6} == peft_4_6
    assert "target_modules" not in d and "exclude_modules" not in d and list(d) == sorted(d)
    assert model.peft_state_dict()["prompt_embeddings"].shape == (20, 768)


def test_state_round_trip_disable_and_merge_error():
    base, model = prompt_model(P=3)
    perturb(model)
    state = {k: v.copy() for k, v in model.peft_state_dict().items()}
    assert list(state) == ["prompt_embeddings"]
    idx, _ = batch()
    y = logits(model, idx)
    cfg = PeftConfig.from_dict(json.loads(json.dumps(model.peft_config["default"].to_dict())))
    fresh = get_peft_model(tiny_gpt(), cfg)
    fresh.load_peft_state_dict(state)
    np.testing.assert_array_equal(logits(fresh, idx), y)
    with model.disable_adapter():
        np.testing.assert_array_equal(logits(model, idx), logits(base, idx))
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_and_unload()


def test_several_prompts():
    _, model = prompt_model(P=3)
    model.add_adapter("long", PromptTuningConfig(num_virtual_tokens=5, seed=1))
    idx, _ = batch()
    assert model(idx).logits.shape[1] == 3 + 8
    model.set_adapter("long")
    assert model(idx).logits.shape[1] == 5 + 8
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.long.embedding.weight"]
    model.delete_adapter("default")
    assert list(model.prompt_encoder) == ["long"]


# ------------------------------------------------------------------ generate


def test_generate_uses_the_prompt_and_the_cache_changes_nothing():
    base, model = prompt_model(P=3)
    perturb(model, scale=2.0)
    idx, _ = batch(T=4)
    out = model.generate(idx, 6, greedy=True)
    assert out.shape == (2, 10)
    np.testing.assert_array_equal(out, model.generate(idx, 6, greedy=True, use_cache=False))
    prompt = model.prompt_encoder["default"].embedding.weight.data[None]
    np.testing.assert_array_equal(out, base.generate(idx, 6, greedy=True, inputs_embeds_prefix=prompt))
    with model.disable_adapter():
        np.testing.assert_array_equal(model.generate(idx, 6, greedy=True), base.generate(idx, 6, greedy=True))
    sampled = model.generate(idx, 6, seed=3, top_k=5)
    np.testing.assert_array_equal(sampled, model.generate(idx, 6, seed=3, top_k=5, use_cache=False))
