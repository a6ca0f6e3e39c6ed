"""PagedAdamW: bit-identical to AdamW under a device budget smaller than the state."""
import numpy as np
import pytest

from minipeft.backend import to_numpy
from minipeft.checkpoint import load_checkpoint, save_checkpoint
from minipeft.nn import Parameter
from minipeft.optim import AdamW, PagedAdamW


def _pair(xp, shapes, dtypes=None, seed=0):
    rng = np.random.default_rng(seed)
    dtypes = dtypes or [np.float32] * len(shapes)
    init = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    return [Parameter(xp.array(x)) for x in init], [Parameter(xp.array(x)) for x in init]  # copies


def _steps(xp, opts_params, n, seed=1, skip=None):
    """n steps of each (optimizer, params) on the same random gradients; ``skip``: (step, i) -> no grad."""
    rng = np.random.default_rng(seed)
    for s in range(n):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in opts_params[0][1]]
        for opt, ps in opts_params:
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if skip == (s, i) else xp.asarray(g)
            opt.step()


def test_bit_identical_to_adamw_when_state_exceeds_budget(xp):
    shapes = [(64, 64), (32, 64), (100,), (3, 50)]                      # 8 pages of <= 1024 elements
    a, b = _pair(xp, shapes, [np.float32, np.float32, np.float32, np.float16])
    ref = AdamW(a, lr=1e-2, weight_decay=0.1)
    budget = 3 * 8192                                                   # 3 full pages (m and v, fp32)
    paged = PagedAdamW(b, lr=1e-2, weight_decay=0.1, page_size=1024, device_budget_bytes=budget)
    assert ref.state_bytes() == 0 and budget < 8 * sum(int(np.prod(s)) for s in shapes)
    _steps(xp, [(ref, a), (paged, b)], 7, skip=(3, 1))
    for pa, pb in zip(a, b):
        assert pa.data is not pb.data
        assert pa.data.dtype == pb.data.dtype
        np.testing.assert_array_equal(to_numpy(pa.data), to_numpy(pb.data))
    assert paged.state_bytes() == ref.state_bytes()                     # same state, on the host
    sa, sb = ref.state_dict(), paged.state_dict()
    for name, st in sa["state"].items():
        assert sb["state"][name]["step"] == st["step"]
        for k in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(to_numpy(st[k]), sb["state"][name][k])
    stats = paged.paging_stats()
    assert stats["peak_device_bytes"] <= budget and stats["pages"] == 8
    assert stats["page_ins"] > stats["pages"] and stats["page_outs"] > 0   # it really paged


def test_page_counts_follow_the_alternating_sweep():
    """T pages, budget of B pages: T in and T-B out on the first step, T-B each way after."""
    ps = [Parameter(np.zeros((16, 64), np.float32)) for _ in range(3)]   # 3 x 4 pages of 256
    page = 2 * 256 * 4
    T, B = 12, 5
    opt = PagedAdamW(ps, page_size=256, device_budget_bytes=B * page)
    _steps(np, [(opt, ps)], 1)
    s = opt.paging_stats()
    assert (s["page_ins"], s["page_outs"], s["peak_device_bytes"]) == (T, T - B, B * page)
    _steps(np, [(opt, ps)], 4)
    s = opt.paging_stats()
    assert (s["page_ins"], s["page_outs"]) == (T + 4 * (T - B), (T - B) * 5)
    assert s["device_bytes"] == B * page and s["resident_pages"] == B


def test_no_budget_keeps_pages_resident():
    ps = [Parameter(np.zeros((16, 64), np.float32)) for _ in range(3)]
    opt = PagedAdamW(ps, page_size=256)                                 # None: no limit
    _steps(np, [(opt, ps)], 3)
    s = opt.paging_stats()
    assert (s["page_ins"], s["page_outs"], s["peak_device_bytes"]) == (12, 0, 12 * 2048)
    opt.state_dict()                                                    # flushes the modified pages
    assert opt.paging_stats()["page_outs"] == 12
    opt.state_dict()                                                    # nothing modified since
    assert opt.paging_stats()["page_outs"] == 12
    opt.reset_stats()
    assert opt.paging_stats()["page_ins"] == 0 and opt.peak_device_bytes == 12 * 2048


def test_budget_smaller_than_one_page_is_a_clear_error():
    ps = [Parameter(np.zeros((64, 64), np.float32)), Parameter(np.zeros(10, np.float32))]
    with pytest.raises(ValueError, match=r"cannot hold one page: a page of 0 takes 8192 bytes"):
        PagedAdamW(ps, page_size=1024, device_budget_bytes=8191)
    PagedAdamW(ps, page_size=1024, device_budget_bytes=8192)           # exactly one page is enough
    PagedAdamW(ps, page_size=512, device_budget_bytes=4096)
    with pytest.raises(ValueError, match="page_size"):
        PagedAdamW(ps, page_size=0)
    with pytest.raises(TypeError, match="device_budget_bytes"):
        PagedAdamW(ps, device_budget_bytes="1GB")


def test_one_page_budget_and_non_contiguous_parameter():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((48, 40)).astype(np.float32)
    a, b = Parameter(x.T.copy()), Parameter(x.T)                        # b's data is a strided view
    assert not b.data.flags.c_contiguous
    ref = AdamW([a])
    paged = PagedAdamW([b], page_size=500, device_budget_bytes=4000)   # a single page at a time
    _steps(np, [(ref, [a]), (paged, [b])], 4)
    np.testing.assert_array_equal(a.data, b.data)
    assert paged.paging_stats()["peak_device_bytes"] == 4000


def test_state_dict_round_trip_continues_identically(tmp_path):
    a, b = _pair(np, [(64, 64), (30,)])
    c = [Parameter(p.data.copy()) for p in b]
    ref = AdamW(a)
    paged = PagedAdamW(b, page_size=1000, device_budget_bytes=16000)
    _steps(np, [(ref, a), (paged, b)], 3)

    class _M:  # the smallest thing save_checkpoint takes as a model
        def state_dict(self):
            return {}

        def load_state_dict(self, d):
            pass
    save_checkpoint(tmp_path / "ck", _M(), paged, step=3)
    for p, q in zip(c, b):
        p.data[...] = q.data
    resumed = PagedAdamW(c, page_size=700, device_budget_bytes=5600)   # another page size and budget
    load_checkpoint(tmp_path / "ck", _M(), resumed)
    _steps(np, [(ref, a), (paged, b), (resumed, c)], 3, seed=9)
    for pa, pb, pc in zip(a, b, c):
        np.testing.assert_array_equal(pa.data, pb.data)
        np.testing.assert_array_equal(pa.data, pc.data)
