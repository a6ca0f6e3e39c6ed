"""Greedy and beam search (minipeft.decoding): agreement with GPT.generate, exhaustive search on a
crafted model, beam search beating greedy, no-repeat n-grams, batching with left padding, PEFT models."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from minipeft.decoding import (DecodeConfig, banned_ngram_tokens, beam_search, decode, greedy_search, length_norm,
                               sequence_log_prob)
from minipeft.gpt import GPT, GPTConfig
from minipeft.kv_cache import KVCache
from minipeft.peft import (LoraConfig, PfeifferConfig, PrefixTuningConfig, PromptTuningConfig, TopKBlocksConfig,
                           get_peft_model)


def tiny_gpt(dtype="float32", seed=0, vocab=40, block=64):
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=block, vocab_size=vocab, dtype=dtype), seed=seed)


def prompts(B=4, T=7, vocab=40, seed=0):
    x = np.random.default_rng(seed).integers(0, vocab, (B, T))
    mask = np.ones((B, T), bool)
    mask[0, :3] = False  # left padding on two rows
    mask[2, :1] = False
    return x, mask


def strip(row, eos):
    hit = np.flatnonzero(row == eos) if eos is not None else []
    return row[:hit[0]] if len(hit) else row


# ---- greedy --------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("eos", [None, 5])
def test_greedy_equals_generate(masked, eos):
    m = tiny_gpt()
    x, mask = prompts()
    am = mask if masked else None
    want = m.generate(x, 20, greedy=True, attention_mask=am, eos_token_id=eos)
    got = greedy_search(m, x, 20, attention_mask=am, eos_token_id=eos)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False),
    PfeifferConfig(adapter_size=4),
    TopKBlocksConfig(top_k_blocks=1),
    PrefixTuningConfig(num_virtual_tokens=3),
    PromptTuningConfig(num_virtual_tokens=3),
], ids=["lora", "adapter", "top2", "prefix", "prompt"])
def test_greedy_and_beam_one_on_peft_models(config):
    model = get_peft_model(tiny_gpt(), config)
    x, mask = prompts()
    want = model.generate(x, 12, greedy=True, attention_mask=mask, eos_token_id=7)
    assert np.array_equal(greedy_search(model, x, 12, attention_mask=mask, eos_token_id=7), want)
    beams = beam_search(model, x, num_beams=1, max_new_tokens=12, eos_token_id=7, attention_mask=mask)
    for b, row in zip(beams, np.asarray(want)[:, x.shape[1]:]):
        assert np.array_equal(b, strip(row, 7))


@pytest.mark.parametrize("eos", [None, 3])
def test_beam_size_one_is_greedy(eos):
    m = tiny_gpt("float64", seed=1)
    x, mask = prompts(B=5, seed=1)
    g = greedy_search(m, x, 25, eos_token_id=eos, attention_mask=mask)[:, x.shape[1]:]
    b = beam_search(m, x, num_beams=1, max_new_tokens=25, eos_token_id=eos, attention_mask=mask)
    assert all(np.array_equal(bb, strip(gg, eos)) for bb, gg in zip(b, g))


def test_decoding_stops_at_block_size_and_checks_input():
    m = tiny_gpt(block=16)
    x = np.zeros((2, 10), np.int64)
    assert greedy_search(m, x, 50).shape == (2, 16 + 1)  # the last token needs no position of its own
    assert all(len(o) == 7 for o in beam_search(m, x, 3, 50))
    with pytest.raises(ValueError, match="do not fit block_size"):
        greedy_search(m, np.zeros((1, 17), np.int64), 3)
    with pytest.raises(ValueError, match="shape"):
        greedy_search(m, np.zeros(5, np.int64), 3)
    with pytest.raises(ValueError, match="num_beams"):
        DecodeConfig(num_beams=0)


# ---- beam search ---------------------------------------------------------------------------------
class Markov:
    """A second-order Markov 'model' with GPT.forward's signature: logits depend on the last two
    tokens, and the cache holds the token history, so a wrongly reordered cache shows up."""

    def __init__(self, log_table):
        self.table = log_table  # (V, V, V): log p(next | prev2, prev1)
        V = log_table.shape[0]
        self.config = SimpleNamespace(block_size=64, vocab_size=V)
        self.training = False
        self.calls = 0

    def __call__(self, idx, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False, **kw):
        self.calls += 1
        idx = np.asarray(idx)
        hist = idx if past_key_values is None else np.concatenate(
            [past_key_values[0][0][:, 0, :, 0].astype(np.int64), idx], axis=1)
        logits = self.table[hist[:, -2], hist[:, -1]][:, None, :]  # (B, 1, V)
        kv = hist[:, None, :, None].astype(np.float64)  # (B, 1, S, 1)
        return SimpleNamespace(logits=logits, past_key_values=KVCache([(kv, kv)]))

    def log_prob(self, prompt, seq):
        hist, total = list(prompt), 0.0
        for t in seq:
            total += self.table[hist[-2], hist[-1], t]
            hist.append(t)
        return total


def random_markov(V=4, seed=0):
    p = np.random.default_rng(seed).dirichlet(np.full(V, 0.5), size=(V, V))
    return Markov(np.log(p))


def brute_force(model, prompt, eos, L, alpha, style):
    """The best normalised score over every output of at most L tokens (ended by eos or by L)."""
    V = model.config.vocab_size
    best, arg = -np.inf, None
    for n in range(1, L + 1):
        for seq in itertools.product(range(V), repeat=n):
            if eos in seq[:-1] or (n < L and seq[-1] != eos):
                continue
            s = model.log_prob(prompt, seq) / length_norm(n, alpha, style)
            if s > best:
                best, arg = s, [t for t in seq if t != eos]
    return best, arg


@pytest.mark.parametrize("alpha,style", [(0.0, "hf"), (1.0, "hf"), (0.8, "gnmt"), (-0.5, "hf")])
def test_wide_beam_is_exhaustive(alpha, style):
    """With K at least the number of outputs, beam search must find the brute-force optimum."""
    model, eos, L = random_markov(), 0, 3
    x = np.array([[1, 2], [3, 3], [2, 1]])
    outs, scores = beam_search(model, x, num_beams=64, max_new_tokens=L, eos_token_id=eos, length_penalty=alpha,
                               length_penalty_style=style, return_scores=True)
    for row, out, sc in zip(x, outs, scores):
        best, arg = brute_force(model, row, eos, L, alpha, style)
        assert sc == pytest.approx(best, abs=1e-12)
        assert list(out) == arg


def test_beam_search_beats_greedy_on_a_crafted_case():
    """Greedy takes 'a' (0.5) then finds nothing good; beam search keeps 'b' (0.4), whose eos has 0.9."""
    V, eos, A, Bt, C = 4, 0, 1, 2, 3
    p = np.full((V, V, V), 0.25)
    p[C, C] = [0.1, 0.5, 0.4, 0.0]  # after the prompt (c, c)
    p[C, A] = [0.25, 0.25, 0.25, 0.25]  # after a: flat
    p[C, Bt] = [0.9, 0.05, 0.05, 0.0]  # after b: eos is likely
    model = Markov(np.log(p + 1e-12))
    x = np.array([[C, C]])
    g = greedy_search(model, x, 5, eos_token_id=eos)[0, 2:]
    b = beam_search(model, x, num_beams=2, max_new_tokens=5, eos_token_id=eos, length_penalty=0.0)[0]
    assert g[0] == A and list(b) == [Bt]
    score = lambda seq: model.log_prob([C, C], list(seq) + [eos])  # noqa: E731
    assert score(b) > score(strip(g, eos)) + 0.5


def test_beam_search_scores_real_model():
    """On a GPT the returned score is the output's log-probability, and beam >= greedy."""
    m = tiny_gpt("float64", seed=3, vocab=12)
    x = np.random.default_rng(3).integers(1, 12, (6, 5))
    g = greedy_search(m, x, 6, eos_token_id=0)[:, 5:]
    outs, scores = beam_search(m, x, num_beams=4, max_new_tokens=6, eos_token_id=0, length_penalty=0.0,
                               return_scores=True)
    gains = []
    for row, gr, out, sc in zip(x, g, outs, scores):
        full = lambda s: list(s) + ([0] if len(s) < 6 else [])  # noqa: E731
        assert sequence_log_prob(m, row, full(out)) == pytest.approx(sc, abs=1e-9)
        gains.append(sc - sequence_log_prob(m, row, full(strip(gr, 0))))
    assert min(gains) >= -1e-9 and max(gains) > 0


