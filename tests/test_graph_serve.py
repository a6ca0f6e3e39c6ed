"""The multi-adapter server's decode step in a CUDA graph (minipeft/serve_graph.py, kernels/decode.cu).

On the CPU: the server's graph path with the NumPy twin of the step (``graph_backend="reference"``:
the same orchestration, buffers and per-row LoRA ops as the captured kernels) gives the tokens of
the same server's Python loop (``graph_decode=False``, ``greedy_batch`` with BGMV per row) for a
tiny float32 GPT with adapters of ranks 2, 4 and 8 padded in one class: rows with and without
adapters, prompts of different lengths, more rows than one decoder takes, eos; the decoders are
kept between waves and read the server's stacks in place; a server the graph cannot run says why
and decodes through the loop. Marked ``gpu``: ``lora_shrink`` and ``gemv_lora_rows`` against
their twins, and the server's captured graph against its loop, token for token.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from minipeft.backend import to_numpy
from minipeft.decoding.graph import MAX_ROWS, Reference
from minipeft.peft import LoraConfig, from_pretrained, get_peft_model, save_adapter
from minipeft.quant.modules import quantize_model
from minipeft.serve import LoraServer, Request, ServeConfig, greedy_batch, slot_nbytes
from minipeft.serve_graph import ServedGraphDecoder

from .test_graph_decode import CFG, _close, random_gpt  # the plain decoder's tiny GPT and float32 comparison
SPECS = {  # three ranks in one class of max_rank 8; different targets; alphas; a layer subset
    "r2": dict(r=2, lora_alpha=4, target_modules=["c_attn"]),
    "r4": dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], layers_to_transform=[1]),
    "r8": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"]),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("graph_adapters"))
    paths = {}
    for i, (name, kw) in enumerate(SPECS.items()):
        pm = get_peft_model(random_gpt(), LoraConfig(init_lora_weights=False, seed=i, **kw))
        rng = np.random.default_rng(10 + i)
        for n, p in pm.named_parameters():  # adapters strong enough to change the greedy tokens
            if "lora_" in n:
                p.data = (0.4 * rng.standard_normal(p.shape)).astype(p.dtype)
        paths[name] = save_adapter(pm, os.path.join(root, name))
    return paths


def server(adapters, model=None, **kw):
    srv = LoraServer(model if model is not None else random_gpt(), ServeConfig(max_rank=8, **kw))
    for name, path in adapters.items():
        srv.add_adapter(name, path)
    return srv


def requests(names, seed=0, n_new=7, lengths=(1, 9)):
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(0, CFG["vocab_size"], int(rng.integers(*lengths))), a, n_new) for a in names]


def tokens(results):
    assert all(r.ok for r in results), [r.error for r in results]
    return [r.tokens.tolist() for r in results]


# ------------------------------------------------------------------ the twin of the step on the CPU


MIXED = ["r8", None, "r2", "r4", "r8", None, "r4"]


def test_graph_path_gives_the_loops_tokens(adapters):
    graph, loop = server(adapters, graph_backend="reference"), server(adapters, graph_decode=False)
    assert graph.graph_decodable() is None
    reqs = requests(MIXED, seed=1)
    got, want = tokens(graph.generate(reqs)), tokens(loop.generate(reqs))
    assert got == want
    assert graph.stats["graph_waves"] == 1 and loop.stats["graph_waves"] == 0
    for key in ("prefill_tokens", "decode_tokens", "waves", "device_loads"):  # the same work, counted alike
        assert graph.stats[key] == loop.stats[key], key
    assert graph.stats["decode_tokens"] == len(reqs) * (7 - 1) and graph.stats["decode_s"] > 0
    # the adapters matter: each adapter's rows differ from the base on the same prompts
    base = tokens(loop.generate([Request(q.prompt, None, q.max_new_tokens) for q in reqs]))
    assert all(g != b for g, b, q in zip(got, base, reqs) if q.adapter), "an adapter changed no token"


def test_graph_path_equals_each_adapter_merged_and_decoded_alone(adapters):
    srv = server(adapters, graph_backend="reference")
    reqs = requests(["r4", "r2", None, "r8"], seed=2, n_new=9)
    for q, got in zip(reqs, tokens(srv.generate(reqs))):
        m = random_gpt() if q.adapter is None else from_pretrained(random_gpt(), adapters[q.adapter]).merge_and_unload()
        p = np.asarray(q.prompt)
        assert got == m.generate(p[None], q.max_new_tokens, greedy=True)[0, len(p):].tolist(), q.adapter


def test_more_rows_than_a_decoder_takes_and_per_request_lengths(adapters):
    graph, loop = server(adapters, graph_backend="reference"), server(adapters, graph_decode=False)
    names = (MIXED * 2)[:MAX_ROWS + 3]  # 11 rows: a group of 8, then one of 3
    reqs = [Request(q.prompt, q.adapter, 2 + k % 6) for k, q in enumerate(requests(names, seed=3))]
    got = tokens(graph.generate(reqs))
    assert got == tokens(loop.generate(reqs))
    assert [len(t) for t in got] == [q.max_new_tokens for q in reqs]
    assert sorted(graph._graph.decoders) == [3, MAX_ROWS]
    capped = server(adapters, graph_backend="reference", graph_max_rows=MAX_ROWS + 2)  # a larger wave: the loop
    assert tokens(capped.generate(reqs)) == got and capped.stats["graph_waves"] == 0
    assert tokens(capped.generate(reqs[:MAX_ROWS + 2])) == got[:MAX_ROWS + 2] and capped.stats["graph_waves"] == 1


def test_eos_ends_rows_as_the_loop_does(adapters):
    graph, loop = server(adapters, graph_backend="reference"), server(adapters, graph_decode=False)
    reqs = requests(MIXED[:4], seed=4, n_new=20)
    free = tokens(loop.generate(reqs))
    eos = free[1][2]  # a token one row emits early
    got, want = tokens(graph.generate(reqs, eos_token_id=eos)), tokens(loop.generate(reqs, eos_token_id=eos))
    assert got == want
    assert any(len(t) < 20 and t[-1] == eos for t in got)
    for t, f in zip(got, free):  # each row: its free run, cut at its first eos
        assert t == (f[: f.index(eos) + 1] if eos in f else f)
    # every row ends at once: the group stops early (fewer decode steps counted than the budget)
    same = [Request(reqs[1].prompt, reqs[1].adapter, 24)] * 2  # eos at its 3rd token; 24 fit block_size
    g0 = graph.stats["decode_tokens"]
    assert tokens(graph.generate(same, eos_token_id=eos)) == tokens(loop.generate(same, eos_token_id=eos))
    assert graph.stats["decode_tokens"] - g0 < 2 * 23


def test_decoders_are_kept_and_read_the_stacks_in_place(adapters):
    per = ServeConfig(max_rank=8)  # two slots: the third adapter evicts one, set_slot writes in place
    small = server(adapters, graph_backend="reference", device_budget_bytes=2 * slot_nbytes(random_gpt(), per))
    loop = server(adapters, graph_decode=False)
    layer = small.layers["transformer.h.0.attn.c_attn"]
    stack = layer.lora_A[0]
    for k, names in enumerate((["r2", "r4", None], ["r8", None, "r2"], ["r4", "r8", "r4"])):
        reqs = requests(names, seed=10 + k)
        assert tokens(small.generate(reqs)) == tokens(loop.generate(reqs))
    assert small.stats["device_evictions"] >= 2 and layer.lora_A[0] is stack
    dec = small._graph.decoders[3]
    assert list(small._graph.decoders) == [3]
    assert dec.weights["transformer.h.0.attn.c_attn.lora_A"] is stack  # the server's own array, not a copy
    assert dec.weights["transformer.h.0.attn.c_attn.weight"] is layer.base_layer.weight.data
    small.generate(requests(["r8", "r2", None], seed=20))
    assert small._graph.decoders[3] is dec


def test_twin_ops_are_bgmv():
    """lora_shrink + gemv_lora = the server's BGMV added to the base product, before the epilogue."""
    from minipeft.serve import bgmv_reference

    rng = np.random.default_rng(0)
    B, N, R, n_in, n_out = 5, 3, 6, 12, 9
    x = rng.standard_normal((B, n_in)).astype(np.float32)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)
    A, Bs = rng.standard_normal((N, R, n_in)).astype(np.float32), rng.standard_normal((N, n_out, R)).astype(np.float32)
    s, slot = rng.random(N).astype(np.float32), np.array([2, -1, 0, 2, 1], np.int32)
    u = np.full((B, R), np.nan, np.float32)
    Reference.lora_shrink(x, A, slot, u)
    assert np.all(u[1] == 0) and np.allclose(u[0], A[2] @ x[0], rtol=1e-5)
    pre = bgmv_reference(x @ W.T, x, A, Bs, slot, s)  # (B, out): the base product + each row's LoRA
    for epilogue in ("none", "gelu", "residual"):
        y0 = rng.standard_normal((B, n_out)).astype(np.float32)
        y = y0.copy()
        Reference.gemv_lora(x, W, None, u, Bs, s, slot, y, epilogue)
        expect = {"none": pre, "residual": y0 + pre,
                  "gelu": 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))}[epilogue]
        np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)
        if epilogue == "none":
            np.testing.assert_array_equal(y[1], (x @ W.T)[1])  # a base row: the base product alone


