"""Optimizers, schedules and clipping against torch.optim (when torch is importable)."""
import math

import numpy as np
import pytest

from minipeft.engine import Tensor
from minipeft.nn import Linear, Module, Parameter
from minipeft.optim import (SGD, AdamW, LRScheduler, adamw_update, clip_grad_norm_, constant_schedule,
                            cosine_schedule, get_schedule, linear_schedule)


def _params(seed=0, shapes=((4, 3), (3,), (2, 5))):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes]


def _grads(step, shapes):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _run_both(make_ours, make_torch, steps=6):
    torch = pytest.importorskip("torch")
    shapes = ((4, 3), (3,), (2, 5))
    ours = _params(0, shapes)
    frozen = Parameter(np.ones((2, 2), np.float32), requires_grad=False)
    theirs = [torch.nn.Parameter(torch.tensor(p.data.copy())) for p in ours]
    opt, topt = make_ours(ours + [frozen]), make_torch(theirs)
    for s in range(steps):
        for p, tp, g in zip(ours, theirs, _grads(s, shapes)):
            p.grad, tp.grad = g.copy(), torch.tensor(g)
        opt.step()
        topt.step()
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert frozen.data.tolist() == [[1, 1], [1, 1]]
    return opt


def test_adamw_matches_torch():
    import_torch = pytest.importorskip("torch")
    opt = _run_both(lambda ps: AdamW(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
                    lambda ps: import_torch.optim.AdamW(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1))
    assert all(st["step"] == 6 for st in opt.state.values())


def test_adamw_defaults_match_torch():
    torch = pytest.importorskip("torch")
    _run_both(lambda ps: AdamW(ps, lr=3e-3), lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    d = AdamW(_params(), lr=1.0)
    assert (d.betas, d.eps, d.weight_decay) == ((0.9, 0.999), 1e-8, 0.01)


@pytest.mark.parametrize("kw", [dict(momentum=0.0, weight_decay=0.0), dict(momentum=0.9, weight_decay=0.01),
                                dict(momentum=0.9, nesterov=True, weight_decay=0.05),
                                dict(momentum=0.5, dampening=0.1)])
def test_sgd_matches_torch(kw):
    torch = pytest.importorskip("torch")
    _run_both(lambda ps: SGD(ps, lr=0.05, **kw), lambda ps: torch.optim.SGD(ps, lr=0.05, **kw))


def test_adamw_update_by_hand_first_step():
    # After one step from zero moments, Adam's bias-corrected update is lr * g / (|g| + eps').
    p, g = np.array([1.0, -2.0], np.float32), np.array([0.5, -0.25], np.float32)
    m, v = np.zeros(2, np.float32), np.zeros(2, np.float32)
    adamw_update(p, g, m, v, 1, 0.1, (0.9, 0.999), 1e-8, 0.0)
    np.testing.assert_allclose(p, [1.0 - 0.1, -2.0 + 0.1], rtol=1e-6)


def test_frozen_params_get_no_state():
    class M(Module):
        def __init__(self):
            super().__init__()
            self.a = Linear(3, 4, rng=0)
            self.b = Linear(4, 2, rng=1)

    m = M()
    m.a.requires_grad_(False)
    opt = AdamW(m, lr=1e-3)
    assert [n for n, _ in opt.named_params] == ["b.weight", "b.bias"]
    for p in m.parameters():
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    assert set(opt.state) == {"b.weight", "b.bias"}
    assert opt.state_bytes() == 2 * 4 * (4 * 2 + 2)  # two fp32 moments per trainable element
    sgd = SGD(m, lr=0.1)  # no momentum: no buffers
    sgd.step()
    assert sgd.state_bytes() == 0


def test_param_with_no_grad_is_skipped_and_errors():
    ps = _params()
    opt = AdamW(ps, lr=0.1)
    before = ps[1].data.copy()
    ps[0].grad = np.ones(ps[0].shape, np.float32)
    opt.step()
    assert set(opt.state) == {"0"} and np.array_equal(ps[1].data, before)
    with pytest.raises(ValueError, match="requires grad"):
        AdamW([Parameter(np.zeros(2, np.float32), requires_grad=False)])
    with pytest.raises(ValueError, match="learning rate"):
        AdamW(ps, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW(ps, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="Module, a list of Parameters"):
        SGD([1, 2, 3])


def test_state_dict_round_trip_continues_identically():
    shapes = ((4, 3), (3,), (2, 5))
    for make in (lambda ps: AdamW(ps, lr=0.01), lambda ps: SGD(ps, lr=0.01, momentum=0.9)):
        a, b = _params(), _params()
        oa = make(a)
        for s in range(3):
            for p, g in zip(a, _grads(s, shapes)):
                p.grad = g
            oa.step()
        for pb, pa in zip(b, a):
            pb.data = pa.data.copy()
        ob = make(b)
        ob.load_state_dict(oa.state_dict())
        ob.lr = 123.0
        ob.load_state_dict(oa.state_dict())  # hyperparameters come back too
        assert ob.lr == 0.01
        for s in range(3, 6):
            for pa, pb, g in zip(a, b, _grads(s, shapes)):
                pa.grad, pb.grad = g, g.copy()
            oa.step()
            ob.step()
        for pa, pb in zip(a, b):
            assert np.array_equal(pa.data, pb.data)


def test_load_state_dict_mismatch_errors():
    opt = AdamW(_params(), lr=0.1)
    for p in opt.params:
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    sd = opt.state_dict()
    other = AdamW(_params(shapes=((4, 3), (5,), (2, 5))), lr=0.1)
    with pytest.raises(ValueError, match=r"1.exp_avg: saved \(3,\) vs parameter \(5,\)"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="state is for optimizer 'AdamW', this is SGD"):
        SGD(_params(), lr=0.1).load_state_dict(sd)
    fewer = AdamW(_params(shapes=((4, 3),)), lr=0.1)
    with pytest.raises(ValueError, match="does not have"):
        fewer.load_state_dict(sd)
    assert fewer.state == {}  # unchanged


def test_schedules():
    c = constant_schedule(1.0, warmup_steps=4)
    assert [c(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    cos = cosine_schedule(2.0, warmup_steps=10, total_steps=110, min_lr=0.2)
    assert cos(0) == 0.0 and cos(5) == 1.0 and cos(10) == 2.0
    assert math.isclose(cos(60), 0.2 + 1.8 * 0.5) and math.isclose(cos(110), 0.2) and cos(500) == 0.2
    assert all(cos(s) >= cos(s + 1) for s in range(10, 120))
    lin = linear_schedule(1.0, warmup_steps=0, total_steps=10)
    assert [lin(s) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    assert get_schedule("cosine", 1.0, 0, 100)(100) == 0.0
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("step", 1.0)
    with pytest.raises(ValueError, match="needs total_steps"):
        get_schedule("linear", 1.0, 2)
    with pytest.raises(ValueError, match="must not exceed"):
        cosine_schedule(1.0, 20, 10)


def test_schedules_match_transformers():
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    p = torch.nn.Parameter(torch.zeros(1))
    for name, ours in (("cosine", cosine_schedule(1.0, 5, 30)), ("linear", linear_schedule(1.0, 5, 30))):
        opt = torch.optim.SGD([p], lr=1.0)
        sched = getattr(tr, f"get_{name}_schedule_with_warmup")(opt, 5, 30)
        for s in range(31):
            assert math.isclose(opt.param_groups[0]["lr"], ours(s), abs_tol=1e-12), (name, s)
            opt.step()
            sched.step()


def test_lr_scheduler_state():
    opt = SGD(_params(), lr=1.0)
    sch = LRScheduler(opt, cosine_schedule(1.0, 2, 10))
    assert opt.lr == 0.0
    for _ in range(3):
        sch.step()
    assert opt.lr == cosine_schedule(1.0, 2, 10)(3)
    sch2 = LRScheduler(SGD(_params(), lr=1.0), cosine_schedule(1.0, 2, 10))
    sch2.load_state_dict(sch.state_dict())
    assert sch2.last_step == 3 and sch2.get_lr() == opt.lr


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    shapes = ((4, 3), (3,), (2, 5))
    for max_norm in (0.5, 100.0):
        ps = _params()
        tps = [torch.nn.Parameter(torch.tensor(p.data)) for p in ps]
        for p, tp, g in zip(ps, tps, _grads(0, shapes)):
            p.grad, tp.grad = g.copy(), torch.tensor(g)
        total = clip_grad_norm_(ps, max_norm)
        ttotal = torch.nn.utils.clip_grad_norm_(tps, max_norm)
        assert math.isclose(total, float(ttotal), rel_tol=1e-6)
        for p, tp in zip(ps, tps):
            np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-6)
    assert clip_grad_norm_([Tensor(np.ones(2, np.float32), requires_grad=True)], 1.0) == 0.0  # no grads
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(ps, 0.0)