def test_cache_is_reordered_per_beam():
    model = random_markov(V=5, seed=4)
    x = np.array([[1, 2], [4, 4]])
    outs, scores = beam_search(model, x, num_beams=3, max_new_tokens=6, eos_token_id=None, length_penalty=0.0,
                               return_scores=True)
    for row, out, sc in zip(x, outs, scores):  # the reported score is the true one only if each beam kept its history
        assert len(out) == 6
        assert model.log_prob(row, out) == pytest.approx(sc, abs=1e-12)


# ---- no-repeat n-grams ---------------------------------------------------------------------------
def test_banned_ngram_tokens():
    seqs = np.array([[1, 2, 3, 1, 2], [5, 5, 5, 5, -1]])
    rows, toks = banned_ngram_tokens(seqs, 3)
    assert sorted(zip(rows.tolist(), toks.tolist())) == [(0, 3)]  # "1 2" was followed by 3; padding matches nothing
    rows, toks = banned_ngram_tokens(np.array([[5, 5, 5, 5]]), 2)
    assert set(toks.tolist()) == {5}


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram(num_beams):
    m = tiny_gpt(seed=5, vocab=8)  # a small vocabulary repeats itself quickly
    x = np.random.default_rng(5).integers(0, 8, (3, 4))
    n = 3
    plain = decode(m, list(x), DecodeConfig(num_beams=num_beams, max_new_tokens=30))
    outs = decode(m, list(x), DecodeConfig(num_beams=num_beams, max_new_tokens=30, no_repeat_ngram_size=n))

    def repeats(seq):
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        return len(grams) - len(set(grams))
    assert sum(repeats(list(p) + list(o)) for p, o in zip(x, plain)) > 0  # the test would be empty otherwise
    assert all(repeats(list(p) + list(o)) == 0 for p, o in zip(x, outs))
    gen_only = decode(m, list(x), DecodeConfig(num_beams=num_beams, max_new_tokens=30, no_repeat_ngram_size=n,
                                               ngram_include_prompt=False))
    assert all(repeats(list(o)) == 0 for o in gen_only)


# ---- batches of prompts --------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
def test_decode_batched_equals_one_by_one(num_beams):
    m = tiny_gpt("float64", seed=6)
    rng = np.random.default_rng(6)
    ps = [rng.integers(0, 40, n) for n in (3, 9, 5, 9, 1, 6, 2)]
    cfg = DecodeConfig(num_beams=num_beams, max_new_tokens=10, eos_token_id=4, batch_size=3, length_penalty=0.8)
    batched = decode(m, ps, cfg)
    single = [decode(m, [p], cfg)[0] for p in ps]
    assert all(np.array_equal(a, b) for a, b in zip(batched, single))
    assert all(4 not in o for o in batched)
