"""The BGMV / SGMV RawKernels agree with their NumPy twins (minipeft.serve.*_reference).

minipeft/kernels/bgmv.py against minipeft.serve.bgmv_reference / sgmv_reference run in
float64 on the host from the same float32 inputs: odd sizes, rank 1 to 64, base-model
rows and segments (slot -1, left bit-for-bit unchanged), empty and multi-tile segments.
Then the whole server on the GPU gives the tokens the CPU server gives. All need CuPy.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from minipeft import fast
from minipeft.backend import to_numpy
from minipeft.serve import bgmv_reference, sgmv_reference

pytestmark = pytest.mark.gpu

BGMV_SHAPES = [  # (M rows, N slots, R, H1, H2)
    (1, 1, 1, 1, 1), (7, 3, 4, 64, 192), (3, 2, 13, 33, 17), (33, 5, 16, 768, 2304),
    (128, 100, 16, 768, 3072), (5, 2, 64, 3072, 768), (9, 4, 8, 4096, 5),
]


@pytest.fixture(scope="module")
def kb():
    from minipeft.kernels import bgmv

    return bgmv


def _data(rng, M, N, R, H1, H2):
    f = np.float32
    return (rng.standard_normal((M, H1)).astype(f), (rng.standard_normal((N, R, H1)) / np.sqrt(H1)).astype(f),
            rng.standard_normal((N, H2, R)).astype(f), rng.uniform(0.1, 2, N).astype(f),
            rng.standard_normal((M, H2)).astype(f))


def _close(got, want, base):
    scale = np.abs(want - base).max() + 1e-30
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("shape", BGMV_SHAPES, ids=str)
def test_bgmv_kernel_equals_twin(cp, kb, shape):
    M, N, R, H1, H2 = shape
    rng = np.random.default_rng(M * 7 + R)
    x, A, B, s, y0 = _data(rng, M, N, R, H1, H2)
    idx = rng.integers(-1, N, M)
    want = bgmv_reference(y0.astype(np.float64), x.astype(np.float64), A.astype(np.float64),
                          B.astype(np.float64), idx, s.astype(np.float64))
    y = cp.asarray(y0)
    args = (y, cp.asarray(x), cp.asarray(A), cp.asarray(B), cp.asarray(idx), cp.asarray(s))
    assert kb.bgmv_applies(*args) and fast.choose(bgmv_reference, *args) is kb.bgmv_cuda
    assert kb.bgmv_cuda(*args) is y
    got = to_numpy(y)
    _close(got, want, y0)
    assert np.array_equal(got[idx < 0].view(np.uint32), y0[idx < 0].view(np.uint32))  # base rows untouched


@pytest.mark.parametrize("lens,R", [([1], 1), ([5, 0, 31, 32, 33], 8), ([100, 3, 64], 16), ([7, 70], 64),
                                    ([40, 1, 1, 2, 90], 13)], ids=str)
def test_sgmv_kernel_equals_twin(cp, kb, lens, R):
    rng = np.random.default_rng(sum(lens) + R)
    M, H1, H2, N = sum(lens), 200, 333, len(lens) + 1
    x, A, B, s, y0 = _data(rng, M, N, R, H1, H2)
    indptr = np.r_[0, np.cumsum(lens)]
    seg_slot = rng.permutation(N)[: len(lens)] - 1  # distinct slots, one of them may be -1 (base)
    want = sgmv_reference(y0.astype(np.float64), x.astype(np.float64), A.astype(np.float64),
                          B.astype(np.float64), indptr, seg_slot, s.astype(np.float64))
    y = cp.asarray(y0)
    args = (y, cp.asarray(x), cp.asarray(A), cp.asarray(B), indptr, seg_slot, cp.asarray(s))
    assert kb.sgmv_applies(*args) and fast.choose(sgmv_reference, *args) is kb.sgmv_cuda
    assert kb.sgmv_cuda(*args) is y
    got = to_numpy(y)
    _close(got, want, y0)
    base_rows = np.repeat(seg_slot < 0, lens)
    assert np.array_equal(got[base_rows].view(np.uint32), y0[base_rows].view(np.uint32))


def test_kernels_decline_what_they_cannot_run(cp, kb, monkeypatch):
    x64 = cp.zeros((2, 8))
    args64 = (x64, x64, cp.zeros((1, 2, 8)), cp.zeros((1, 8, 2)), cp.zeros(2, cp.int32), cp.ones(1))
    assert not kb.bgmv_applies(*args64) and fast.choose(bgmv_reference, *args64) is bgmv_reference
    f = cp.float32
    y, x = cp.zeros((4, 8), f), cp.zeros((4, 8), f)
    rank65 = (y, x, cp.zeros((1, 65, 8), f), cp.zeros((1, 8, 65), f), [0, 4], [0], cp.ones(1, f))
    assert not kb.sgmv_applies(*rank65) and fast.choose(sgmv_reference, *rank65) is sgmv_reference
    ok = (y, x, cp.zeros((1, 4, 8), f), cp.zeros((1, 8, 4), f), cp.zeros(4, cp.int32), cp.ones(1, f))
    assert fast.choose(bgmv_reference, *ok) is kb.bgmv_cuda
    monkeypatch.setenv("MINIPEFT_KERNELS", "0")                       # the one switch turns it off
    assert fast.choose(bgmv_reference, *ok) is bgmv_reference


def test_server_on_the_gpu_gives_the_cpu_tokens(tmp_path):
    from minipeft.gpt import GPT, GPTConfig
    from minipeft.peft import LoraConfig, get_peft_model, save_adapter
    from minipeft.serve import LoraServer, Request, ServeConfig

    cfg = GPTConfig.preset("T0")
    specs = {"r4": dict(r=4, target_modules=["c_attn"]), "r8": dict(r=8, target_modules=["c_attn", "c_proj"]),
             "r16": dict(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"])}
    for i, (n, kw) in enumerate(specs.items()):
        save_adapter(get_peft_model(GPT(cfg, seed=0), LoraConfig(init_lora_weights=False, seed=i, **kw)),
                     os.path.join(tmp_path, n))
    rng = np.random.default_rng(0)
    reqs = [Request(rng.integers(0, cfg.vocab_size, int(rng.integers(2, 40))), a, 8)
            for a in ["r4", None, "r16", "r8", "r4", "r16", "r8", None] * 3]
    out = {}
    for device, kernels in (("cpu", False), ("cuda", True), ("cuda", False)):
        srv = LoraServer(GPT(cfg, seed=0).to(device), ServeConfig(use_kernels=kernels))
        for n in specs:
            srv.add_adapter(n, os.path.join(tmp_path, n))
        out[device, kernels] = [r.tokens.tolist() for r in srv.generate(reqs)]
    assert out["cuda", True] == out["cpu", False]
    assert out["cuda", False] == out["cpu", False]
