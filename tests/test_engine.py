"""The autograd engine: graph walking, gradient accumulation, no_grad, detach,
needs_input_grad, and the ledger of bytes saved for backward."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import minipeft.functional as F
from minipeft.backend import to_numpy
from minipeft.engine import (Function, Tensor, enable_grad, is_grad_enabled, no_grad, peak_saved_bytes,
                             reset_peak_saved_bytes, saved_bytes)
from minipeft.testing import asarray_on, gradcheck


@pytest.fixture
def mk(xp):
    rng = np.random.default_rng(0)

    def make(*shape, rg=True, dtype=np.float64):
        return Tensor(asarray_on(xp, rng.standard_normal(shape).astype(dtype)), requires_grad=rg)

    return make


@pytest.fixture(autouse=True)
def _clean_ledger():
    gc.collect()  # graphs of earlier tests are gone
    assert saved_bytes() == 0
    yield
    gc.collect()


def npy(a):
    return to_numpy(a.data if isinstance(a, Tensor) else a)


# ---------------------------------------------------------------- graph and grads


def test_diamond_graph_accumulates(mk):
    x = mk(3)
    a = x * 2.0  # x feeds two paths that meet again
    b = x * x
    y = (a * b + a).sum()  # 2x^3 + 2x
    y.backward()
    np.testing.assert_allclose(npy(x.grad), 6 * npy(x) ** 2 + 2, rtol=1e-12)
    gradcheck(lambda t: (t * 2.0) * (t * t) + t * 2.0, [mk(3)])


def test_same_tensor_twice_in_one_op(mk):
    x = mk(2, 2)
    (x * x).sum().backward()
    np.testing.assert_allclose(npy(x.grad), 2 * npy(x))
    x.grad = None
    (x @ x).sum().backward()
    gradcheck(lambda t: t @ t + t, [mk(2, 2)])


def test_grads_accumulate_across_backward_calls(mk):
    x = mk(4)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()  # a second, separate graph
    np.testing.assert_allclose(npy(x.grad), 3 + 2 * npy(x))
    x.zero_grad()
    assert x.grad is None


def test_leaf_grads_are_not_aliased(mk, xp):
    a, b = mk(3), mk(3)
    (a + b).sum().backward()
    assert a.grad is not b.grad
    a.grad *= 5.0  # an optimizer scaling in place must not touch b's gradient
    np.testing.assert_array_equal(npy(b.grad), np.ones(3))
    g = asarray_on(xp, np.ones(3))
    c = mk(3)
    c.backward(g)  # a leaf root: its grad is a copy of the caller's array
    assert c.grad is not g


def test_retain_graph(mk):
    x = mk(3)
    y = (x.tanh() * 2.0).sum()
    y.backward(retain_graph=True)
    g1 = npy(x.grad).copy()
    y.backward()
    np.testing.assert_allclose(npy(x.grad), 2 * g1)
    with pytest.raises(RuntimeError, match="already freed.*retain_graph=True"):
        y.backward()


def test_backward_through_freed_shared_subgraph_raises(mk):
    w = mk(3)
    h = w.exp()  # computed once, used by two losses
    (h * 2.0).sum().backward()
    with pytest.raises(RuntimeError, match="already freed"):
        (h * 3.0).sum().backward()


def test_backward_non_scalar(mk, xp):
    x = mk(2, 3)
    y = x * 2.0
    with pytest.raises(RuntimeError, match="needs a scalar"):
        y.backward()
    with pytest.raises(ValueError, match=r"grad has shape \(3,\)"):
        y.backward(asarray_on(xp, np.ones(3)))
    y.backward(asarray_on(xp, np.arange(6.0).reshape(2, 3)))
    np.testing.assert_allclose(npy(x.grad), 2 * np.arange(6.0).reshape(2, 3))


def test_backward_without_grad_requirement(mk):
    x = mk(3, rg=False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        (x * 2.0).sum().backward()


def test_deep_graph_has_no_recursion_limit(mk):
    x = mk(1)
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_array_equal(npy(x.grad), [1.0])


def test_no_grad_records_nothing(mk):
    x = mk(3, 4)
    w = mk(5, 4)
    assert is_grad_enabled()
    with no_grad():
        assert not is_grad_enabled()
        y = F.linear(x.tanh(), w).exp()
        assert not y.requires_grad and y.is_leaf
        assert saved_bytes() == 0
        with enable_grad():
            z = x.tanh()
            assert z.requires_grad and saved_bytes() > 0
        del z
    assert is_grad_enabled()
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_detach(mk):
    x = mk(3)
    y = x * 2.0
    d = y.detach()
    assert d.data is y.data and not d.requires_grad and d.is_leaf
    (d * x).sum().backward()
    np.testing.assert_allclose(npy(x.grad), 2 * npy(x))  # nothing flowed through d


def test_requires_grad_needs_floats():
    with pytest.raises(TypeError, match="only floating tensors"):
        Tensor(np.arange(3), requires_grad=True)
    Tensor(np.arange(3))  # fine without grad


def test_tensor_construction():
    assert Tensor([1.0, 2.0]).dtype == np.float32  # Python floats become float32
    assert Tensor(np.ones(2)).dtype == np.float64  # arrays keep their dtype
    assert Tensor(np.ones(2), dtype=np.float16).dtype == np.float16
    t = Tensor(np.ones((2, 2)), requires_grad=True)
    s = t.sum()
    assert isinstance(s.data, np.ndarray) and s.shape == () and s.item() == 4.0
    with pytest.raises(ValueError, match="one element"):
        t.item()
    assert isinstance(np.ones(2) + Tensor(np.ones(2)), Tensor)  # ndarray defers to Tensor


def test_needs_input_grad_is_visible():
    seen = {}

    class Probe(Function):
        @staticmethod
        def forward(ctx, a, b):
            seen["needs"] = ctx.needs_input_grad
            return a + b

        @staticmethod
        def backward(ctx, g):
            return g, g

    a, b = Tensor(np.ones(2), requires_grad=True), Tensor(np.ones(2))
    Probe.apply(a, b)
    assert seen["needs"] == (True, False)
    with no_grad():
        Probe.apply(a, b)
    assert seen["needs"] == (False, False)


# --------------------------------------------------------------- saved-bytes ledger


def test_frozen_weight_gets_no_grad_and_linear_skips_x(mk):
    x0 = mk(4, 6, 8)
    x = x0 + 0.0  # an activation (not a leaf); adds save nothing
    assert saved_bytes() == 0
    w_train, w_frozen = mk(5, 8), mk(5, 8, rg=False)

    y = F.linear(x, w_train)
    assert saved_bytes() == x.nbytes  # x for dL/dW; W itself is a leaf, not counted
    y.sum().backward()
    assert saved_bytes() == 0 and w_train.grad is not None

    x = x0 + 0.0
    y = F.linear(x, w_frozen)
    assert saved_bytes() == 0  # dL/dx = g W needs only W: x is not kept
    y.sum().backward()
    assert w_frozen.grad is None
    want = npy(w_train).sum(0) + npy(w_frozen).sum(0)  # x0 took part in both backward passes
    np.testing.assert_allclose(npy(x0.grad), np.broadcast_to(want, (4, 6, 8)), rtol=1e-12)


def test_saved_bytes_released_after_backward_and_after_del(mk):
    x = mk(3, 4)
    y = x.tanh()  # saves its output: 12 float64
    z = y.exp()  # saves its output too
    assert saved_bytes() == 2 * 12 * 8
    z.sum().backward()
    assert saved_bytes() == 0

    y = x.tanh().exp()
    assert saved_bytes() == 2 * 12 * 8
    del y  # the graph is dropped without backward
    gc.collect()
    assert saved_bytes() == 0


def test_peak_saved_bytes(mk):
    x = mk(10)
    reset_peak_saved_bytes()
    assert peak_saved_bytes() == 0
    y = x.tanh().tanh().tanh()  # three saved outputs of 80 bytes
    assert saved_bytes() == peak_saved_bytes() == 240
    y.sum().backward()
    assert saved_bytes() == 0 and peak_saved_bytes() == 240
    reset_peak_saved_bytes()
    assert peak_saved_bytes() == 0


def test_shared_buffer_counted_once(mk):
    h = mk(4, 8).tanh()  # tanh saves its output: one buffer of 256 bytes
    assert saved_bytes() == h.nbytes
    w1, w2 = mk(3, 8), mk(2, 8)
    a, b = F.linear(h, w1), F.linear(h, w2)  # both keep h: still one buffer
    assert saved_bytes() == h.nbytes
    del a
    gc.collect()
    assert saved_bytes() == h.nbytes  # b and tanh still hold it
    del b, h
    gc.collect()
    assert saved_bytes() == 0


def test_views_of_one_buffer_counted_once(mk):
    qkv = mk(2, 9) + 0.0  # like c_attn's fused output
    q, k, v = F.split(qkv, 3, axis=-1)  # views: nothing saved yet
    assert saved_bytes() == 0
    y = q * k * v  # saves views of qkv: counted as the one (2, 9) buffer
    assert saved_bytes() == qkv.nbytes + (q * k).nbytes  # plus q * k, a new buffer
    y.sum().backward()
    assert saved_bytes() == 0


def test_leaf_data_not_counted(mk):
    a, b = mk(5, 5), mk(5, 5)
    y = a * b  # saves a and b, both leaves (parameters, inputs)
    assert saved_bytes() == 0
    z = F.linear(a, b) + F.matmul(a, b)
    assert saved_bytes() == 0
    del y, z


def test_unsaved_activations_are_freed_while_graph_lives():
    """The graph keeps what save_for_backward kept, not every intermediate output:
    the memory held matches the ledger. (NumPy only: it watches the array by weakref.)"""
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((4, 8)), requires_grad=True)
    w = Tensor(rng.standard_normal((8, 8)))
    h = F.linear(x, w)  # frozen weight: x is not saved, and h is saved by nobody below
    ref = weakref.ref(h.data)
    y = h + 1.0
    loss = (y * 2.0).sum()
    del h, y
    gc.collect()
    assert ref() is None  # freed, though loss's graph is alive
    loss.backward()
    np.testing.assert_allclose(npy(x.grad), np.broadcast_to(2 * npy(w).sum(0), (4, 8)), rtol=1e-12)


def test_no_grad_saves_nothing(mk):
    x, w = mk(4, 8), mk(8, 8)
    with no_grad():
        y = F.layer_norm(F.linear(x, w).tanh(), mk(8), mk(8))
        assert saved_bytes() == 0 and peak_saved_bytes() >= 0
    assert not y.requires_grad


# ------------------------------------------------------- post-accumulate-grad hooks


def test_post_accumulate_grad_hook_sees_the_final_grad_once_per_backward(mk):
    w, x = mk(3, 3), mk(2, 3)
    seen = []
    w.register_post_accumulate_grad_hook(lambda t: seen.append(npy(t.grad).copy()))
    ((x @ w) @ w).sum().backward()  # w used twice (as GPT-2's tied wte): one call, with both uses summed
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], npy(w.grad))
    (x @ w).sum().backward()  # a second backward: called again, after adding into .grad
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[1], npy(w.grad))
    assert not np.array_equal(seen[0], seen[1])


def test_post_accumulate_grad_hook_is_not_called_without_a_grad_and_is_removable(mk, xp):
    from minipeft.engine import grad

    a, b = mk(3), mk(3)
    calls = []
    ha = a.register_post_accumulate_grad_hook(lambda t: calls.append("a"))
    b.register_post_accumulate_grad_hook(lambda t: calls.append("b"))
    (a * 2.0).sum().backward()  # b is not in this graph
    assert calls == ["a"] and b.grad is None
    grad((a * b).sum(), [a, b], asarray_on(xp, np.ones(())))  # returned, not accumulated: no hook
    assert calls == ["a"]
    ha.remove()
    ha.remove()  # twice is harmless
    (a * b).sum().backward()
    assert calls == ["a", "b"]
    with pytest.raises(RuntimeError, match="only a leaf tensor that requires grad.*frozen"):
        mk(3, rg=False).register_post_accumulate_grad_hook(print)
    with pytest.raises(RuntimeError, match="not a leaf"):
        (a * 2.0).register_post_accumulate_grad_hook(print)


def test_last_layer_grads_are_ready_before_backward_reaches_the_first_layer(mk):
    """Each leaf comes right after the last op that uses it, so a data-parallel bucket can be
    reduced while backward runs on: here w2's hook fires before the first layer's backward."""
    events = []

    class Spy(Function):  # identity that logs when backward passes it
        @staticmethod
        def forward(ctx, a):
            return a

        @staticmethod
        def backward(ctx, g):
            events.append("first layer's backward")
            return (g,)

    x, w1, w2 = mk(2, 3), mk(3, 3), mk(3, 3)
    for name, w in (("w1", w1), ("w2", w2)):
        w.register_post_accumulate_grad_hook(lambda t, name=name: events.append(name))
    h = Spy.apply(x @ w1)  # (2, 3)
    (h.tanh() @ w2).sum().backward()
    assert events == ["w2", "first layer's backward", "w1"]
