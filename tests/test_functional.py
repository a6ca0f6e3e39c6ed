"""Every op in minipeft.functional: float64 finite-difference gradients, forward values
against NumPy (and PyTorch where it is installed), and error messages. Each test runs
on NumPy and, with the ``gpu`` marker on a CUDA machine, on CuPy (the ``xp`` fixture)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import minipeft.functional as F
from minipeft.backend import to_numpy
from minipeft.engine import Tensor
from minipeft.testing import asarray_on, gradcheck

from .crosscheck import import_or_none

torch = import_or_none("torch")  # None without torch (those comparisons are left out); CI requires it


@pytest.fixture
def mk(xp):
    """mk(*shape, rg=True, positive=False, data=None): a float64 Tensor on the backend."""
    rng = np.random.default_rng(1234)

    def make(*shape, rg=True, positive=False, away_from_zero=False, data=None):
        a = rng.standard_normal(shape) if data is None else np.asarray(data, dtype=np.float64)
        if positive:
            a = np.abs(a) + 0.5
        if away_from_zero:
            a = np.sign(a) * (np.abs(a) + 0.2)
        return Tensor(asarray_on(xp, a), requires_grad=rg)

    return make


def npy(t):
    return to_numpy(t.data if isinstance(t, Tensor) else t)


# --------------------------------------------------------------- elementwise binary

SHAPES = [((3, 4), (3, 4)), ((3, 1), (1, 4)), ((2, 3, 4), (4,)), ((2, 3), ()), ((), (2, 3)), ((4,), (2, 3, 1))]
BINARY = {"add": (F.add, np.add), "sub": (F.sub, np.subtract), "mul": (F.mul, np.multiply), "div": (F.div, np.divide)}


@pytest.mark.parametrize("op", list(BINARY))
@pytest.mark.parametrize("sa,sb", SHAPES)
def test_binary_broadcasting(mk, op, sa, sb):
    f, ref = BINARY[op]
    a, b = mk(*sa), mk(*sb, positive=(op == "div"))
    out = f(a, b)
    assert out.shape == np.broadcast_shapes(sa, sb)
    np.testing.assert_allclose(npy(out), ref(npy(a), npy(b)), rtol=1e-12)
    gradcheck(f, [a, b])


@pytest.mark.parametrize("op", list(BINARY))
def test_binary_python_scalars_and_operators(mk, op):
    f, ref = BINARY[op]
    a = mk(2, 3, positive=True)
    for out, want in [(f(a, 2.5), ref(npy(a), 2.5)), (f(2.5, a), ref(2.5, npy(a)))]:
        assert out.dtype == np.float64
        np.testing.assert_allclose(npy(out), want, rtol=1e-12)
    gradcheck(lambda x: f(x, 2.5), [a])
    gradcheck(lambda x: f(2.5, x), [a])
    sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
    gradcheck(lambda x: eval(f"(x {sym} 1.5) {sym} (2.0 {sym} x)"), [a])


def test_binary_one_side_frozen(mk):
    a, b = mk(3, 4), mk(3, 1, rg=False, positive=True)
    for f in (F.add, F.sub, F.mul, F.div):
        gradcheck(f, [a, b])
        gradcheck(f, [b, a])


def test_binary_shape_mismatch(mk):
    with pytest.raises(ValueError, match="broadcast"):
        F.add(mk(3, 4), mk(2, 4))


def test_where(mk, xp):
    cond = asarray_on(xp, np.random.default_rng(0).random((3, 4)) > 0.5)
    a, b = mk(3, 4), mk(1, 4)
    out = F.where(cond, a, b)
    np.testing.assert_array_equal(npy(out), np.where(npy(cond), npy(a), npy(b)))
    gradcheck(lambda x, y: F.where(cond, x, y), [a, b])
    gradcheck(lambda x: F.where(cond, x, 0.0), [a])


# ---------------------------------------------------------------- elementwise unary


@pytest.mark.parametrize("name", ["neg", "exp", "tanh", "sigmoid", "gelu"])
def test_unary_any_sign(mk, name):
    f = getattr(F, name)
    x = mk(3, 5)
    ref = {"neg": np.negative, "exp": np.exp, "tanh": np.tanh,
           "sigmoid": lambda a: 1 / (1 + np.exp(-a)),
           "gelu": lambda a: 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))}[name]
    np.testing.assert_allclose(npy(f(x)), ref(npy(x)), rtol=1e-12, atol=1e-15)
    gradcheck(f, [x])


@pytest.mark.parametrize("name,ref", [("log", np.log), ("sqrt", np.sqrt)])
def test_unary_positive(mk, name, ref):
    x = mk(3, 5, positive=True)
    np.testing.assert_allclose(npy(getattr(F, name)(x)), ref(npy(x)), rtol=1e-12)
    gradcheck(getattr(F, name), [x])


@pytest.mark.parametrize("p", [2, 3, 0.5, -1.5])
def test_pow(mk, p):
    x = mk(2, 4, positive=True)
    np.testing.assert_allclose(npy(x**p), npy(x) ** p, rtol=1e-12)
    gradcheck(lambda t: F.pow(t, p), [x])


def test_pow_tensor_exponent_rejected(mk):
    with pytest.raises(TypeError, match="constant exponent"):
        F.pow(mk(2), mk(2))


def test_relu_away_from_kink(mk):
    x = mk(4, 5, away_from_zero=True)
    np.testing.assert_array_equal(npy(F.relu(x)), np.maximum(npy(x), 0))
    gradcheck(F.relu, [x], eps=1e-6)


def test_sigmoid_extremes(mk):
    x = mk(data=[-1000.0, -50.0, 0.0, 50.0, 1000.0])
    y = npy(F.sigmoid(x))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, [0.0, 1 / (1 + math.exp(50)), 0.5, 1 / (1 + math.exp(-50)), 1.0], atol=1e-15)


def test_gelu_is_gpt2_tanh_form(mk):
    x = mk(data=np.linspace(-6, 6, 49))
    a = npy(x)
    gpt2 = 0.5 * a * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * np.power(a, 3.0))))
    np.testing.assert_allclose(npy(F.gelu(x)), gpt2, rtol=1e-14, atol=1e-15)
    if torch is not None:
        t = torch.nn.functional.gelu(torch.from_numpy(a), approximate="tanh").numpy()
        np.testing.assert_allclose(npy(F.gelu(x)), t, rtol=1e-12, atol=1e-15)


def test_cast(mk, xp):
    x = mk(3, 4)
    assert F.cast(x, np.float64) is x  # same dtype: no op
    y = F.cast(x, np.float32)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(npy(x.grad), np.ones((3, 4)))
    # through float32 and back: differences need a larger step
    gradcheck(lambda t: F.cast(F.cast(t, np.float32) * 2.0, np.float64), [x], eps=1e-2, atol=1e-4, rtol=1e-4)
    assert x.astype(np.float32).dtype == np.float32


# ------------------------------------------------------------------------ matmuls


@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (3, 4, 2)),
                                   ((3, 4), (2, 4, 2))])
def test_matmul(mk, sa, sb):
    a, b = mk(*sa), mk(*sb)
    np.testing.assert_allclose(npy(a @ b), npy(a) @ npy(b), rtol=1e-12)
    gradcheck(F.matmul, [a, b])


def test_matmul_errors(mk):
    with pytest.raises(ValueError, match=">= 2 dims"):
        F.matmul(mk(4), mk(4, 2))
    with pytest.raises(ValueError, match="core dimension|mismatch|shape"):  # NumPy's / CuPy's words
        F.matmul(mk(3, 4), mk(5, 2))


@pytest.mark.parametrize("bias", [True, False])
def test_linear(mk, bias):
    x, w = mk(2, 3, 4), mk(5, 4)
    b = mk(5) if bias else None
    want = npy(x) @ npy(w).T + (npy(b) if bias else 0)
    np.testing.assert_allclose(npy(F.linear(x, w, b)), want, rtol=1e-12)
    gradcheck(lambda *t: F.linear(*t), [x, w] + ([b] if bias else []))


def test_linear_frozen_weight(mk):
    x, w, b = mk(3, 4), mk(5, 4, rg=False), mk(5)
    gradcheck(F.linear, [x, w, b])
    F.linear(x, w, b).sum().backward()
    assert w.grad is None


def test_linear_shape_error(mk):
    with pytest.raises(ValueError, match="input has 3 features but weight"):
        F.linear(mk(2, 3), mk(5, 4))


# ---------------------------------------------------------------------- reductions


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), (1,)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions(mk, op, axis, keepdims):
    x = mk(2, 3, 4)
    out = getattr(F, op)(x, axis, keepdims)
    want = getattr(np, {"sum": "sum", "mean": "mean", "max": "max"}[op])(npy(x), axis=axis, keepdims=keepdims)
    assert out.shape == want.shape
    assert isinstance(out.data, type(x.data))  # an array, even for a full reduction
    np.testing.assert_allclose(npy(out), want, rtol=1e-12)
    gradcheck(lambda t: getattr(F, op)(t, axis, keepdims), [x])


def test_max_ties_share_gradient(mk):
    x = mk(data=[[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]])
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(npy(x.grad), [[0, 0.5, 0.5], [1, 0, 0]])


def test_tensor_methods(mk):
    x = mk(2, 3)
    gradcheck(lambda t: t.sum(axis=1) * t.mean() + t.max(axis=0, keepdims=True).sum(), [x])


# -------------------------------------------------------------------------- shapes


def test_reshape(mk):
    x = mk(2, 3, 4)
    assert x.reshape(4, -1).shape == (4, 6)
    assert x.reshape((6, 4)).shape == (6, 4)
    gradcheck(lambda t: F.reshape(t, (3, 8)), [x])


@pytest.mark.parametrize("axes", [None, (1, 0, 2), (2, 0, 1), (-1, 0, 1)])
def test_transpose(mk, axes):
    x = mk(2, 3, 4)
    np.testing.assert_array_equal(npy(F.transpose(x, axes)), np.transpose(npy(x), axes))
    gradcheck(lambda t: F.transpose(t, axes), [x])
    gradcheck(lambda t: t.T, [mk(3, 2)])


def test_broadcast_to(mk):
    x = mk(3, 1)
    assert F.broadcast_to(x, (2, 3, 4)).shape == (2, 3, 4)
    gradcheck(lambda t: F.broadcast_to(t, (2, 3, 4)), [x])


BASIC_INDEX = [
    (slice(1, None), slice(None, None, 2)),
    (slice(None, None, -1),),
    (Ellipsis, -1),
    (None, 0),
    (slice(None, None, -2), slice(1, 3)),
    (1, slice(3, 0, -1)),
    2,
]


@pytest.mark.parametrize("idx", BASIC_INDEX)
def test_getitem_basic(mk, idx):
    x = mk(4, 5)
    np.testing.assert_array_equal(npy(x[idx]), npy(x)[idx])
    gradcheck(lambda t: t[idx], [x])


def test_getitem_advanced_repeats(mk, xp):
    x = mk(4, 5)
    rows = np.array([0, 2, 0, 3, 0])  # repeats: the gradient must accumulate
    cols = np.array([1, 1, 4, 0, 1])
    for idx in [rows, [3, 3, 1], (rows, cols), (rows, slice(1, 4)), (slice(None), [4, 4, 0])]:
        want = npy(x)[idx]
        dev_idx = tuple(asarray_on(xp, i) if not isinstance(i, slice) else i for i in idx) \
            if isinstance(idx, tuple) else asarray_on(xp, idx)
        np.testing.assert_array_equal(npy(x[dev_idx]), want)
        gradcheck(lambda t: t[dev_idx], [x])
    x.grad = None
    x[rows].sum().backward()
    np.testing.assert_array_equal(npy(x.grad)[:, 0], [3, 0, 1, 1])


def test_getitem_host_index_on_any_backend(mk):
    x = mk(4, 5)
    np.testing.assert_array_equal(npy(x[np.array([1, 1])]), npy(x)[[1, 1]])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concatenate(mk, axis):
    shapes = {0: [(1, 3, 2), (2, 3, 2), (3, 3, 2)], 1: [(2, 1, 2), (2, 2, 2), (2, 3, 2)],
              -1: [(2, 3, 1), (2, 3, 2), (2, 3, 1)]}[axis]
    xs = [mk(*s) for s in shapes]
    np.testing.assert_array_equal(npy(F.concatenate(xs, axis)), np.concatenate([npy(t) for t in xs], axis))
    gradcheck(lambda *ts: F.concatenate(ts, axis), xs)
    xs[1].requires_grad = False  # a frozen piece gets nothing, the others still do
    gradcheck(lambda *ts: F.concatenate(ts, axis), xs)


def test_concatenate_errors(mk):
    with pytest.raises(ValueError, match="at least one"):
        F.concatenate([])
    with pytest.raises(ValueError, match="concatenat"):  # "concatenation axis" (NumPy), "axis to concatenate" (CuPy)
        F.concatenate([mk(2, 3), mk(2, 4)], axis=0)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_stack(mk, axis):
    xs = [mk(2, 3) for _ in range(3)]
    np.testing.assert_array_equal(npy(F.stack(xs, axis)), np.stack([npy(t) for t in xs], axis))
    gradcheck(lambda *ts: F.stack(ts, axis), xs)


@pytest.mark.parametrize("sections,sizes", [(2, [2, 2, 1]), ([1, 3, 1], [1, 3, 1]), (5, [5])])
def test_split(mk, sections, sizes):
    x = mk(2, 5)
    parts = F.split(x, sections, axis=-1)
    assert [p.shape[-1] for p in parts] == sizes
    np.testing.assert_array_equal(np.concatenate([npy(p) for p in parts], -1), npy(x))
    gradcheck(lambda t: F.concatenate([p * (i + 1.0) for i, p in enumerate(F.split(t, sections, -1))], -1), [x])
    gradcheck(lambda t: F.split(t, sections, -1)[0], [x])  # unused pieces: zero gradient
    y = mk(4, 3)
    gradcheck(lambda t: F.split(t, 2, axis=0)[1] * 2.0, [y])


def test_split_error(mk):
    with pytest.raises(ValueError, match="do not add up"):
        F.split(mk(2, 5), [2, 2], axis=1)


# ------------------------------------------------------------ softmax and friends


def _np_softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_log_softmax(mk, axis):
    x = mk(3, 4)
    np.testing.assert_allclose(npy(F.softmax(x, axis)), _np_softmax(npy(x), axis), rtol=1e-12)
    np.testing.assert_allclose(npy(F.log_softmax(x, axis)), np.log(_np_softmax(npy(x), axis)), rtol=1e-12)
    gradcheck(lambda t: F.softmax(t, axis), [x])
    gradcheck(lambda t: F.log_softmax(t, axis), [x])


def test_softmax_stability(mk):
    big = mk(data=[[1000.0, 999.0, 998.0], [-1000.0, 0.0, 1000.0]])
    small = mk(data=[[2.0, 1.0, 0.0], [-2000.0, -1000.0, 0.0]])
    for f in (F.softmax, F.log_softmax):
        out = npy(f(big))
        assert np.all(np.isfinite(out))
    np.testing.assert_allclose(npy(F.softmax(big))[0], npy(F.softmax(small))[0], rtol=1e-12)
    np.testing.assert_allclose(npy(F.log_softmax(big))[0], npy(F.log_softmax(small))[0], rtol=1e-12)
    np.testing.assert_allclose(npy(F.log_softmax(big))[1], [-2000.0, -1000.0, 0.0], atol=1e-12)
    gradcheck(F.log_softmax, [big])
    gradcheck(F.softmax, [big])


def test_layer_norm(mk):
    x, w, b = mk(2, 3, 5), mk(5), mk(5)
    a = npy(x)
    xhat = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(npy(F.layer_norm(x, w, b)), xhat * npy(w) + npy(b), rtol=1e-10, atol=1e-12)
    gradcheck(F.layer_norm, [x, w, b])
    if torch is not None:
        t = torch.nn.functional.layer_norm(torch.from_numpy(a), (5,), torch.from_numpy(npy(w)),
                                           torch.from_numpy(npy(b)), eps=1e-5)
        np.testing.assert_allclose(npy(F.layer_norm(x, w, b)), t.numpy(), rtol=1e-10, atol=1e-12)


def test_layer_norm_partly_frozen(mk):
    x, w, b = mk(4, 6), mk(6), mk(6)
    for frozen in ([x], [w, b], [x, w], [x, b]):
        for t in (x, w, b):
            t.requires_grad = t not in frozen
        gradcheck(F.layer_norm, [x, w, b])


def test_embedding(mk, xp):
    w = mk(6, 3)
    idx = asarray_on(xp, np.array([[0, 5, 0], [2, 0, 5]]))  # repeats: scatter-add
    np.testing.assert_array_equal(npy(F.embedding(idx, w)), npy(w)[npy(idx)])
    gradcheck(lambda t: F.embedding(idx, t), [w])
    w.grad = None
    F.embedding(idx, w).sum().backward()
    np.testing.assert_array_equal(npy(w.grad)[:, 0], [3, 0, 1, 0, 0, 2])
    assert F.embedding(np.array([1, 2]), w).shape == (2, 3)  # host indices are moved to w's backend


def test_embedding_errors(mk):
    w = mk(6, 3)
    with pytest.raises(ValueError, match=r"out of range.*\[0, 6\].*6 rows"):
        F.embedding(np.array([0, 6]), w)
    with pytest.raises(ValueError, match="out of range"):
        F.embedding(np.array([-1]), w)
    with pytest.raises(TypeError, match="integers"):
        F.embedding(np.array([0.0, 1.0]), w)


def _rng(xp, seed):
    return xp.random.default_rng(seed)


def test_dropout_gradient_with_fixed_mask(mk, xp):
    x = mk(4, 6)
    gradcheck(lambda t: F.dropout(t, 0.3, True, rng=_rng(xp, 7)), [x])
    y = npy(F.dropout(x, 0.3, True, rng=_rng(xp, 7)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], npy(x)[kept] / 0.7, rtol=1e-12)


def test_dropout_statistics(xp):
    p, n = 0.25, 200_000
    x = Tensor(asarray_on(xp, np.ones(n)), requires_grad=True)
    y = npy(F.dropout(x, p, True, rng=_rng(xp, 0)))
    keep = y != 0
    assert abs(keep.mean() - (1 - p)) < 0.005  # ~ 5 standard deviations
    assert abs(y.mean() - 1.0) < 0.01  # inverted dropout keeps the expectation
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / (1 - p)])


def test_dropout_default_generator_is_seeded(mk):
    """Without an rng, dropout draws from minipeft.random: manual_seed repeats it, and its
    saved state (JSON, for checkpoints) resumes the very same stream."""
    import json

    from minipeft import random as mrandom

    x = mk(50)
    before = mrandom.get_state()
    try:
        mrandom.manual_seed(3)
        a = npy(F.dropout(x, 0.5))
        state = json.loads(json.dumps(mrandom.get_state()))
        b = npy(F.dropout(x, 0.5))
        mrandom.manual_seed(3)
        np.testing.assert_array_equal(npy(F.dropout(x, 0.5)), a)
        assert not np.array_equal(a, b)
        if x.device == "cpu":
            mrandom.set_state(state)
            np.testing.assert_array_equal(npy(F.dropout(x, 0.5)), b)
        with pytest.raises(ValueError, match="non-negative integer"):
            mrandom.manual_seed(-1)
    finally:
        mrandom.set_state(before)  # leave the global stream as other tests found it


def test_dropout_identity_and_errors(mk):
    x = mk(3, 4)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0, training=True) is x
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            F.dropout(x, p)


# --------------------------------------------------------------------- cross-entropy


def _np_cross_entropy(logits, targets, ignore_index=-100, eps=0.0):
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    valid = targets != ignore_index
    t = np.where(valid, targets, 0)
    loss = -(1 - eps) * logp[np.arange(len(t)), t] - eps * logp.mean(-1)
    return loss[valid].mean()


CE_CASES = [(-100, 0.0), (-100, 0.1), (3, 0.2)]


@pytest.mark.parametrize("ignore_index,eps", CE_CASES)
def test_cross_entropy(mk, xp, ignore_index, eps):
    logits = mk(2, 4, 5)
    t = np.array([[1, ignore_index, 4, 0], [ignore_index, 2, 2, 3]])
    targets = asarray_on(xp, t)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=eps)
    assert loss.shape == ()
    want = _np_cross_entropy(npy(logits), t, ignore_index, eps)
    np.testing.assert_allclose(float(npy(loss)), want, rtol=1e-12)
    gradcheck(lambda z: F.cross_entropy(z, targets, ignore_index, eps), [logits])
    if torch is not None:
        tl = torch.from_numpy(npy(logits)).reshape(-1, 5).requires_grad_(True)
        tt = torch.nn.functional.cross_entropy(tl, torch.from_numpy(t).reshape(-1), ignore_index=ignore_index,
                                               label_smoothing=eps)
        np.testing.assert_allclose(float(npy(loss)), tt.item(), rtol=1e-12)
        tt.backward()
        logits.grad = None
        loss.backward()
        np.testing.assert_allclose(npy(logits.grad).reshape(-1, 5), tl.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_gradient_is_softmax_minus_smoothed_targets(mk, xp, eps):
    # d loss / d z = (softmax(z) - (1 - eps) onehot(y) - eps / V) / (non-ignored rows); 0 on ignored rows
    logits = mk(4, 6)
    t = np.array([2, -100, 5, 0])
    loss = F.cross_entropy(logits, asarray_on(xp, t), label_smoothing=eps)
    loss.backward()
    z = npy(logits)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p - eps / 6
    want[np.arange(4), np.where(t < 0, 0, t)] -= 1 - eps
    want[t < 0] = 0.0
    np.testing.assert_allclose(npy(logits.grad), want / 3, rtol=1e-10, atol=1e-14)


def test_cross_entropy_large_logits(mk, xp):
    logits = mk(data=[[1000.0, 0.0, -1000.0], [0.0, 1000.0, 999.0]])
    loss = F.cross_entropy(logits, asarray_on(xp, np.array([0, 2])))
    np.testing.assert_allclose(float(npy(loss)), (0.0 + 1.0 + math.log1p(math.exp(-1.0))) / 2, rtol=1e-12)


def test_cross_entropy_all_ignored_is_nan(mk, xp):
    loss = F.cross_entropy(mk(2, 3), asarray_on(xp, np.array([-100, -100])))
    assert np.isnan(float(npy(loss)))


def test_cross_entropy_errors(mk, xp):
    with pytest.raises(ValueError, match=r"targets shape \(3,\)"):
        F.cross_entropy(mk(2, 5), asarray_on(xp, np.array([0, 1, 2])))
    with pytest.raises(TypeError, match="integer class indices"):
        F.cross_entropy(mk(2, 5), asarray_on(xp, np.array([0.0, 1.0])))
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(mk(2, 5), asarray_on(xp, np.array([0, 1])), label_smoothing=1.0)


# ------------------------------------------------------------------------ attention


def _np_attention(q, k, v, causal, key_mask=None, scale=None):
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    s = q @ np.swapaxes(k, -1, -2) * (1 / math.sqrt(d) if scale is None else scale)
    allowed = np.ones((tq, tk), bool)
    if causal:
        allowed = np.arange(tk)[None, :] <= (tk - tq) + np.arange(tq)[:, None]  # bottom-right aligned
    allowed = np.broadcast_to(allowed, s.shape)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    s = np.where(allowed, s, -np.inf)
    with np.errstate(invalid="ignore"):  # a fully masked row is NaN here (as in torch)
        return _np_softmax(s, -1) @ v, allowed


ATTN_CASES = {
    "causal": dict(tq=3, tk=3, causal=True, mask=None),
    "prefix": dict(tq=3, tk=5, causal=True, mask=None),
    "padding": dict(tq=4, tk=4, causal=True, mask=[[1, 1, 1, 1], [1, 1, 0, 0]]),
    "padding, not causal": dict(tq=4, tk=4, causal=False, mask=[[1, 1, 1, 1], [0, 1, 1, 0]]),
    "prefix+padding": dict(tq=3, tk=5, causal=True, mask=[[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]),
    "full": dict(tq=3, tk=4, causal=False, mask=None),
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention(mk, xp, case):
    c = ATTN_CASES[case]
    B, H, D = 2, 2, 4
    q, k, v = mk(B, H, c["tq"], D), mk(B, H, c["tk"], D), mk(B, H, c["tk"], D)
    mask_np = None if c["mask"] is None else np.array(c["mask"], bool)
    mask = None if mask_np is None else asarray_on(xp, mask_np)
    out = F.scaled_dot_product_attention(q, k, v, causal=c["causal"], key_mask=mask)
    want, allowed = _np_attention(npy(q), npy(k), npy(v), c["causal"], mask_np)
    assert out.shape == (B, H, c["tq"], D)
    np.testing.assert_allclose(npy(out), want, rtol=1e-10, atol=1e-12)
    gradcheck(lambda a, b, d: F.scaled_dot_product_attention(a, b, d, c["causal"], mask), [q, k, v])
    if torch is not None:
        tq_, tk_, tv_ = (torch.from_numpy(npy(t)) for t in (q, k, v))
        tout = torch.nn.functional.scaled_dot_product_attention(tq_, tk_, tv_, attn_mask=torch.from_numpy(
            np.ascontiguousarray(allowed)))
        np.testing.assert_allclose(npy(out), tout.numpy(), rtol=1e-10, atol=1e-12)
        if case == "causal":  # square causal: torch's own is_causal agrees too
            tout = torch.nn.functional.scaled_dot_product_attention(tq_, tk_, tv_, is_causal=True)
            np.testing.assert_allclose(npy(out), tout.numpy(), rtol=1e-10, atol=1e-12)


def test_attention_scale_and_frozen_inputs(mk):
    q, k, v = mk(1, 2, 3, 4), mk(1, 2, 3, 4, rg=False), mk(1, 2, 3, 4)
    out = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    np.testing.assert_allclose(npy(out), _np_attention(npy(q), npy(k), npy(v), True, scale=0.3)[0], rtol=1e-10)
    gradcheck(lambda a, b, d: F.scaled_dot_product_attention(a, b, d, scale=0.3), [q, k, v])


def test_attention_fully_masked_query_stays_finite(mk):
    """Left padding: query 0 of row 1 may see only key 0, which is padding. Its output is
    meaningless but must be finite (no NaN leaking into the loss or the gradients)."""
    q, k, v = mk(2, 1, 3, 4), mk(2, 1, 3, 4), mk(2, 1, 3, 4)
    mask = np.array([[1, 1, 1], [0, 1, 1]], bool)
    out = F.scaled_dot_product_attention(q, k, v, key_mask=mask)
    assert np.all(np.isfinite(npy(out)))
    want, _ = _np_attention(npy(q), npy(k), npy(v), True, mask)
    np.testing.assert_allclose(npy(out)[1, :, 1:], want[1, :, 1:], rtol=1e-10)  # the real queries
    out.sum().backward()
    assert all(np.all(np.isfinite(npy(t.grad))) for t in (q, k, v))


def test_attention_list_mask(mk):
    q = mk(2, 1, 2, 4)
    out = F.scaled_dot_product_attention(q, q, q, key_mask=[[1, 1], [0, 1]])
    assert np.all(np.isfinite(npy(out)))


def test_attention_errors(mk):
    q = mk(2, 2, 3, 4)
    with pytest.raises(ValueError, match="do not fit"):
        F.scaled_dot_product_attention(q, mk(2, 2, 3, 5), mk(2, 2, 3, 5))
    with pytest.raises(ValueError, match="do not fit"):
        F.scaled_dot_product_attention(q, mk(2, 2, 3, 4), mk(2, 2, 2, 4))
    with pytest.raises(ValueError, match="at least as many keys"):
        F.scaled_dot_product_attention(q, mk(2, 2, 2, 4), mk(2, 2, 2, 4))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(B, Tk\) = \(2, 3\)"):
        F.scaled_dot_product_attention(q, q, q, key_mask=np.ones((2, 4), bool))