# ------------------------------------------------------------------ what keeps the loop


def test_refusals_say_why_and_the_loop_still_runs(adapters):
    reqs = requests(["r2", None, "r8"], seed=5)
    want = tokens(server(adapters, graph_decode=False).generate(reqs))
    cases = {
        "graph_decode is False": dict(graph_decode=False),
        "rank classes": dict(rank_classes=(2, 8), graph_backend="reference"),
        "CPU": dict(),  # the default backend is the GPU's graph, and this model is on the CPU
        "use_kernels": dict(use_kernels=False),
    }
    for words, kw in cases.items():
        srv = server(adapters, **kw)
        reason = srv.graph_decodable()
        assert reason and words in reason, (words, reason)
        assert tokens(srv.generate(reqs)) == want and srv.stats["graph_waves"] == 0, words
    q = random_gpt()
    quantize_model(q)
    reason = server(adapters, q, graph_backend="reference").graph_decodable()
    assert "Linear4bit" in reason and "float32 Linear" in reason
    reason = server(adapters, random_gpt(dtype="float64"), graph_backend="reference").graph_decodable()
    assert "float64" in reason
    with pytest.raises(ValueError, match="graph_backend"):
        ServeConfig(graph_backend="gpu")
    with pytest.raises(ValueError, match="graph_max_rows"):
        ServeConfig(graph_max_rows=0)


