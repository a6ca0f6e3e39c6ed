"""Lion and Lion8bit: the paper's update rule, 8-bit state against 32-bit, saving and loading.

Agreement with bitsandbytes' own kernels, bit for bit, is in test_bnb_optim_fixture.py.
"""
import numpy as np
import pytest

from minipeft.backend import to_numpy
from minipeft.checkpoint import load_checkpoint, save_checkpoint
from minipeft.nn import Parameter
from minipeft.optim import Lion, Lion8bit
from minipeft.quant import DYNAMIC_SIGNED, worst_case_error


def lion_reference(p, m, g, lr, betas, wd):
    """Chen et al. 2023, Alg. 2, in float64."""
    b1, b2 = betas
    c = b1 * m + (1 - b1) * g
    p = p * (1 - lr * wd) - lr * np.sign(c)
    return p, b2 * m + (1 - b2) * g


def test_lion_follows_the_paper(xp):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((40, 30)) * 0.1
    p = Parameter(xp.array(p0.astype(np.float32)))
    opt = Lion([p], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    ref_p, ref_m = p0.copy(), np.zeros_like(p0)
    for _ in range(10):
        g = rng.standard_normal(p0.shape).astype(np.float32) * 0.01
        p.grad = xp.asarray(g)
        opt.step()
        ref_p, ref_m = lion_reference(ref_p, ref_m, g.astype(np.float64), 1e-3, (0.9, 0.99), 0.1)
        m = to_numpy(opt.state["0"]["state1"])
        np.testing.assert_allclose(m, ref_m, rtol=1e-5, atol=1e-9)     # float32 betas: 1 - 0.99 is
        np.testing.assert_allclose(to_numpy(p.data), ref_p, rtol=0, atol=1e-6)  # 0.010000050 in float32
    steps = np.abs(to_numpy(p.data) - p0)
    assert steps.max() <= 10 * 1e-3 * (1 + 0.1 * np.abs(p0).max())    # each step: lr plus lr*wd*|p|


def test_sign_of_zero_does_not_move():
    p = Parameter(np.ones((4, 4), np.float32))
    opt = Lion([p], lr=0.1)                                            # weight_decay 0 (bitsandbytes)
    g = np.zeros((4, 4), np.float32)
    g[0, 0], g[1, 1] = 1.0, -2.0
    p.grad = g
    opt.step()
    assert p.data[0, 0] == np.float32(0.9) and p.data[1, 1] == np.float32(1.1)
    untouched = np.ones((4, 4), bool)
    untouched[0, 0] = untouched[1, 1] = False
    assert (p.data[untouched] == 1.0).all()                            # sign(0) = 0, as torch.sign
    assert opt.betas == (0.9, 0.99) and opt.lr == 0.1 and opt.weight_decay == 0.0


@pytest.mark.parametrize("shape", [(64, 128), (33, 129)])
def test_lion8bit_tracks_lion(xp, shape):
    """bitsandbytes' protocol (as for AdamW8bit): resynchronise the 32-bit run every step."""
    rng = np.random.default_rng(1)
    p0 = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    p8, p32 = Parameter(xp.array(p0)), Parameter(xp.array(p0))
    o8, o32 = Lion8bit([p8], lr=1e-4, weight_decay=0.01), Lion([p32], lr=1e-4, weight_decay=0.01)
    assert o8.is_8bit(p8)
    h = worst_case_error(DYNAMIC_SIGNED)
    flips = 0
    for _ in range(30):
        g = (rng.standard_normal(shape) * 0.01).astype(np.float32)
        p8.grad, p32.grad = xp.asarray(g), xp.asarray(g)
        o8.step()
        o32.step()
        (m8,) = (to_numpy(x) for x in o8.dequantized_state("0"))
        m32 = to_numpy(o32.state["0"]["state1"])
        absmax = np.repeat(to_numpy(o8.state["0"]["absmax1"]), 256)[:m32.size].reshape(shape)
        assert (np.abs(m8 - m32) <= (h + 1e-6) * absmax).all()          # the map's half-gap
        d = np.abs(to_numpy(p8.data) - to_numpy(p32.data))
        flips += int((d > 1e-7).sum())                                  # sign(c) differed: 2*lr apart
        assert ((d < 1e-7) | (np.abs(d - 2e-4) < 1e-6)).all()
        p32.data[...] = p8.data
        o32.state["0"]["state1"][...] = xp.asarray(m8)
    assert flips < 1e-3 * 30 * p0.size                                  # only where |c| < its quantization error


def test_small_tensors_keep_32bit_state_and_match_lion():
    rng = np.random.default_rng(2)
    shapes = [(63, 65), (64, 64)]                                       # 4095: 32-bit; 4096: 8-bit
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    a, b = [Parameter(x.copy()) for x in init], [Parameter(x.copy()) for x in init]
    o8, o32 = Lion8bit(a, weight_decay=0.1), Lion(b, weight_decay=0.1)
    for _ in range(5):
        for pa, pb in zip(a, b):
            g = rng.standard_normal(pa.shape).astype(np.float32)
            pa.grad, pb.grad = g, g.copy()
        o8.step()
        o32.step()
    assert set(o8.state["0"]) == {"step", "state1"} and o8.state["0"]["state1"].dtype == np.float32
    np.testing.assert_array_equal(a[0].data, b[0].data)
    assert o8.state["1"]["state1"].dtype == np.uint8 and o8.state["1"]["absmax1"].shape == (16,)
    assert o8.state_bytes() == 4 * 4095 + (4096 + 4 * 16)               # one state: n + 4*ceil(n/256)
    assert o32.state_bytes() == 4 * (4095 + 4096)


class _M:  # the smallest thing save_checkpoint takes as a model
    def state_dict(self):
        return {}

    def load_state_dict(self, d):
        pass


@pytest.mark.parametrize("cls", [Lion, Lion8bit])
def test_state_dict_round_trip_is_exact(tmp_path, cls):
    rng = np.random.default_rng(3)
    init = [rng.standard_normal(s).astype(np.float32) for s in [(64, 129), (7, 3)]]
    a = [Parameter(x.copy()) for x in init]
    opt = cls(a, lr=3e-4, weight_decay=0.05)

    def train(o, ps, seed, steps):
        r = np.random.default_rng(seed)
        for _ in range(steps):
            for p in ps:
                p.grad = (r.standard_normal(p.shape) * 0.01).astype(np.float32)
            o.step()
    train(opt, a, 4, 5)
    save_checkpoint(tmp_path / "ck", _M(), opt, step=5)
    b = [Parameter(p.data.copy()) for p in a]
    opt_b = cls(b)
    load_checkpoint(tmp_path / "ck", _M(), opt_b)
    assert opt_b.lr == 3e-4 and opt_b.weight_decay == 0.05
    for name, st in opt.state.items():
        assert set(opt_b.state[name]) == set(st)
        for k, arr in st.items():
            if k != "step":
                assert opt_b.state[name][k].dtype == arr.dtype
                np.testing.assert_array_equal(opt_b.state[name][k], arr)
    train(opt, a, 5, 3)
    train(opt_b, b, 5, 3)
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.data, pb.data)


