"""The CUDA-graph greedy decoder (minipeft/decoding/graph.py) and its kernels (minipeft/kernels/decode.cu).

On the CPU: the NumPy twin of the step, run by the decoder's own orchestration
(``backend="reference"``), gives the tokens of ``GPT.generate(greedy=True)`` — without and
with left padding, for a LoRA PeftModel with nonzero B (merged into the decoder's copies, the
model untouched), across calls that reuse one decoder — and every model the graph cannot
run is refused with its reason. Marked ``gpu``: each kernel against its twin on random
inputs, and the captured graph against ``GPT.generate`` on a small random GPT.
"""
from __future__ import annotations

import numpy as np
import pytest

from minipeft.backend import to_numpy
from minipeft.decoding.graph import (DecodeState, GraphDecoder, Reference, decode_step, gather_weights,
                                     generate_graph, graph_decodable)
from minipeft.decoding.batch import left_pad
from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import (BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                           get_peft_model)

CFG = dict(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32)


def random_gpt(seed: int = 0, **overrides) -> GPT:
    """A small GPT with weights large enough that its greedy choices vary (GPT-2's init gives flat logits)."""
    model = GPT(GPTConfig(**{**CFG, **overrides}), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.named_parameters():
        base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
        p.data = (base + 0.3 * rng.standard_normal(p.shape)).astype(p.dtype)
    return model.eval()


def prompts(B: int, T: int, seed: int = 1, V: int = 61) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (B, T))


def twin(model, idx, n, attention_mask=None):
    return to_numpy(generate_graph(model, idx, n, attention_mask, backend="reference"))


def want(model, idx, n, attention_mask=None):
    return to_numpy(model.generate(idx, n, greedy=True, attention_mask=attention_mask))


# ------------------------------------------------------------------ the twin on the CPU


@pytest.mark.parametrize("B,T,n", [(1, 1, 10), (3, 5, 12), (8, 4, 29)])
def test_twin_gives_generate_tokens(B, T, n):
    model = random_gpt()
    idx = prompts(B, T)
    got = twin(model, idx, n)
    assert got.shape == (B, T + n)
    np.testing.assert_array_equal(got, want(model, idx, n))


def test_twin_with_left_padding():
    model = random_gpt(seed=2)
    idx, mask = left_pad([np.array([5, 7, 9]), np.arange(1, 9), np.array([3]), np.array([40, 2, 2, 17, 60])])
    got = twin(model, idx, 15, attention_mask=mask)
    np.testing.assert_array_equal(got, want(model, idx, 15, attention_mask=mask))
    for row in range(len(idx)):  # each row continues as its prompt alone would
        alone = idx[row][mask[row]][None]
        np.testing.assert_array_equal(got[row, idx.shape[1]:], want(model, alone, 15)[0, alone.shape[1]:])


def test_twin_step_logits_equal_the_forward():
    """One step of the twin gives the logits the full forward gives at the last position."""
    model = random_gpt(seed=3)
    idx = prompts(2, 6, seed=4)
    dec = GraphDecoder(model, 2, backend="reference")
    out = dec(idx, 2)  # prefill + one step: state.logits are those of out[:, -2] at position 6
    full = to_numpy(model.forward(out[:, :-1]).logits.data)[:, -1]
    np.testing.assert_allclose(to_numpy(dec.state.logits), full, rtol=1e-4, atol=1e-4)


def test_one_decoder_serves_many_calls():
    model = random_gpt(seed=4)
    dec = GraphDecoder(model, 2, backend="reference")
    for seed, T, n in ((5, 3, 9), (6, 7, 4), (7, 2, 1), (8, 4, 0)):
        idx = prompts(2, T, seed=seed)
        np.testing.assert_array_equal(to_numpy(dec(idx, n)), want(model, idx, n))
    idx, mask = left_pad([np.array([1, 2, 3, 4]), np.array([9])])
    np.testing.assert_array_equal(to_numpy(dec(idx, 6, mask)), want(model, idx, 6, mask))


