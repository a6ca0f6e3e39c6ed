"""minipeft.serve: many LoRA adapters on one base model, in mixed batches (CPU, NumPy twins).

Every request of a mixed batch must get the tokens its own adapter, merged into the base and
decoded alone, gives (greedy, float64 so rounding cannot flip an argmax); a bad request gets
its own error and leaves the rest of the batch unchanged; slots follow least-recently-used.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import IA3Config, LoraConfig, from_pretrained, get_peft_model, save_adapter
from minipeft.quant.modules import quantize_model
from minipeft.serve import (AdapterError, LoraServer, Request, ServeConfig, bgmv_reference, sgmv_reference,
                            slot_nbytes)

CFG = GPTConfig.preset("T0", dtype="float64")
SPECS = {  # ranks 4/8/16 mixed, different targets, alphas, rsLoRA, a layer subset
    "r4": dict(r=4, target_modules=["c_attn"]),
    "r8": dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]),
    "r16": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"],
                layers_to_transform=[1]),
    "r8b": dict(r=8, lora_alpha=4, target_modules=["mlp.c_fc", "mlp.c_proj"], alpha_pattern={"c_fc": 12}),
}


def base(cfg=CFG):
    return GPT(cfg, seed=0)


def _save(root, name, config, cfg=CFG):
    pm = get_peft_model(base(cfg), config)
    return save_adapter(pm, os.path.join(root, name))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adapters"))
    paths = {n: _save(root, n, LoraConfig(init_lora_weights=False, seed=i, **kw))
             for i, (n, kw) in enumerate(SPECS.items())}
    paths["wide"] = _save(root, "wide", LoraConfig(r=4, init_lora_weights=False),
                          GPTConfig.preset("T0", n_embd=32, dtype="float64"))
    paths["deep"] = _save(root, "deep", LoraConfig(r=4, init_lora_weights=False, layers_to_transform=[3]),
                          GPTConfig.preset("T0", n_layer=4, dtype="float64"))
    paths["dora"] = _save(root, "dora", LoraConfig(r=4, use_dora=True, init_lora_weights=False))
    paths["ia3"] = _save(root, "ia3", IA3Config())
    paths["r32"] = _save(root, "r32", LoraConfig(r=32, init_lora_weights=False))
    return paths


def server(adapters, names=SPECS, **kw):
    srv = LoraServer(base(), ServeConfig(**kw))
    for n in names:
        srv.add_adapter(n, adapters[n])
    return srv


def reference(adapters, req):
    """The request's adapter merged into a fresh base, decoded alone with GPT.generate."""
    m = base() if req.adapter is None else from_pretrained(base(), adapters[req.adapter]).merge_and_unload()
    p = np.asarray(req.prompt)
    return m.generate(p[None], req.max_new_tokens, greedy=True)[0, len(p):]


def requests(names, seed=0, n_new=6):
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(0, CFG.vocab_size, int(rng.integers(2, 14))), a, n_new) for a in names]


# ------------------------------------------------------------------ the batched path


def test_bgmv_and_sgmv_equal_a_row_loop():
    rng = np.random.default_rng(0)
    N, R, H1, H2, M = 5, 8, 12, 7, 9
    A, B = rng.standard_normal((N, R, H1)), rng.standard_normal((N, H2, R))
    s, x, y0 = rng.random(N), rng.standard_normal((M, H1)), rng.standard_normal((M, H2))
    idx = np.array([2, -1, 0, 4, 4, -1, 1, 3, 2])
    want = y0.copy()
    for m, i in enumerate(idx):
        if i >= 0:
            want[m] += s[i] * (B[i] @ (A[i] @ x[m]))
    np.testing.assert_allclose(bgmv_reference(y0.copy(), x, A, B, idx, s), want, rtol=1e-12)
    assert np.array_equal(bgmv_reference(y0.copy(), x, A, B, idx, s)[idx < 0], y0[idx < 0])  # base rows exact
    order = np.argsort(idx, kind="stable")
    srt = idx[order]
    starts = np.r_[0, np.flatnonzero(np.diff(srt)) + 1]
    got = sgmv_reference(y0[order].copy(), x[order], A, B, np.r_[starts, M], srt[starts], s)
    np.testing.assert_allclose(got, want[order], rtol=1e-12)


