"""PagedAdamW8bit: bit-identical to AdamW8bit while its 8-bit pages move under a device budget."""
import numpy as np
import pytest

from minipeft.backend import to_numpy
from minipeft.checkpoint import load_checkpoint, save_checkpoint
from minipeft.nn import Parameter
from minipeft.optim import AdamW8bit, PagedAdamW8bit

PAGE = 2 * 1024 + 8 * 1024 // 256          # bytes of one full 8-bit page of 1024: codes of m, v + 2 x 4 absmax


def _pair(xp, shapes, seed=0):
    rng = np.random.default_rng(seed)
    init = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in shapes]
    return [Parameter(xp.array(x)) for x in init], [Parameter(xp.array(x)) for x in init]


def _steps(xp, opts_params, n, seed=1, skip=None):
    rng = np.random.default_rng(seed)
    for s in range(n):
        grads = [(rng.standard_normal(p.shape) * 0.01).astype(np.float32) for p in opts_params[0][1]]
        for opt, ps in opts_params:
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if skip == (s, i) else xp.asarray(g)
            opt.step()


def test_bit_identical_to_adamw8bit_when_state_exceeds_budget(xp):
    shapes = [(64, 129), (40, 128), (30, 30)]                           # 9 + 5 pages 8-bit, 1 page float32
    a, b = _pair(xp, shapes)
    ref = AdamW8bit(a, lr=1e-2)
    budget = 3 * PAGE + 2 * 900 * 4                                     # 3 8-bit pages, or the fp32 one + 1
    paged = PagedAdamW8bit(b, lr=1e-2, page_size=1024, device_budget_bytes=budget)
    _steps(xp, [(ref, a), (paged, b)], 6, skip=(2, 1))
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(to_numpy(pa.data), to_numpy(pb.data))
    sa, sb = ref.state_dict(), paged.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for name, st in sa["state"].items():
        assert set(sb["state"][name]) == set(st) and sb["state"][name]["step"] == st["step"]
        for k in st:
            if k != "step":
                assert sb["state"][name][k].dtype == st[k].dtype and sb["state"][name][k].shape == st[k].shape
                np.testing.assert_array_equal(to_numpy(st[k]), sb["state"][name][k])
    assert paged.state_bytes() == ref.state_bytes()                     # same bytes, held on the host
    for (m_a, v_a), (m_b, v_b) in ((ref.dequantized_state(n), paged.dequantized_state(n)) for n in sa["state"]):
        np.testing.assert_array_equal(to_numpy(m_a), to_numpy(m_b))
        np.testing.assert_array_equal(to_numpy(v_a), to_numpy(v_b))
    stats = paged.paging_stats()
    assert stats["pages"] == 15 and stats["peak_device_bytes"] <= budget
    assert stats["page_ins"] > stats["pages"] and stats["page_outs"] > 0


def test_page_counts_follow_the_alternating_sweep():
    """As PagedAdamW: T pages, budget of B pages: T in and T-B out, then T-B each way per step."""
    ps = [Parameter(np.zeros((16, 256), np.float32)) for _ in range(3)]  # 3 x 4 pages of 1024
    T, B = 12, 5
    opt = PagedAdamW8bit(ps, page_size=1024, device_budget_bytes=B * PAGE)
    _steps(np, [(opt, ps)], 1)
    s = opt.paging_stats()
    assert (s["page_ins"], s["page_outs"], s["peak_device_bytes"]) == (T, T - B, B * PAGE)
    _steps(np, [(opt, ps)], 4)
    s = opt.paging_stats()
    assert (s["page_ins"], s["page_outs"]) == (T + 4 * (T - B), (T - B) * 5)
    assert s["host_bytes"] == 3 * (2 * 4096 + 8 * 16)                   # a quarter of PagedAdamW's (plus absmax)


def test_checkpoint_moves_between_paged_and_plain(tmp_path):
    a, b = _pair(np, [(64, 129), (10, 10)], seed=2)
    c = [Parameter(p.data.copy()) for p in a]
    plain, paged = AdamW8bit(a, lr=3e-3), PagedAdamW8bit(b, lr=3e-3, page_size=512, device_budget_bytes=3000)
    _steps(np, [(plain, a), (paged, b)], 3)

    class _M:  # the smallest thing save_checkpoint takes as a model
        def state_dict(self):
            return {}

        def load_state_dict(self, d):
            pass
    sd = plain.state_dict()
    resumed = PagedAdamW8bit(c, page_size=2048)                          # another page size, no budget
    resumed.load_state_dict({**sd, "type": "PagedAdamW8bit"})           # AdamW8bit's layout, as saved
    for p, q in zip(c, a):
        p.data[...] = q.data
    save_checkpoint(tmp_path / "ck", _M(), paged, step=3)
    d = [Parameter(p.data.copy()) for p in b]
    reloaded = PagedAdamW8bit(d, page_size=512)
    load_checkpoint(tmp_path / "ck", _M(), reloaded)
    assert reloaded.lr == 3e-3
    _steps(np, [(plain, a), (paged, b), (resumed, c), (reloaded, d)], 3, seed=9)
    for group in zip(a, b, c, d):
        for p in group[1:]:
            np.testing.assert_array_equal(group[0].data, p.data)


def test_bad_page_size_and_nan_gradient():
    p = Parameter(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="multiple of blocksize=256"):
        PagedAdamW8bit([p], page_size=1000)
    with pytest.raises(ValueError, match="cannot hold one page"):
        PagedAdamW8bit([p], page_size=1024, device_budget_bytes=PAGE - 1)
    opt = PagedAdamW8bit([p], page_size=1024, device_budget_bytes=PAGE)
    p.grad = np.ones(p.shape, np.float32)
    p.grad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        opt.step()
    assert opt.state == {} and (p.data == 0).all() and opt.paging_stats()["page_ins"] == 0