def test_prompt_that_fills_the_window():
    model = random_gpt(seed=5)
    idx = prompts(2, 20, seed=9)
    n = CFG["block_size"] - 20 + 1  # the last new token is chosen, never run: T + n - 1 slots
    np.testing.assert_array_equal(twin(model, idx, n), want(model, idx, n))
    with pytest.raises(ValueError, match="block_size"):
        twin(model, idx, n + 1)


def lora_model(seed: int = 6, **kw):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False, **kw)
    return get_peft_model(random_gpt(seed=seed), cfg)


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"enable_lora": [True, False, True]}], ids=str)
def test_twin_on_lora_uses_merged_weights_and_leaves_the_model(kw):
    if "enable_lora" in kw:
        peft_model = get_peft_model(random_gpt(seed=7), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                                   init_lora_weights=False, **kw))
    else:
        peft_model = lora_model(**kw)
    before = {k: to_numpy(v).copy() for k, v in peft_model.state_dict().items()}
    idx, mask = left_pad([np.array([4, 5, 6]), np.array([7, 8, 9, 10, 11])])
    got = twin(peft_model, idx, 10, mask)
    np.testing.assert_array_equal(got, want(peft_model, idx, 10, mask))
    weights, merged = gather_weights(peft_model.get_base_model())
    assert "transformer.h.0.attn.c_attn.weight" in merged  # W + s B A, not the base W
    base_w = peft_model.get_base_model().transformer.h[0].attn.c_attn.get_base_layer().weight.data
    assert not np.allclose(weights["transformer.h.0.attn.c_attn.weight"], base_w)
    after = peft_model.state_dict()
    assert all(np.array_equal(before[k], to_numpy(after[k])) for k in before), "the model's weights changed"
    assert not any(getattr(m, "merged_adapters", []) for m in peft_model.modules())
    with peft_model.disable_adapter():  # the base alone
        np.testing.assert_array_equal(twin(peft_model, idx, 6, mask), want(peft_model, idx, 6, mask))


def test_merged_lora_decodes_too():
    peft_model = lora_model(seed=8)
    idx = prompts(2, 4, seed=3)
    expected = want(peft_model, idx, 8)
    peft_model.merge_adapter()
    np.testing.assert_array_equal(twin(peft_model, idx, 8), expected)


def test_reference_argmax_is_numpys():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [np.nan, 2.0, np.nan, 1.0], [-np.inf] * 4], np.float32)
    tok, out, step = np.zeros(3, np.int32), np.zeros((3, 4), np.int32), np.array([2], np.int32)
    Reference.argmax(logits, tok, out, step)
    np.testing.assert_array_equal(tok, [1, 0, 0])
    np.testing.assert_array_equal(out[:, 2], [1, 0, 0])


def test_state_is_allocated_once():
    """The step writes into the buffers it was given: no array of the state is replaced."""
    model = random_gpt()
    dec = GraphDecoder(model, 1, backend="reference")
    ids = {name: id(getattr(dec.state, name)) for name in ("tok", "pos", "slot", "step", "kept", "k", "x", "logits")}
    dec(prompts(1, 3), 5)
    assert ids == {name: id(getattr(dec.state, name)) for name in ids}
    assert int(dec.state.step[0]) == 5 and int(dec.state.slot[0]) == 3 + 4


# ------------------------------------------------------------------ what the graph refuses


def test_model_on_the_cpu_is_refused_for_cuda():
    model = random_gpt()
    assert graph_decodable(model, "reference") is None
    assert "CPU" in graph_decodable(model)
    with pytest.raises(ValueError, match="model.generate"):
        GraphDecoder(model, 1)


@pytest.mark.parametrize("config, words", [
    (PrefixTuningConfig(num_virtual_tokens=3), "prefix"),
    (PromptTuningConfig(num_virtual_tokens=3), "prompt"),
    (IA3Config(), "IA3Layer"),
    (BottleneckConfig(target_modules=["mlp.c_proj"]), "BottleneckLayer"),
], ids=["prefix", "prompt", "ia3", "bottleneck"])
def test_other_methods_are_refused(config, words):
    peft_model = get_peft_model(random_gpt(), config)
    reason = graph_decodable(peft_model, "reference")
    assert reason and words in reason
    with pytest.raises(ValueError, match="model.generate"):
        generate_graph(peft_model, prompts(1, 3), 4, backend="reference")