def test_load_state_dict_rejects_wrong_layout():
    p = Parameter(np.zeros((64, 129), np.float32))
    opt = Lion8bit([p])
    p.grad = np.ones(p.shape, np.float32)
    opt.step()
    sd = opt.state_dict()
    bad = {**sd, "state": {"0": {**sd["state"]["0"], "absmax1": np.zeros(5, np.float32)}}}
    with pytest.raises(ValueError, match=r"absmax1: saved \(5,\) vs \(33,\)"):
        opt.load_state_dict(bad)
    bad = {**sd, "state": {"0": {**sd["state"]["0"], "state1": np.zeros((64, 129), np.float32)}}}
    with pytest.raises(ValueError, match="must be uint8"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="optimizer 'Lion8bit', this is Lion"):
        Lion([p]).load_state_dict(sd)


def test_bad_arguments_and_nan_gradient():
    p = Parameter(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="betas"):
        Lion([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        Lion([p], weight_decay=-1)
    with pytest.raises(ValueError, match="blocksize"):
        Lion8bit([p], blocksize=100)
    opt = Lion8bit([p])
    p.grad = np.ones(p.shape, np.float32)
    p.grad[3, 4] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        opt.step()
    assert opt.state["0"]["step"] == 0 and (p.data == 0).all()
