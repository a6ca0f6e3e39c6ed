"""minipeft.serve_scheduler: continuous batching, rank classes and per-request sampling (CPU, float64).

Whatever the arrival schedule, every request must get exactly the tokens that ``generate``
gives it alone (greedy or sampled with its own seed), while requests join and leave the
batch at every step; adapters of different ranks are held and computed at their own rank.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from minipeft import decoding
from minipeft.gpt import GPT, GPTConfig
from minipeft.peft import LoraConfig, from_pretrained, get_peft_model, save_adapter
from minipeft.serve import LoraServer, Request, ServeConfig, slot_nbytes
from minipeft.serve_scheduler import choose_tokens, poisson_arrivals, serve

CFG = GPTConfig.preset("T0", dtype="float64")
SPECS = {"r2": dict(r=2, target_modules=["c_attn"]), "r4": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
         "r8": dict(r=8, lora_alpha=16, use_rslora=True)}


def base():
    return GPT(CFG, seed=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adapters"))
    return {n: save_adapter(get_peft_model(base(), LoraConfig(init_lora_weights=False, seed=i, **kw)),
                            os.path.join(root, n)) for i, (n, kw) in enumerate(SPECS.items())}


def server(adapters, **kw):
    srv = LoraServer(base(), ServeConfig(**kw))
    for n, p in adapters.items():
        srv.add_adapter(n, p)
    return srv


def workload(n=12, seed=0, horizon=10):
    """Greedy and sampled requests (temperature, top-k, top-p), adapters of ranks 2/4/8 and the base."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        kw = dict(do_sample=j % 2 == 1, temperature=[0.7, 1.3][j % 3 == 0], top_k=[None, 6][j % 3 == 1],
                  top_p=[None, 0.8][j % 4 == 3], seed=100 + j)
        out.append(Request(rng.integers(0, CFG.vocab_size, int(rng.integers(2, 14))), [None, "r2", "r4", "r8"][j % 4],
                           int(rng.integers(1, 8)), arrival=float(rng.integers(0, horizon)), **kw))
    return out


def alone(adapters, q, eos=None):
    """The request decoded alone by generate: its adapter loaded with from_pretrained, its own seed."""
    m = base() if q.adapter is None else from_pretrained(base(), adapters[q.adapter])
    p = np.asarray(q.prompt)
    out = m.generate(p[None], q.max_new_tokens, greedy=not q.do_sample, temperature=q.temperature, top_k=q.top_k,
                     top_p=q.top_p, seed=q.seed, eos_token_id=eos)
    return out[0, len(p):]


def test_outputs_equal_generate_alone_whatever_the_arrival_order(adapters):
    reqs = workload()
    want = [alone(adapters, q) for q in reqs]
    rng = np.random.default_rng(1)
    for schedule in range(3):  # the given schedule, then shuffled arrival times
        if schedule:
            times = rng.permutation([q.arrival for q in reqs])
            for q, t in zip(reqs, times):
                q.arrival = float(t)
        rep = serve(server(adapters, rank_classes=(2, 4, 8)), reqs, max_batch_size=4, step_time=1.0)
        for q, r, w in zip(reqs, rep.results, want):
            assert r.ok and np.array_equal(r.tokens, w), (schedule, q.adapter, q.do_sample)
        assert max(rep.batch_sizes) == 4 and len(set(rep.batch_sizes)) > 1  # rows joined and left
        assert np.all(rep.finish >= rep.arrival) and np.all(rep.first_token <= rep.finish)


def test_requests_join_at_the_next_step_and_leave_when_done(adapters):
    p = np.arange(3) + 5
    reqs = [Request(p, "r2", 5, arrival=0.0), Request(p, "r4", 2, arrival=0.0), Request(p, None, 3, arrival=2.0)]
    rep = serve(server(adapters), reqs, step_time=1.0)
    assert rep.batch_sizes == [2, 2, 2, 2, 2]  # r4 leaves after step 2, the third joins at step 3 in its row
    np.testing.assert_array_equal(rep.first_token, [1.0, 1.0, 3.0])
    np.testing.assert_array_equal(rep.finish, [5.0, 2.0, 5.0])
    assert rep.tokens == 10 and rep.throughput == 2.0 and rep.steps == 5


def test_eos_ends_a_request_and_frees_its_row(adapters):
    reqs = workload(8, seed=3)
    eos = int(alone(adapters, reqs[0])[1]) if reqs[0].max_new_tokens > 1 else 7
    rep = serve(server(adapters), reqs, max_batch_size=3, eos_token_id=eos, step_time=1.0)
    for q, r in zip(reqs, rep.results):
        np.testing.assert_array_equal(r.tokens, alone(adapters, q, eos))


def test_a_request_waits_for_a_free_slot_of_its_rank_class(adapters):
    per = slot_nbytes(base(), ServeConfig(max_rank=8))
    srv = server(adapters, max_rank=8, device_budget_bytes=per)  # one slot: adapters take turns
    reqs = workload(8, seed=4, horizon=3)
    rep = serve(srv, reqs, max_batch_size=8, step_time=1.0)
    for q, r in zip(reqs, rep.results):
        np.testing.assert_array_equal(r.tokens, alone(adapters, q))
    assert srv.stats["device_evictions"] >= 2


def test_bad_requests_get_their_own_errors(adapters):
    reqs = workload(4, seed=5) + [Request([1, 2], "nope", 3), Request([1, CFG.vocab_size], None, 3)]
    rep = serve(server(adapters), reqs, step_time=1.0)
    assert [r.ok for r in rep.results] == [True] * 4 + [False, False]
    assert "unknown adapter 'nope'" in rep.results[4].error and "token ids" in rep.results[5].error
    assert np.isnan(rep.finish[4]) and len(rep.latency) == 4