def test_quantized_float64_and_sampling_are_refused():
    from minipeft.quant.modules import Linear8bitLt

    model = random_gpt()
    model.set_submodule("transformer.h.1.mlp.c_fc", Linear8bitLt(model.transformer.h[1].mlp.c_fc))
    assert "Linear8bitLt" in graph_decodable(model, "reference")
    assert "float64" in graph_decodable(random_gpt(dtype="float64"), "reference")
    model = random_gpt()
    for kw in ({"greedy": False}, {"temperature": 0.7}, {"eos_token_id": 3}):
        with pytest.raises(ValueError, match="model.generate"):
            generate_graph(model, prompts(1, 3), 4, backend="reference", **kw)


def test_batch_and_shape_errors():
    model = random_gpt()
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        GraphDecoder(model, 9, backend="reference")
    dec = GraphDecoder(model, 2, backend="reference")
    with pytest.raises(ValueError, match="GraphDecoder\\(model, 3\\)"):
        dec(prompts(3, 4), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec(prompts(2, 4), -1)


# ------------------------------------------------------------------ the kernels (GPU)


@pytest.fixture(scope="module")
def kd():
    from minipeft.kernels import decode

    return decode


def _close(got, ref, tol=2e-5):
    got, ref = to_numpy(got).astype(np.float64), np.asarray(ref, np.float64)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * (np.abs(ref).max() + 1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("n_in,n_out", [(32, 96), (768, 2304), (3072, 768), (33, 17), (768, 50257)])
@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual"])
def test_gemv_kernel_equals_twin(cp, kd, B, n_in, n_out, epilogue):
    rng = np.random.default_rng(B + n_in)
    x = rng.standard_normal((B, n_in)).astype(np.float32)
    W = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if n_out != 50257 else None
    y0 = rng.standard_normal((B, n_out)).astype(np.float32)
    ref = y0.copy()
    Reference.gemv(x, W, bias, ref, epilogue)
    y = cp.asarray(y0)
    kd.gemv(cp.asarray(x), cp.asarray(W), None if bias is None else cp.asarray(bias), y, epilogue)
    _close(y, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,S,D,slot", [(1, 12, 1024, 64, 0), (3, 2, 32, 16, 17), (8, 12, 1024, 64, 700),
                                          (2, 3, 40, 20, 39)])
def test_attend_kernel_equals_twin(cp, kd, B, H, S, D, slot):
    rng = np.random.default_rng(S + slot)
    qkv = rng.standard_normal((B, 3 * H * D)).astype(np.float32)
    k, v = (rng.standard_normal((B, H, S, D)).astype(np.float32) for _ in range(2))
    kept = (rng.random((B, S)) < 0.7).astype(np.int32)
    s = np.array([slot], np.int32)
    refs = [k.copy(), v.copy(), np.zeros((B, H * D), np.float32)]
    Reference.attend(qkv, refs[0], refs[1], kept, s, refs[2], H)
    dk, dv, out = cp.asarray(k), cp.asarray(v), cp.zeros((B, H * D), cp.float32)
    kd.attend(cp.asarray(qkv), dk, dv, cp.asarray(kept), cp.asarray(s), out, H)
    np.testing.assert_array_equal(to_numpy(dk), refs[0])  # the new key and value, written at the slot
    np.testing.assert_array_equal(to_numpy(dv), refs[1])
    _close(out, refs[2], 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B,C", [(1, 768), (5, 32), (8, 33)])
def test_embed_layernorm_argmax_advance_kernels_equal_twins(cp, kd, B, C):
    rng = np.random.default_rng(C)
    V, P, S = 1000, 40, 48
    wte, wpe = rng.standard_normal((V, C)).astype(np.float32), rng.standard_normal((P, C)).astype(np.float32)
    tok, pos = rng.integers(0, V, B).astype(np.int32), rng.integers(0, P, B).astype(np.int32)
    x = np.zeros((B, C), np.float32)
    Reference.embed(tok, pos, wte, wpe, x)
    dx = cp.zeros((B, C), cp.float32)
    kd.embed(cp.asarray(tok), cp.asarray(pos), cp.asarray(wte), cp.asarray(wpe), dx)
    np.testing.assert_array_equal(to_numpy(dx), x)
    g, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    y, dy = np.zeros_like(x), cp.zeros((B, C), cp.float32)
    Reference.layernorm(x + 3.0, g, b, 1e-5, y)
    kd.layernorm(cp.asarray(x + 3.0), cp.asarray(g), cp.asarray(b), 1e-5, dy)
    _close(dy, y, 1e-5)
    logits = rng.standard_normal((B, V)).astype(np.float32)
    logits[0, [7, 300]] = 10.0  # a tie: the first index wins
    if B > 1:
        logits[1, [5, 9]] = np.nan  # the first NaN wins, as NumPy's argmax
    state = [np.zeros(B, np.int32), np.zeros((B, S), np.int32), np.array([3], np.int32)]
    dstate = [cp.asarray(a) for a in state]
    Reference.argmax(logits, *state)
    kd.argmax(cp.asarray(logits), *dstate)
    for a, da in zip(state, dstate):
        np.testing.assert_array_equal(to_numpy(da), a)
    counters = [pos, np.array([9], np.int32), np.array([3], np.int32), np.zeros((B, S), np.int32)]
    dcounters = [cp.asarray(a) for a in counters]
    Reference.advance(*counters)
    kd.advance(*dcounters)
    for a, da in zip(counters, dcounters):
        np.testing.assert_array_equal(to_numpy(da), a)


@pytest.mark.gpu
def test_kernel_step_equals_twin_step(cp, kd):
    """One whole step through the launchers (not captured) against the twin on the same buffers."""
    model = random_gpt(seed=11)
    idx = prompts(3, 5, seed=12)
    ref = GraphDecoder(model, 3, backend="reference")
    ref(idx, 1)
    weights, _ = gather_weights(model)
    dweights = {k: None if a is None else cp.asarray(a) for k, a in weights.items()}
    dstate = DecodeState(**{k: (cp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in vars(ref.state).items()})
    decode_step(Reference, weights, ref.state)
    decode_step(kd, dweights, dstate)
    _close(dstate.logits, ref.state.logits, 1e-4)
    for name in ("tok", "pos", "slot", "step", "kept", "out"):
        np.testing.assert_array_equal(to_numpy(getattr(dstate, name)), getattr(ref.state, name))


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 8])
def test_graph_decoder_gives_generate_tokens(cp, B):
    model = random_gpt(seed=B).to("cuda")
    dec = GraphDecoder(model, B)
    for seed, T, n in ((1, 5, 20), (2, 9, 23)):  # the second call replays the graph captured by the first
        idx = cp.asarray(prompts(B, T, seed=seed))
        np.testing.assert_array_equal(to_numpy(dec(idx, n)), want(model, idx, n))
    lens = np.random.default_rng(B).integers(1, 10, B)
    idx, mask = left_pad([np.arange(1, 1 + k) for k in lens])
    got = dec(cp.asarray(idx), 16, cp.asarray(mask))
    np.testing.assert_array_equal(to_numpy(got), want(model, cp.asarray(idx), 16, cp.asarray(mask)))
    assert dec._graph is not None


@pytest.mark.gpu
def test_graph_decoder_on_lora_and_gpt2_shapes(cp):
    peft_model = lora_model(seed=13)
    peft_model.to("cuda")
    idx = cp.asarray(prompts(2, 6, seed=14))
    np.testing.assert_array_equal(to_numpy(generate_graph(peft_model, idx, 12)), want(peft_model, idx, 12))
    model = random_gpt(seed=15, n_embd=768, n_head=12, n_layer=2, vocab_size=50257, block_size=1024).to("cuda")
    idx = cp.asarray(prompts(2, 32, seed=16, V=50257))
    got = to_numpy(generate_graph(model, idx, 24))
    agree = (got == want(model, idx, 24)).mean()
    assert agree > 0.95, agree  # float32 on both sides; a near-tie may flip one argmax and the rest of its row
