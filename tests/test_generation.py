"""The one decoding loop against a plain reference that recomputes the whole sequence at every step.

Every user of ``minipeft.decoding.run`` — ``GPT.generate`` (greedy, sampling, cropping past
block_size), beam search, the multi-adapter server and side tuning, prompt and prefix tuning —
must give, for each row of a left-padded batch decoded on the key/value cache, the tokens a
naive loop gives on that row alone: run the model on the whole sequence (no cache, no padding),
take the last position's logits, choose, append. float64 models, so rounding cannot flip a choice.
"""
import copy
import os

import numpy as np
import pytest

from minipeft.decoding import beam_search, decode, generate, log_softmax, sample_next
from minipeft.engine import no_grad
from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import (LoraConfig, LSTConfig, PrefixTuningConfig, PromptTuningConfig, SideTuningConfig,
                           from_pretrained, get_peft_model, save_adapter)
from minipeft.serve import LoraServer, Request, ServeConfig

V = 29


def gpt(block=48, seed=0, **kw):
    cfg = dict(n_layer=2, n_embd=16, n_head=2, block_size=block, vocab_size=V, dtype="float64")
    return GPT(GPTConfig(**{**cfg, **kw}), seed=seed).eval()


def perturbed(model, seed=1, scale=0.3):
    """Trainable parameters moved off their (often identity) init, so the adapter changes the output."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data += scale * rng.standard_normal(p.shape).astype(p.dtype)
    return model.eval()


def ragged(n=4, seed=0, lo=2, hi=9):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, int(rng.integers(lo, hi))) for _ in range(n)]


def left_padded(prompts):
    T = max(len(p) for p in prompts)
    idx, mask = np.zeros((len(prompts), T), np.int64), np.zeros((len(prompts), T), bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):], mask[i, T - len(p):] = p, True
    return idx, mask


# ------------------------------------------------------------------ the plain references


def last_logits(model, seqs) -> np.ndarray:
    """Logits (B, V) of the last position of a full forward over ``seqs`` (B, L): no cache, no mask."""
    with no_grad():
        return np.asarray(model(np.asarray(seqs, np.int64)).logits.data[:, -1, :], np.float64)


def reference_greedy(model, prompt, n, eos=None, window=None) -> list:
    """Greedy tokens for one prompt, rerunning the whole sequence (its last ``window`` tokens) each step."""
    seq, out = list(prompt), []
    for _ in range(n):
        ctx = seq[-window:] if window else seq
        nxt = int(last_logits(model, [ctx])[0].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == eos:
            break
    return out


def reference_beam(model, prompt, K, steps, eos, alpha) -> tuple[list, float]:
    """Beam search (Hugging Face's rules, see decoding/beam.py) on one prompt, no cache: (tokens, score)."""
    running, finished = [(0.0, [])], []  # (summed log-prob, tokens); (normalised score, tokens)
    for t in range(steps):
        cands = []
        for b, (s, seq) in enumerate(running):
            lp = log_softmax(last_logits(model, [list(prompt) + seq]))[0]
            cands += [(s + lp[v], b * V + v, seq, v) for v in range(V)]
        cands = sorted(cands, key=lambda c: (-c[0], c[1]))[:2 * K]
        nxt = []
        for rank, (s, _, seq, v) in enumerate(cands):
            if v == eos:
                if rank < K:
                    finished.append((s / (t + 1) ** alpha, seq))
            elif len(nxt) < K:
                nxt.append((s, seq + [v]))
        running = nxt
        finished = sorted(finished, key=lambda f: -f[0])[:K]
        if len(finished) == K and finished[-1][0] >= running[0][0] / (t + 1) ** alpha:
            break
    else:
        finished += [(s / len(seq) ** alpha, seq) for s, seq in running]
    score, seq = max(finished, key=lambda f: f[0])
    return seq, score


def until_eos(row, eos):
    row = list(np.asarray(row))
    return row[:row.index(eos) + 1] if eos in row else row


# ------------------------------------------------------------------ GPT.generate


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_padded_batch_equals_each_prompt_alone(use_cache):
    m = gpt()
    prompts = ragged()
    idx, mask = left_padded(prompts)
    eos = int(reference_greedy(m, prompts[1], 3)[2])  # a token row 1 emits: rows end at different steps
    out = m.generate(idx, 10, greedy=True, attention_mask=mask, eos_token_id=eos, use_cache=use_cache)
    for p, row in zip(prompts, out[:, idx.shape[1]:]):
        assert until_eos(row, eos) == reference_greedy(m, p, 10, eos)


def test_generate_past_block_size_crops_like_the_reference():
    m = gpt(block=12)
    prompts = ragged(3, seed=2, lo=5, hi=9)
    idx = np.stack([p[:5] for p in prompts])
    out = m.generate(idx, 20, greedy=True)  # 25 tokens in 12 positions: the window slides
    for p, row in zip(idx, out):
        assert list(row[5:]) == reference_greedy(m, p, 20, window=12)


def test_sampling_on_the_cache_equals_the_full_recompute_loop():
    m = gpt(seed=3)
    idx = np.random.default_rng(3).integers(0, V, (3, 5))
    got = m.generate(idx, 8, temperature=0.9, top_k=7, seed=11)
    rng, seq = np.random.default_rng(11), idx.copy()
    for _ in range(8):  # the same draws, each from a full forward
        nxt = sample_next(last_logits(m, seq), False, 0.9, 7, rng)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    assert np.array_equal(got, seq)


# ------------------------------------------------------------------ beam search


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_on_a_padded_batch_equals_the_reference_per_prompt(alpha):
    m = gpt(seed=4)
    prompts = ragged(3, seed=4)
    idx, mask = left_padded(prompts)
    outs, scores = beam_search(m, idx, num_beams=3, max_new_tokens=6, eos_token_id=2, attention_mask=mask,
                               length_penalty=alpha, return_scores=True)
    for p, o, s in zip(prompts, outs, scores):
        want, want_score = reference_beam(m, p, 3, 6, 2, alpha)
        assert [t for t in want if t != 2] == list(o)
        assert s == pytest.approx(want_score, abs=1e-9)


# ------------------------------------------------------------------ PEFT models


@pytest.mark.parametrize("config", [PrefixTuningConfig(num_virtual_tokens=3), PromptTuningConfig(num_virtual_tokens=4),
                                    LoraConfig(r=2, init_lora_weights=False)], ids=["prefix", "prompt", "lora"])
def test_peft_generate_and_beam_equal_the_reference(config):
    model = perturbed(get_peft_model(gpt(seed=5), config))
    prompts = ragged(3, seed=5)
    idx, mask = left_padded(prompts)
    out = model.generate(idx, 6, greedy=True, attention_mask=mask)
    outs = beam_search(model, idx, num_beams=2, max_new_tokens=4, attention_mask=mask, length_penalty=0.0)
    for p, row, o in zip(prompts, out[:, idx.shape[1]:], outs):
        assert list(row) == reference_greedy(model, p, 6)  # the reference runs the PeftModel's own forward
        assert list(o) == reference_beam(model, p, 2, 4, None, 0.0)[0]


@pytest.mark.parametrize("config", [LSTConfig(reduction_factor=4), SideTuningConfig(reduction_factor=4)],
                         ids=["lst", "side_tuning"])
def test_side_tuning_generate_and_decode_equal_the_reference(config):
    model = perturbed(get_peft_model(gpt(block=10, seed=6), config))
    x = np.random.default_rng(6).integers(0, V, (2, 4))
    out = model.generate(x, 9, greedy=True)  # 13 tokens in 10 positions: the window slides
    assert all(list(r[4:]) == reference_greedy(model, p, 9, window=10) for p, r in zip(x, out))
    prompts = ragged(3, seed=6, lo=2, hi=6)
    idx, mask = left_padded(prompts)
    out = model.generate(idx, 10 - idx.shape[1] + 1, greedy=True, attention_mask=mask)  # up to a full window
    assert all(list(r[idx.shape[1]:]) == reference_greedy(model, p, r.size - idx.shape[1])
               for p, r in zip(prompts, out))
    beams = decode(model, prompts, max_new_tokens=4, num_beams=2, batch_size=2)  # no cache: reruns every step
    assert all(list(o) == reference_beam(model, p, 2, 4, None, 1.0)[0] for p, o in zip(prompts, beams))


# ------------------------------------------------------------------ the multi-adapter server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adapters"))
    paths = {}
    for i, name in enumerate(("a", "b")):
        pm = get_peft_model(gpt(block=24), LoraConfig(r=2 + 2 * i, init_lora_weights=False, seed=i,
                                                        target_modules=["c_attn", "c_fc"]))
        paths[name] = save_adapter(pm, os.path.join(root, name))
    return paths


def test_server_mixed_batch_equals_the_reference_per_request(served):
    srv = LoraServer(gpt(block=24), ServeConfig())
    for name, path in served.items():
        srv.add_adapter(name, path)
    prompts = ragged(5, seed=7)
    reqs = [Request(p, [None, "a", "b"][i % 3], 4 + i) for i, p in enumerate(prompts)]
    reqs.append(Request(np.arange(20) % V, "a", 3))  # 20 + 3 fits alone, but not padded beside 8 new tokens
    for req, res in zip(reqs, srv.generate(reqs)):
        m = gpt(block=24) if req.adapter is None else from_pretrained(gpt(block=24), served[req.adapter])
        assert res.ok and list(res.tokens) == reference_greedy(m, req.prompt, req.max_new_tokens), req.adapter
    assert srv.stats["waves"] == 2


def test_a_prefix_the_model_supplies_is_not_taken_twice():
    model = get_peft_model(gpt(), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"supplies \['inputs_embeds_prefix'\] itself"):
        generate(model, np.zeros((1, 3), np.int64), 2, extra={"inputs_embeds_prefix": np.zeros((1, 2, 16))})


def test_a_disabled_adapter_generates_with_the_base():
    base = gpt(seed=8)
    model = perturbed(get_peft_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=2)))
    x = np.random.default_rng(8).integers(0, V, (2, 4))
    with model.disable_adapter():
        got = model.generate(x, 5, greedy=True)
    assert all(list(r[4:]) == reference_greedy(base, p, 5) for p, r in zip(x, got))