def test_a_decoder_checks_its_rows_and_slots(adapters):
    srv = server(adapters, graph_backend="reference")
    dec = ServedGraphDecoder(srv.model, 2, backend="reference")
    assert dec.state.lora_h.shape == (2, 8)
    with pytest.raises(ValueError, match="slots"):
        dec.decode([np.array([1, 2]), np.array([3])], [0, srv.n_slots], 3)
    with pytest.raises(ValueError, match="2 prompts"):
        dec.decode([np.array([1, 2])], [0], 3)
    # prompts of different lengths with the base only: greedy_batch's tokens
    prompts = [np.array([5, 6, 7, 8]), np.array([9])]
    np.testing.assert_array_equal(dec.decode(prompts, [-1, -1], 6), greedy_batch(srv.model, prompts, 6))


# ------------------------------------------------------------------ the kernels and the graph (GPU)


@pytest.fixture(scope="module")
def kd():
    from minipeft.kernels import decode

    return decode


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("n_in,R", [(32, 4), (768, 16), (33, 5), (3072, 40)])
def test_lora_shrink_kernel_equals_twin(cp, kd, B, n_in, R):
    rng = np.random.default_rng(B * n_in + R)
    N = 4
    x = rng.standard_normal((B, n_in)).astype(np.float32)
    A = (rng.standard_normal((N, R, n_in)) / np.sqrt(n_in)).astype(np.float32)
    slot = rng.integers(-1, N, B).astype(np.int32)
    slot[0] = N - 1
    ref = np.full((B, R), np.nan, np.float32)
    Reference.lora_shrink(x, A, slot, ref)
    u = cp.full((B, R), cp.nan, cp.float32)
    kd.lora_shrink(cp.asarray(x), cp.asarray(A), cp.asarray(slot), u)
    _close(u, ref)
    assert np.all(to_numpy(u)[slot < 0] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("n_in,n_out,R", [(32, 96, 4), (768, 2304, 16), (3072, 768, 40), (33, 17, 5)])
@pytest.mark.parametrize("epilogue", ["none", "gelu", "residual"])
def test_gemv_lora_kernel_equals_twin(cp, kd, B, n_in, n_out, R, epilogue):
    rng = np.random.default_rng(B + n_in + R)
    N = 3
    x = rng.standard_normal((B, n_in)).astype(np.float32)
    W = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if n_in != 33 else None
    u = rng.standard_normal((B, R)).astype(np.float32)
    LB = rng.standard_normal((N, n_out, R)).astype(np.float32)
    scales = rng.random(N).astype(np.float32) + 0.5
    slot = rng.integers(-1, N, B).astype(np.int32)
    slot[0] = 1
    y0 = rng.standard_normal((B, n_out)).astype(np.float32)
    ref = y0.copy()
    Reference.gemv_lora(x, W, bias, u, LB, scales, slot, ref, epilogue)
    y = cp.asarray(y0)
    kd.gemv_lora(cp.asarray(x), cp.asarray(W), None if bias is None else cp.asarray(bias), cp.asarray(u),
                 cp.asarray(LB), cp.asarray(scales), cp.asarray(slot), y, epilogue)
    _close(y, ref)
    plain = y0.copy()  # a row with no adapter gets exactly what the plain kernel gives it
    yp = cp.asarray(plain)
    kd.gemv(cp.asarray(x), cp.asarray(W), None if bias is None else cp.asarray(bias), yp, epilogue)
    base_rows = slot < 0
    np.testing.assert_array_equal(to_numpy(y)[base_rows], to_numpy(yp)[base_rows])


@pytest.mark.gpu
def test_server_graph_on_cuda_equals_its_loop(cp, adapters):
    per = slot_nbytes(random_gpt(), ServeConfig(max_rank=8))
    graph = server(adapters, random_gpt().to("cuda"), device_budget_bytes=2 * per)  # two slots: evictions
    loop = server(adapters, random_gpt().to("cuda"), graph_decode=False)
    assert graph.graph_decodable() is None
    waves = [requests(MIXED, seed=30, n_new=12), requests((MIXED * 2)[:MAX_ROWS + 2], seed=31, n_new=9),
             requests(["r4", "r8", None, "r2"], seed=32, n_new=15), requests(MIXED, seed=33, n_new=12)]
    graphs = None
    for k, reqs in enumerate(waves):  # three adapters through two slots: a wave of them runs as two waves
        assert tokens(graph.generate(reqs)) == tokens(loop.generate(reqs)), k
        if k == 0:
            graphs = {rows: dec._graph for rows, dec in graph._graph.decoders.items()}
    assert graph.stats["graph_waves"] >= len(waves) and graph.stats["device_evictions"] > 0
    assert graphs and all(g is not None for g in graphs.values())
    for rows, g in graphs.items():  # captured once, replayed for the later waves of as many rows
        assert graph._graph.decoders[rows]._graph is g, rows
    reqs = requests(MIXED[:4], seed=34, n_new=20)
    free = tokens(loop.generate(reqs))
    eos = free[0][3]
    assert tokens(graph.generate(reqs, eos_token_id=eos)) == tokens(loop.generate(reqs, eos_token_id=eos))
