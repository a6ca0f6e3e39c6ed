"""GPT: GPT-2 names and init, agreement with transformers, checkpoints, gradients, PEFT hooks, generation."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minipeft.engine import Tensor, no_grad
from minipeft.gpt import CONFIGS, GPT, GPTConfig
from minipeft.testing import gradcheck_module

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HF_DIR = os.path.join(FIXTURES, "hf_gpt2_tiny")
HF_LOGITS = os.path.join(FIXTURES, "hf_gpt2_tiny_logits.safetensors")


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def small(**kw) -> GPT:
    cfg = dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    seed = cfg.pop("seed", 0)
    return GPT(GPTConfig(**cfg), seed=seed).eval()


def ids(shape, vocab=23, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


# ------------------------------------------------------------------------- config


def test_config_defaults_presets_and_validation():
    cfg = GPTConfig()
    assert (cfg.vocab_size, cfg.d_ff, cfg.head_dim) == (259, 256, 32)
    assert GPTConfig.preset("gpt2").vocab_size == 50257 and GPTConfig.preset("gpt2-xl").n_embd == 1600
    assert GPTConfig.preset("tiny") == GPTConfig.preset("T0")
    for name, (L, d, h) in {"T1": (4, 128, 4), "T2": (6, 256, 4), "T3": (8, 384, 6)}.items():
        c = GPTConfig.preset(name)
        assert (c.n_layer, c.n_embd, c.n_head) == (L, d, h)
    assert GPTConfig.preset("T1", dropout=0.1).dropout == 0.1
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown GPTConfig keys \['n_embed'\].*n_embd"):
        GPTConfig.from_dict({"n_embed": 64})
    with pytest.raises(ValueError, match="unknown model size"):
        GPTConfig.preset("gpt3")
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=64, n_head=3)
    for bad, message in ((dict(n_layer=0), "n_layer must be a positive integer, got 0"),
                         (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
                         (dict(dtype="int8"), "dtype must be one of .* got 'int8'"),
                         (dict(n_inner=-1), "n_inner must be None .* or a positive integer, got -1")):
        with pytest.raises(ValueError, match=message):
            GPTConfig(**bad)
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPT({"vocab": 10})
    assert set(CONFIGS) >= {"T0", "T1", "T2", "T3", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    # a base size names its shape: one table (minipeft.sizes) for presets, bases and the calculator
    assert GPTConfig.preset("small") == GPTConfig.preset("T1")
    assert GPTConfig.preset("small").block_size == 512 and GPTConfig.preset("tiny").block_size == 128


def test_default_vocab_is_the_byte_tokenizer():
    tok = pytest.importorskip("minipeft.data.tokenizer")
    assert GPTConfig().vocab_size == tok.ByteTokenizer().vocab_size


# ------------------------------------------------------------- names, init, tying


def test_gpt2_parameter_names_and_tying():
    m = small()
    names = [n for n, _ in m.named_parameters()]
    hf = sorted("transformer." + k if not k.startswith("transformer.") else k for k in load_file(
        os.path.join(HF_DIR, "model.safetensors")))
    assert sorted(names) == hf  # the same 28 names as the Hugging Face checkpoint
    assert m.lm_head.weight is m.transformer.wte.weight and "lm_head.weight" not in names
    assert m.get_submodule("transformer.h.1.attn.c_attn").weight.shape == (48, 16)  # (out, in)
    assert m.get_submodule("transformer.h.1.mlp.c_proj").weight.shape == (16, 64)
    untied = small(tie_word_embeddings=False)
    assert "lm_head.weight" in dict(untied.named_parameters())
    assert m.num_parameters() - m.num_parameters(non_embedding=True) == (23 + 16) * 16


def test_gpt2_init():
    m = GPT(GPTConfig(n_layer=8, n_embd=128, n_head=4), seed=3)
    std = lambda name: float(m.get_submodule(name).weight.data.std())  # noqa: E731
    assert std("transformer.h.0.attn.c_attn") == pytest.approx(0.02, rel=0.03)
    assert std("transformer.wte") == pytest.approx(0.02, rel=0.03)
    assert std("transformer.wpe") == pytest.approx(0.02, rel=0.03)
    assert std("transformer.h.3.mlp.c_proj") == pytest.approx(0.02 / np.sqrt(16), rel=0.03)
    assert std("transformer.h.3.attn.c_proj") == pytest.approx(0.02 / np.sqrt(16), rel=0.05)
    assert not m.transformer.h[0].attn.c_attn.bias.data.any()
    assert (m.transformer.h[0].ln_1.weight.data == 1).all() and not m.transformer.ln_f.bias.data.any()
    assert m.transformer.wte.weight.dtype == np.float32
    same, other = small(seed=7), small(seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(same.state_dict().values(), small(seed=7).state_dict().values()))
    assert not np.array_equal(same.transformer.wte.weight.data, other.transformer.wte.weight.data)


# ------------------------------------------------------------ Hugging Face files


@pytest.fixture(scope="module")
def hf():
    return GPT.from_hf(HF_DIR), load_file(HF_LOGITS)


def test_from_hf_matches_transformers(hf):
    model, fx = hf
    assert not model.training and model.config.dropout == 0.1  # eval mode; GPT-2's resid_pdrop kept
    out = model(fx["input_ids"], output_hidden_states=True)
    assert out.logits.dtype == np.float32
    assert rel_err(out.logits.data, fx["logits"]) <= 1e-5
    # hidden states: Hugging Face's L + 1, the last one after ln_f
    assert len(out.hidden_states) == model.config.n_layer + 1 == len(fx["hidden_states"])
    for h, ref in zip(out.hidden_states, fx["hidden_states"]):
        assert rel_err(h.data, ref) <= 1e-5


def test_from_hf_padding_mask_matches_transformers(hf):
    model, fx = hf
    out = model(fx["masked_input_ids"], attention_mask=fx["attention_mask"])
    keep = fx["attention_mask"].astype(bool)  # padded query rows are not compared
    assert rel_err(out.logits.data[keep], fx["masked_logits"][keep]) <= 1e-5


def test_save_hf_from_hf_round_trip(tmp_path, hf):
    model, fx = hf
    model.save_hf(tmp_path)
    raw = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in raw and not any(k.endswith("attn.bias") for k in raw if ".attn.c_" not in k)
    ref = load_file(os.path.join(HF_DIR, "model.safetensors"))
    assert sorted(raw) == sorted(ref)
    for k in ref:  # Hugging Face names and Conv1D (in, out) layout, bit for bit
        assert raw[k].shape == ref[k].shape and np.array_equal(raw[k], ref[k]), k
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    again = GPT.from_hf(tmp_path)
    assert again.config == model.config
    for (n, a), (n2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == n2 and np.array_equal(a, b)
    assert again.lm_head.weight is again.transformer.wte.weight
    assert np.array_equal(again(fx["input_ids"]).logits.data, model(fx["input_ids"]).logits.data)


def test_untied_head_round_trip(tmp_path):
    m = small(tie_word_embeddings=False)
    m.save_hf(tmp_path)
    assert "lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))
    again = GPT.from_hf(tmp_path)
    assert not again.config.tie_word_embeddings and again.lm_head.weight is not again.transformer.wte.weight
    assert np.array_equal(again(ids((2, 5))).logits.data, m(ids((2, 5))).logits.data)


def test_from_hf_key_variants_and_errors(tmp_path, hf):
    model, fx = hf
    ref = load_file(os.path.join(HF_DIR, "model.safetensors"))
    # the original hub layout: no "transformer." prefix, attn.bias buffers, lm_head stored
    variant = {k[len("transformer."):]: v for k, v in ref.items()}
    variant["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    variant["lm_head.weight"] = ref["transformer.wte.weight"]
    d = tmp_path / "variant"
    d.mkdir()
    shutil.copy(os.path.join(HF_DIR, "config.json"), d)
    save_file(variant, str(d / "model.safetensors"))
    assert rel_err(GPT.from_hf(d)(fx["input_ids"]).logits.data, fx["logits"]) <= 1e-5
    # a tied checkpoint whose head differs from wte
    variant["lm_head.weight"] = ref["transformer.wte.weight"] + 1
    save_file(variant, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        GPT.from_hf(d)
    # a config.json that does not describe the tensors (checkpoint of another shape)
    bad = tmp_path / "bad"
    shutil.copytree(HF_DIR, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_embd"], cfg["n_head"] = 64, 4
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatches"):
        GPT.from_hf(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_hf(tmp_path / "nowhere")
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle"):
        GPT.from_hf(bad)


def test_load_state_dict_of_another_shape_and_tying():
    m, other = small(), small(n_embd=32)
    with pytest.raises(ValueError, match="shape mismatches"):
        m.load_state_dict(other.state_dict())
    src = small(seed=5)
    m.load_state_dict(src.state_dict())
    assert m.lm_head.weight is m.transformer.wte.weight
    assert np.array_equal(m(ids((1, 4))).logits.data, src(ids((1, 4))).logits.data)
    m.transformer.wte.weight.data[:] = 0  # the head follows the embedding
    assert not m(ids((1, 4))).logits.data.any()


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = GPT(GPTConfig(block_size=32, n_embd=32, n_head=4), seed=1).eval()  # byte vocabulary, 259
    m.save_hf(tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    x = ids((2, 20), vocab=259, seed=2)
    with torch.no_grad():
        ref = theirs(torch.tensor(x)).logits.numpy()
    assert rel_err(m(x).logits.data, ref) <= 1e-5


# --------------------------------------------------------------------- gradients


def test_full_model_gradcheck_float64():
    m = small(vocab_size=11, n_embd=8, block_size=12, dtype="float64")
    for p in m.parameters():  # break the symmetries of the init (zero biases, unit LayerNorms)
        p.data += 0.1 * np.random.default_rng(p.size).standard_normal(p.shape)
    rng = np.random.default_rng(0)
    prefix = [(Tensor(rng.standard_normal((1, 2, 2, 4)), requires_grad=True),
               Tensor(rng.standard_normal((1, 2, 2, 4)), requires_grad=True)) for _ in range(2)]
    prompt = Tensor(rng.standard_normal((1, 1, 8)), requires_grad=True)
    x, t = ids((2, 5), vocab=11), ids((2, 5), vocab=11, seed=1)
    t[0, 0] = -100
    mask = np.ones((2, 5), bool)
    mask[1, 3:] = False

    def loss(model):
        out = model(x, t, prefix_key_values=prefix, inputs_embeds_prefix=prompt, attention_mask=mask,
                    label_smoothing=0.1)
        return out.loss + 0.01 * out.logits.sum()

    extra = [prompt] + [a for kv in prefix for a in kv]
    assert gradcheck_module(m, loss, extra_inputs=extra) < 1e-6


# ------------------------------------------------------------------- PEFT hooks


def test_prefix_from_own_cache_equals_concatenated_run():
    m = small(dtype="float64")
    a, b = ids((2, 5), seed=1), ids((2, 4), seed=2)
    full = m(np.concatenate([a, b], axis=1)).logits.data
    with no_grad():
        kv = m(a, use_cache=True).past_key_values
    assert kv[0][0].shape == (2, 2, 5, 8)
    as_prefix = m(b, prefix_key_values=[(Tensor(k), Tensor(v)) for k, v in kv]).logits.data
    as_cache = m(b, past_key_values=kv).logits.data
    np.testing.assert_allclose(as_prefix, full[:, 5:], rtol=1e-10, atol=1e-12)  # positions start at P
    np.testing.assert_allclose(as_cache, full[:, 5:], rtol=1e-10, atol=1e-12)
    # a batch-1 prefix is shared by every row
    one = [(Tensor(k[:1]), Tensor(v[:1])) for k, v in kv]
    tiled = m(np.stack([b[0], b[0]]), prefix_key_values=one).logits.data
    np.testing.assert_allclose(tiled[1], full[0, 5:], rtol=1e-10, atol=1e-12)


def test_prompt_embeddings_are_prepended_before_positions():
    m = small(dtype="float64")
    a, b = ids((2, 3), seed=1), ids((2, 6), seed=2)
    whole = np.concatenate([a, b], axis=1)
    full = m(whole, ids((2, 9), seed=3))
    prompt = Tensor(m.transformer.wte.weight.data[a])  # (B, P, C): the embeddings of a
    t = ids((2, 9), seed=3)[:, 3:]
    out = m(b, t, inputs_embeds_prefix=prompt, output_hidden_states=True)
    assert out.logits.shape == (2, 9, 23) and out.hidden_states[0].shape == (2, 9, 16)
    np.testing.assert_allclose(out.logits.data, full.logits.data, rtol=1e-10, atol=1e-12)
    # the loss is over the T token positions only
    t_full = ids((2, 9), seed=3)
    t_full[:, :3] = -100
    np.testing.assert_allclose(out.loss.item(), m(whole, t_full).loss.item(), rtol=1e-12)


def test_zero_length_prefixes_change_nothing():
    m = small()
    x = ids((3, 7))
    base = m(x).logits.data
    zero_kv = [(Tensor(np.zeros((1, 2, 0, 8), np.float32)),) * 2 for _ in range(2)]
    assert np.array_equal(m(x, prefix_key_values=zero_kv).logits.data, base)
    out = m(x, inputs_embeds_prefix=Tensor(np.zeros((1, 0, 16), np.float32)))
    assert np.array_equal(out.logits.data, base)


def test_attention_mask_with_prefix_and_hidden_states():
    m = small()
    rng = np.random.default_rng(0)
    prefix = [(Tensor(rng.standard_normal((1, 2, 3, 8)).astype(np.float32)),) * 2 for _ in range(2)]
    x = ids((2, 6))
    mask = np.ones((2, 6), int)
    mask[0, 2] = 0
    y = x.copy()
    y[0, 2] = (y[0, 2] + 1) % 23  # change only the masked token
    o1 = m(x, prefix_key_values=prefix, attention_mask=mask, output_hidden_states=True)
    o2 = m(y, prefix_key_values=prefix, attention_mask=mask)
    keep = np.ones((2, 6), bool)
    keep[0, 2] = False
    np.testing.assert_allclose(o1.logits.data[keep], o2.logits.data[keep], rtol=1e-5, atol=1e-6)
    assert len(o1.hidden_states) == 3
    ln_f = m.transformer.ln_f
    assert np.array_equal(m.lm_head(o1.hidden_states[-1]).data, o1.logits.data)  # last: after ln_f
    assert ln_f is m.get_submodule("transformer.ln_f")


def test_swapped_submodules_are_called():
    """PEFT wrappers replace c_attn / c_proj with set_submodule; the forward must use them."""
    from minipeft.nn import Module

    class Scale(Module):
        def __init__(self, base, s):
            super().__init__()
            self.base, self.s = base, s

        def forward(self, x):
            return self.base(x) * self.s

    m = small()
    x = ids((1, 5))
    base = m(x).logits.data
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"):
        m.set_submodule(name, Scale(m.get_submodule(name), 1.0))
    assert np.array_equal(m(x).logits.data, base)
    m.transformer.h[1].mlp.c_proj.s = 0.0  # no MLP in block 1
    assert not np.array_equal(m(x).logits.data, base)


# ------------------------------------------------------------------- generation


def test_generate_cache_equals_no_cache_and_crops():
    m = small(dtype="float64", block_size=10)
    x = ids((3, 4), seed=4)
    with_cache = m.generate(x, 12, greedy=True)  # runs past block_size: the window is cropped
    without = m.generate(x, 12, greedy=True, use_cache=False)
    assert with_cache.shape == (3, 16) and np.array_equal(with_cache, without)
    assert np.array_equal(with_cache[:, :4], x)
    # the first steps are the argmax of a plain forward
    assert np.array_equal(with_cache[:, 4], m(x).logits.data[:, -1].argmax(-1))


def test_generate_left_padding_matches_unpadded_rows():
    m = small(dtype="float64")
    short, long = ids((1, 3), seed=5), ids((1, 5), seed=6)
    batch = np.concatenate([np.concatenate([np.zeros((1, 2), int), short], 1), long])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got = m.generate(batch, 6, greedy=True, attention_mask=mask)
    assert np.array_equal(got[0, 5:], m.generate(short, 6, greedy=True)[0, 3:])
    assert np.array_equal(got[1, 5:], m.generate(long, 6, greedy=True)[0, 5:])
    assert np.array_equal(got, m.generate(batch, 6, greedy=True, attention_mask=mask, use_cache=False))


def test_generate_sampling_eos_and_prefixes():
    m = small()
    x = ids((4, 3))
    s1, s2 = m.generate(x, 8, temperature=0.8, top_k=5, seed=0), m.generate(x, 8, temperature=0.8, top_k=5, seed=0)
    assert np.array_equal(s1, s2) and not np.array_equal(s1, m.generate(x, 8, seed=1))
    assert np.array_equal(m.generate(x, 8, top_k=1, seed=3), m.generate(x, 8, greedy=True))
    g = m.generate(x, 8, greedy=True)
    eos = int(g[0, 3])  # row 0 emits it first
    e = m.generate(x, 8, greedy=True, eos_token_id=eos)
    assert (e[0, 3:] == eos).all()
    m.train()
    pe = Tensor(m.transformer.wte.weight.data[x[:, :2]])
    assert np.array_equal(m.generate(x[:, 2:], 4, greedy=True, inputs_embeds_prefix=pe)[:, 1:], g[:, 3:7])
    assert m.training  # mode restored
    with no_grad():
        kv = m.eval()(x[:, :2], use_cache=True).past_key_values
    got = m.generate(x[:, 2:], 4, greedy=True, prefix_key_values=kv)
    assert np.array_equal(got[:, 1:], g[:, 3:7])
    with pytest.raises(ValueError, match="greedy=True"):
        m.generate(x, 2, temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(x, 2, top_k=0)


# ------------------------------------------------------------------------ errors


def test_bad_inputs_are_explained():
    m = small()
    with pytest.raises(ValueError, match=r"positions reach 17.*block_size is 16.*GPTConfig.block_size"):
        m(ids((1, 17)))
    with pytest.raises(ValueError, match=r"block_size"):
        m(ids((1, 10)), inputs_embeds_prefix=Tensor(np.zeros((1, 7, 16), np.float32)))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 23\)"):
        m(np.array([[1, 23]]))
    with pytest.raises(ValueError, match="integer token ids"):
        m(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="inputs_embeds_prefix must have shape"):
        m(ids((2, 3)), inputs_embeds_prefix=Tensor(np.zeros((2, 1, 8), np.float32)))
    with pytest.raises(ValueError, match="one \\(k, v\\) pair per layer"):
        m(ids((2, 3)), prefix_key_values=[(np.zeros((2, 2, 1, 8)),) * 2])
    with pytest.raises(ValueError, match="prefix_key_values\\[0\\] tensors must have shape"):
        m(ids((2, 3)), prefix_key_values=[(np.zeros((2, 4, 1, 4)),) * 2] * 2)
    with pytest.raises(ValueError, match="targets must have the shape"):
        m(ids((2, 3)), ids((2, 4)))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(ids((2, 3)), attention_mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="bias=False"):
        small(bias=False).save_hf("/nonexistent-never-written")


@pytest.mark.gpu
def test_gpu_logits_match_cpu():
    m = small()
    x = ids((2, 6))
    ref = m(x).logits.data
    m.to("cuda")
    got = m(x).logits
    assert got.device == "cuda" and m.lm_head.weight is m.transformer.wte.weight
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert np.array_equal(m.generate(x, 4, greedy=True).get(), m.to("cpu").generate(x, 4, greedy=True))