def test_padded_rank_equals_unpadded():
    rng = np.random.default_rng(1)
    A, B, x = rng.standard_normal((1, 4, 10)), rng.standard_normal((1, 6, 4)), rng.standard_normal((3, 10))
    Ap, Bp = np.zeros((1, 16, 10)), np.zeros((1, 6, 16))
    Ap[:, :4], Bp[:, :, :4] = A, B
    idx, s = np.zeros(3, int), np.array([0.5])
    np.testing.assert_allclose(bgmv_reference(np.zeros((3, 6)), x, Ap, Bp, idx, s),
                               bgmv_reference(np.zeros((3, 6)), x, A, B, idx, s), rtol=1e-13, atol=1e-14)


def test_kernels_decline_numpy():
    from minipeft import fast
    from minipeft.kernels.bgmv import bgmv_applies, sgmv_applies, sgmv_tiles

    z = np.zeros((2, 2), np.float32)
    bgmv_args, sgmv_args = (z, z, z[None], z[None], [0, 0], np.ones(1, np.float32)), \
        (z, z, z[None], z[None], [0, 2], [0], np.ones(1, np.float32))
    assert not bgmv_applies(*bgmv_args) and not sgmv_applies(*sgmv_args)
    assert fast.choose(bgmv_reference, *bgmv_args) is bgmv_reference  # on NumPy the twin runs
    assert fast.choose(sgmv_reference, *sgmv_args) is sgmv_reference
    seg, row0 = sgmv_tiles([0, 70, 70, 75, 140], [3, 1, -1, 0])
    assert seg.tolist() == [0, 0, 0, 3, 3, 3] and row0.tolist() == [0, 32, 64, 75, 107, 139]


# ------------------------------------------------------------------ a mixed batch = each adapter merged, alone


def test_mixed_batch_equals_merged_models_decoded_alone(adapters):
    srv = server(adapters)
    reqs = requests(["r4", None, "r16", "r8", "r4", "r8b", None, "r16", "r8", "r8b"])
    res = srv.generate(reqs)
    assert all(r.ok for r in res), [r.error for r in res]
    outs = {}
    for req, r in zip(reqs, res):
        want = reference(adapters, req)
        assert np.array_equal(r.tokens, want), (req.adapter, r.tokens, want)
        outs.setdefault(req.adapter, []).append(tuple(want))
    # the adapters matter: some request decodes differently from the base on the same prompt
    alone = [tuple(reference(adapters, Request(q.prompt, None, q.max_new_tokens))) for q in reqs]
    assert any(tuple(r.tokens) != a for r, a, q in zip(res, alone, reqs) if q.adapter)
    assert srv.stats["waves"] == 1 and srv.stats["device_loads"] == 4


def test_4bit_base_matches_peft_lora_on_the_same_4bit_base(adapters):
    cfg = GPTConfig.preset("T0")
    q_base = lambda: (lambda m: (quantize_model(m), m)[1])(GPT(cfg, seed=0))  # noqa: E731
    srv = LoraServer(q_base(), ServeConfig(target_modules=("c_attn", "c_proj", "c_fc")))
    for n in ("r4", "r16"):
        srv.add_adapter(n, adapters[n])
    reqs = requests(["r16", "r4", None, "r16"], seed=3, n_new=5)
    for req, r in zip(reqs, srv.generate(reqs)):
        m = q_base() if req.adapter is None else from_pretrained(q_base(), adapters[req.adapter])
        p = np.asarray(req.prompt)
        assert np.array_equal(r.tokens, m.generate(p[None], 5, greedy=True)[0, len(p):]), req.adapter


# ------------------------------------------------------------------ per-request errors


def test_bad_requests_get_their_own_errors_and_the_rest_is_unaffected(adapters):
    names = list(SPECS) + ["wide", "deep", "dora", "ia3", "r32"]
    srv = server(adapters, names, base_model_name=None)
    good = requests(["r4", None, "r16", "r8"], seed=5)
    clean = [r.tokens for r in server(adapters).generate(good)]
    bad = requests(["nope", "wide", "deep", "dora", "ia3", "r32"], seed=6)
    too_long = Request(np.arange(CFG.block_size), "r4", 4)
    bad_ids = Request([1, 2, CFG.vocab_size], None, 4)
    batch = [bad[0], good[0], bad[1], good[1], bad[2], bad[3], good[2], bad[4], too_long, bad[5], good[3], bad_ids]
    res = srv.generate(batch)
    errors = {q.adapter if q.adapter else id(q): r.error for q, r in zip(batch, res) if not r.ok}
    assert len(errors) == 8
    assert "unknown adapter 'nope'" in errors["nope"]
    assert "another base" in errors["wide"] and "(r, 64)" in errors["wide"]
    assert "another base" in errors["deep"] and "transformer.h.3" in errors["deep"]
    assert "DoRA" in errors["dora"] and "IA3" in errors["ia3"]
    assert "max_rank 16" in errors["r32"] and "block_size" in res[8].error and "token ids" in res[11].error
    got = [r.tokens for q, r in zip(batch, res) if r.ok]
    assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, clean))