def test_rank_classes_hold_each_adapter_at_its_own_rank(adapters):
    per = slot_nbytes(base(), ServeConfig(max_rank=8))
    srv = server(adapters, rank_classes=(2, 4, 8), device_budget_bytes=3 * per)
    assert srv.classes.ranks == [2, 4, 8]  # each class gets an equal share of the budget, in slots of its rank
    assert srv.classes.counts == [per // slot_nbytes(base(), srv.config, r) for r in (2, 4, 8)] == [3, 1, 1]
    assert srv.memory()["device_pool_bytes"] <= 3 * per
    for n in SPECS:
        assert srv.class_of(n) == list(SPECS).index(n)
    layer = srv.layers["transformer.h.0.attn.c_attn"]
    assert [a.shape[1] for a in layer.lora_A] == [2, 4, 8] and [b.shape[2] for b in layer.lora_B] == [2, 4, 8]
    reqs = workload(8, seed=6)
    padded = serve(server(adapters), reqs, step_time=1.0)  # one class of r_max 16
    for a, b in zip(serve(srv, reqs, step_time=1.0).results, padded.results):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_per_row_sampling_is_the_row_alone():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 30)) * 3
    qs = [Request([1], None, 1, do_sample=True, temperature=t, top_k=k, top_p=p, seed=s)
          for t, k, p, s in ((1.0, None, None, 0), (0.5, 4, None, 1), (2.0, None, 0.5, 2), (1.0, 3, 0.9, 3),
                             (1.0, None, None, 4))]
    qs[4].do_sample = False
    got = choose_tokens(z, qs, [np.random.default_rng(q.seed) for q in qs])
    for k, q in enumerate(qs):
        want = decoding.sample_next(z[k:k + 1], not q.do_sample, q.temperature, q.top_k,
                                    np.random.default_rng(q.seed), q.top_p)
        assert got[k] == want[0], k


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = np.linspace(0, 1, 200, endpoint=False)
    picked = {int(decoding.sample_rows(logits, 1.0, None, 0.75, np.array([u]))[0]) for u in draws}
    assert picked == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: two tokens
    picked = {int(decoding.sample_rows(logits, 1.0, None, 0.85, np.array([u]))[0]) for u in draws}
    assert picked == {0, 1, 2}
    assert {int(decoding.sample_rows(logits, 1.0, None, 1.0, np.array([u]))[0]) for u in draws} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p must be None or a number in"):
        Request([1], top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Request([1], do_sample=True, temperature=0)


def test_poisson_arrivals_and_bad_arguments(adapters):
    t = poisson_arrivals(4.0, 4000, np.random.default_rng(0))
    assert np.all(np.diff(t) > 0) and abs(np.diff(t).mean() - 0.25) < 0.02
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(0, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        serve(server(adapters), workload(1), max_batch_size=0)
    with pytest.raises(ValueError, match="arrival must be a finite time"):
        Request([1], arrival=-1.0)


def test_the_static_generate_refuses_sampled_requests(adapters):
    res = server(adapters).generate([Request([1, 2], "r2", 2, do_sample=True, seed=0), Request([1, 2], "r2", 2)])
    assert "serve_scheduler.serve" in res[0].error and res[1].ok


@pytest.mark.gpu
def test_continuous_batching_on_the_gpu_gives_the_cpu_tokens(tmp_path):
    """float32 on CuPy, with the BGMV/SGMV kernels per rank class and without them: the CPU's tokens."""
    cfg = GPTConfig.preset("T0")
    paths = {n: save_adapter(get_peft_model(GPT(cfg, seed=0), LoraConfig(init_lora_weights=False, seed=i, **kw)),
                             os.path.join(tmp_path, n)) for i, (n, kw) in enumerate(SPECS.items())}
    reqs = workload(24, seed=7)
    out = {}
    for device, kernels in (("cpu", False), ("cuda", True), ("cuda", False)):
        srv = LoraServer(GPT(cfg, seed=0).to(device), ServeConfig(rank_classes=(2, 4, 8), use_kernels=kernels))
        for n, p in paths.items():
            srv.add_adapter(n, p)
        out[device, kernels] = [r.tokens.tolist() for r in serve(srv, reqs, max_batch_size=6, step_time=1.0).results]
    assert out["cuda", True] == out["cpu", False]
    assert out["cuda", False] == out["cpu", False]


def test_session_join_and_compact_keep_each_row_as_alone():
    m = base().eval()
    target = decoding.resolve_model(m)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, CFG.vocab_size, n) for n in (9, 3, 6)]
    with decoding.inference(m):
        alone_logits = []
        for p in prompts:
            s = decoding.Session(target, p[None])
            s.start()
            alone_logits.append(s.step(np.array([5])))
        a = decoding.Session(target, *decoding.left_pad(prompts[:1]))
        a.start()
        a.step(np.array([5]))  # one step ahead: the joined sessions are of different lengths
        b = decoding.Session(target, *decoding.left_pad(prompts[1:]))
        b.start()
        a.join(b)  # rows: 0 (9 + 1 tokens), 1 (3), 2 (6), right-aligned
        assert a.cache.length == 10 and a.cache.mask.sum(axis=1).tolist() == [10, 3, 6]
        a.select([1, 2])  # the long row leaves
        a.compact()
        assert a.cache.length == 6 and a.tokens.shape == (2, 6)
        got = a.step(np.array([5, 5]))
    np.testing.assert_allclose(got, np.concatenate(alone_logits[1:]), rtol=0, atol=1e-12)