def test_base_model_name_mismatch_is_refused(adapters, tmp_path):
    pm = get_peft_model(base(), LoraConfig(r=4, init_lora_weights=False))
    save_adapter(pm, tmp_path / "other", base_model_name_or_path="gpt2-medium")
    srv = LoraServer(base(), ServeConfig(base_model_name="minipeft/tiny"))
    srv.add_adapter("other", tmp_path / "other")
    srv.add_adapter("ok", adapters["r4"])  # no name in the file: only the shapes are checked
    res = srv.generate(requests(["other", "ok"]))
    assert "trained on 'gpt2-medium'" in res[0].error and res[1].ok
    with pytest.raises(AdapterError, match="another base"):
        srv.add_adapter("eager", tmp_path / "other", load=True)
    assert "eager" not in srv.adapters


# ------------------------------------------------------------------ memory: LRU slots, host pool, waves


def test_lru_eviction_within_the_device_budget(adapters):
    per = slot_nbytes(base(), ServeConfig())
    srv = server(adapters, device_budget_bytes=2 * per + per // 2)  # two slots
    assert srv.n_slots == 2 and srv.memory()["device_pool_bytes"] == 2 * per
    srv.generate(requests(["r4", "r8"]))
    assert srv.resident_adapters() == ["r4", "r8"]
    srv.generate(requests(["r4"]))  # r4 becomes the most recently used
    assert srv.resident_adapters() == ["r8", "r4"] and srv.stats["device_hits"] == 1
    res = srv.generate(requests(["r16", "r4"], seed=7))  # r16 needs a slot: r8 (least recent) goes
    assert srv.resident_adapters() == ["r16", "r4"] and srv.stats["device_evictions"] == 1
    assert all(np.array_equal(r.tokens, reference(adapters, q)) for q, r in zip(requests(["r16", "r4"], seed=7), res))
    assert srv.stats["disk_loads"] == 3 and srv.stats["device_loads"] == 3


def test_more_adapters_than_slots_run_in_waves(adapters):
    per = slot_nbytes(base(), ServeConfig())
    srv = server(adapters, device_budget_bytes=2 * per)
    reqs = requests(["r4", "r8", None, "r16", "r8b", "r4"], seed=8)
    res = srv.generate(reqs)
    assert srv.stats["waves"] == 2 and len(srv.resident_adapters()) == 2
    for q, r in zip(reqs, res):
        assert np.array_equal(r.tokens, reference(adapters, q)), q.adapter


def test_host_budget_rereads_evicted_adapters_from_disk(adapters):
    srv = server(adapters, host_budget_bytes=1)  # keeps only the most recent adapter in host memory
    srv.generate(requests(["r4", "r8"]))
    assert srv.host_adapters() == ["r8"] and srv.stats["host_evictions"] >= 1
    loads = srv.stats["disk_loads"]
    srv.generate(requests(["r4"]))  # still resident on the device: no disk read
    assert srv.stats["disk_loads"] == loads
    srv.remove_adapter("r4")
    assert "r4" not in srv.resident_adapters() and "unknown adapter" in srv.generate(requests(["r4"]))[0].error


def test_eos_and_per_request_lengths(adapters):
    srv = server(adapters)
    reqs = [Request([5, 6, 7], "r4", 3), Request([8, 9], None, 6)]
    res = srv.generate(reqs)
    assert len(res[0].tokens) == 3 and len(res[1].tokens) == 6
    toks = res[1].tokens.tolist()
    eos = toks[-1]
    res2 = srv.generate(reqs, eos_token_id=eos)
    assert res2[1].tokens.tolist() == toks[: toks.index(eos) + 1]


def test_bad_setups_fail_early(adapters):
    with pytest.raises(ValueError, match="holds no adapter"):
        LoraServer(base(), ServeConfig(device_budget_bytes=100))
    with pytest.raises(ValueError, match="match no Linear"):
        LoraServer(base(), ServeConfig(target_modules=("q_proj",)))
    with pytest.raises(TypeError, match="plain base model"):
        LoraServer(get_peft_model(base(), LoraConfig(r=4)))
    m = base()
    srv = LoraServer(m)
    with pytest.raises(ValueError, match="already wrapped"):
        LoraServer(m)
    srv.add_adapter("a", adapters["r4"])
    with pytest.raises(ValueError, match="already added"):
        srv.add_adapter("a", adapters["r8"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request([1, 2], "a", 0)
