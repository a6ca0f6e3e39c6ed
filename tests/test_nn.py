"""Modules: names, tied parameters, state dicts, submodule surgery, modes, and the
layers' gradients (through minipeft.testing.gradcheck_module)."""
from __future__ import annotations

import numpy as np
import pytest

import minipeft.functional as F
from minipeft import nn
from minipeft.backend import to_numpy
from minipeft.engine import Tensor
from minipeft.testing import asarray_on, gradcheck, gradcheck_module


class Block(nn.Module):
    def __init__(self, c, rng):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 2 * c, rng=rng)
        self.proj = nn.Linear(2 * c, c, bias=False, rng=rng)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln(x)))))


class Tiny(nn.Module):
    """wte tied to head, like GPT-2's lm_head."""

    def __init__(self, v=7, c=4, n=2, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.wte = nn.Embedding(v, c, rng=rng, std=0.1)
        self.h = nn.ModuleList([Block(c, rng) for _ in range(n)])
        self.head = nn.Linear(c, v, bias=False, rng=rng)
        self.head.weight = self.wte.weight  # tied

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.h:
            x = b(x)
        return self.head(x)


def names(m):
    return [n for n, _ in m.named_parameters()]


def test_named_parameters_and_tied_once():
    m = Tiny()
    assert names(m) == [
        "wte.weight",
        "h.0.ln.weight", "h.0.ln.bias", "h.0.fc.weight", "h.0.fc.bias", "h.0.proj.weight",
        "h.1.ln.weight", "h.1.ln.bias", "h.1.fc.weight", "h.1.fc.bias", "h.1.proj.weight",
    ]  # head.weight is wte.weight: listed once, under its first name
    assert m.head.weight is m.wte.weight
    assert list(m.state_dict()) == names(m)
    assert [n for n, _ in m.h[0].named_parameters(prefix="h.0")][0] == "h.0.ln.weight"
    assert names(m.h[0].fc) == ["weight", "bias"]
    assert [n for n, _ in m.named_parameters(recurse=False)] == []


def test_num_parameters():
    m = Tiny(v=7, c=4, n=2)
    per_block = 4 + 4 + 8 * 4 + 8 + 4 * 8
    assert m.num_parameters() == 7 * 4 + 2 * per_block
    m.wte.weight.requires_grad = False
    assert m.num_parameters(trainable_only=True) == 2 * per_block
    m.requires_grad_(False)
    assert m.num_parameters(trainable_only=True) == 0
    assert m.num_parameters() == 7 * 4 + 2 * per_block


def test_module_list_naming_and_order():
    ml = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 3)])
    ml.append(nn.LayerNorm(3))
    assert [n for n, _ in ml.named_modules()] == ["", "0", "1", "2"]
    assert len(ml) == 3 and isinstance(ml[-1], nn.LayerNorm) and ml[1].out_features == 3
    assert [type(m).__name__ for m in ml] == ["Linear", "Linear", "LayerNorm"]


def test_state_dict_round_trip():
    a, b = Tiny(seed=0), Tiny(seed=1)
    idx = np.array([[1, 2, 3], [6, 0, 1]])
    assert not np.allclose(a(idx).numpy(), b(idx).numpy())
    a.eval(), b.eval()
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(a(idx).numpy(), b(idx).numpy())
    assert b.head.weight is b.wte.weight  # still tied after loading
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.data is not q.data  # loaded by copy
        np.testing.assert_array_equal(p.data, q.data)


def test_load_state_dict_casts_to_model_dtype():
    m = nn.Linear(3, 2)
    m.load_state_dict({"weight": np.ones((2, 3), np.float64), "bias": np.zeros(2, np.float64)})
    assert m.weight.dtype == np.float32


def test_load_state_dict_strict_errors_leave_model_unchanged():
    m = Tiny()
    before = {k: v.copy() for k, v in m.state_dict().items()}
    sd = {k: np.zeros_like(v) for k, v in m.state_dict().items()}
    del sd["h.1.fc.bias"]
    sd["h.9.fc.weight"] = np.zeros((2, 2))
    sd["h.0.proj.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="load_state_dict failed") as e:
        m.load_state_dict(sd)
    msg = str(e.value)
    assert "missing keys (1): ['h.1.fc.bias']" in msg
    assert "unexpected keys (1): ['h.9.fc.weight']" in msg
    assert "shape mismatches (1): ['h.0.proj.weight: checkpoint (3, 3) vs model (4, 8)']" in msg
    assert "model unchanged" in msg
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_non_strict():
    m = Tiny()
    sd = {k: np.zeros_like(v) for k, v in m.state_dict().items()}
    del sd["wte.weight"]
    sd["extra"] = np.zeros(1)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert missing == ["wte.weight"] and unexpected == ["extra"]
    assert np.all(m.h[0].fc.weight.data == 0) and np.any(m.wte.weight.data != 0)
    sd["h.0.fc.weight"] = np.zeros((1, 1))
    with pytest.raises(ValueError, match="shape mismatches"):  # shapes are checked even non-strict
        m.load_state_dict(sd, strict=False)


def test_get_submodule():
    m = Tiny()
    assert m.get_submodule("") is m
    assert m.get_submodule("h.1.fc") is m.h[1].fc
    with pytest.raises(KeyError, match=r"no submodule 'h.1.nope'.*Block has children \['ln', 'fc', 'proj', 'drop'\]"):
        m.get_submodule("h.1.nope")
    with pytest.raises(KeyError, match=r"no submodule 'h.5.fc': ModuleList has children \['0', '1'\]"):
        m.get_submodule("h.5.fc")
    with pytest.raises(KeyError, match=r"no submodule 'h.0.fc.weight': Linear has children \[\]"):
        m.get_submodule("h.0.fc.weight")  # a parameter, not a module


def test_set_submodule_keeps_names_and_order():
    m = Tiny()
    new = nn.Linear(4, 8, rng=np.random.default_rng(5))
    m.set_submodule("h.0.fc", new)
    assert m.h[0].fc is new
    assert names(m) == names(Tiny())  # same names, same order
    block = Block(4, np.random.default_rng(6))
    m.set_submodule("h.0", block)
    assert m.h[0] is block and m.h[1] is not block  # ModuleList position kept
    assert [n for n, _ in m.h.named_modules()][:2] == ["", "0"]
    with pytest.raises(KeyError, match="no submodule 'h.0.nope' to replace"):
        m.set_submodule("h.0.nope", nn.Linear(2, 2))
    with pytest.raises(KeyError, match=r"no submodule 'h.7': ModuleList has children"):
        m.set_submodule("h.7.fc", nn.Linear(2, 2))
    with pytest.raises(TypeError, match="needs a Module"):
        m.set_submodule("h.0.fc", "not a module")


def test_assigning_none_or_plain_values_unregisters():
    lin = nn.Linear(3, 2)
    lin.bias = None
    assert names(lin) == ["weight"]
    lin.bias = nn.Parameter(np.zeros(2, np.float32))
    assert names(lin) == ["weight", "bias"]


def test_module_needs_super_init():
    class Bad(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(2))

    with pytest.raises(RuntimeError, match=r"must call super\(\).__init__\(\)"):
        Bad()


def test_train_eval_propagate():
    m = Tiny()
    assert all(x.training for x in m.modules())
    assert m.eval() is m
    assert not any(x.training for x in m.modules())
    x = Tensor(np.ones((2, 4), np.float32))
    assert m.h[0].drop(x) is x  # eval dropout: identity
    m.train()
    assert all(x.training for x in m.modules())
    m.h[1].eval()
    assert m.training and not m.h[1].drop.training and m.h[0].drop.training


def test_zero_grad_and_parameters():
    m = Tiny()
    m.eval()
    F.cross_entropy(m(np.array([[1, 2]])), np.array([[2, 3]])).backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_to_cpu_and_device():
    m = Tiny()
    assert m.device == "cpu"
    assert m.to("cpu") is m and m.head.weight is m.wte.weight
    with pytest.raises(ValueError, match="unknown device"):
        m.to("tpu")


def test_linear_layout_and_errors():
    lin = nn.Linear(3, 5, rng=0)
    assert lin.weight.shape == (5, 3) and lin.bias.shape == (5,)
    assert np.all(np.abs(lin.weight.data) <= 1 / np.sqrt(3))
    assert "in_features=3, out_features=5, bias=True" in repr(lin)
    with pytest.raises(ValueError, match="positive sizes"):
        nn.Linear(0, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        nn.Dropout(1.0)


def test_repr_lists_children():
    r = repr(Tiny(n=1))
    assert "(h): ModuleList" in r and "(0): Block" in r and "(fc): Linear" in r


# ------------------------------------------------------------ layers' gradients


def _to64(m, xp):
    for p in m.parameters():
        p.data = asarray_on(xp, to_numpy(p.data), dtype=np.float64)
    return m


def test_gradcheck_layers(xp):
    rng = np.random.default_rng(0)
    x = Tensor(asarray_on(xp, rng.standard_normal((2, 3, 4))), requires_grad=True)
    for layer in (nn.Linear(4, 3, rng=1), nn.Linear(4, 2, bias=False, rng=2), nn.LayerNorm(4)):
        _to64(layer, xp)
        gradcheck_module(layer, lambda m: m(x), extra_inputs=[x])
    emb = _to64(nn.Embedding(5, 3, rng=3), xp)
    idx = asarray_on(xp, np.array([[0, 4, 0], [1, 1, 2]]))
    gradcheck_module(emb, lambda m: m(idx))


def test_gradcheck_whole_tiny_model(xp):
    m = _to64(Tiny(), xp).eval()
    idx = asarray_on(xp, np.array([[1, 2, 3], [6, 0, 1]]))
    targets = asarray_on(xp, np.array([[2, 3, -100], [0, 1, 5]]))
    err = gradcheck_module(m, lambda mod: F.cross_entropy(mod(idx), targets))
    assert err < 1e-6


def test_gradcheck_module_skips_frozen(xp):
    lin = _to64(nn.Linear(3, 2, rng=0), xp)
    lin.weight.requires_grad = False
    x = Tensor(asarray_on(xp, np.ones((1, 3))))
    gradcheck_module(lin, lambda m: m(x))  # only the bias is checked
    lin.bias.requires_grad = False
    with pytest.raises(ValueError, match="nothing to check"):
        gradcheck_module(lin, lambda m: m(x))


def test_gradcheck_reports_wrong_gradients():
    from minipeft.engine import Function

    class BadSquare(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return (g * x,)  # should be 2 x g

    x = Tensor(np.array([[0.5, -1.0], [2.0, 3.0]]), requires_grad=True)
    with pytest.raises(AssertionError, match=r"input 0 \(shape \(2, 2\)\): 4 of 4 elements differ; worst at index"):
        gradcheck(BadSquare.apply, [x])
    with pytest.raises(TypeError, match="float64"):
        gradcheck(BadSquare.apply, [Tensor(np.ones(2, np.float32), requires_grad=True)])
    rng = np.random.default_rng(0)
    with pytest.raises(AssertionError, match="not deterministic"):
        gradcheck(lambda t: t * float(rng.random()), [x])
    assert gradcheck(lambda t: t * t, [x]) < 1e-7
    assert x.grad is None  # gradcheck leaves the caller's grads alone


# ---- init helpers: layers built around given weights (PEFT methods draw their own)


def test_kaiming_uniform_bounds_match_torch():
    rng = np.random.default_rng(0)
    w = nn.init.kaiming_uniform(rng, (300, 400))  # a = sqrt(5): nn.Linear's and LoRA A's bound 1/sqrt(in)
    assert w.shape == (300, 400) and np.abs(w).max() <= 1 / np.sqrt(400) < np.abs(w).max() * 1.01
    w = nn.init.kaiming_uniform(rng, (300, 24), a=0.0)  # ReLU gain: sqrt(6 / in) (VeRA's projections)
    assert np.abs(w).max() <= np.sqrt(6 / 24) < np.abs(w).max() * 1.05


def test_from_weight_keeps_the_given_tensors():
    w = nn.Parameter.from_numpy(np.arange(6).reshape(2, 3), np.float64)
    assert w.dtype == np.float64 and w.requires_grad
    lin = nn.Linear.from_weight(w, np.ones(2))
    assert (lin.in_features, lin.out_features) == (3, 2) and lin.weight is w
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    np.testing.assert_array_equal(lin(Tensor(np.ones((1, 3)))).data, [[4.0, 13.0]])  # x W^T + b
    assert nn.Linear.from_weight(np.zeros((4, 5))).bias is None
    emb = nn.Embedding.from_weight(np.eye(3, 2))
    assert (emb.num_embeddings, emb.embedding_dim) == (3, 2)
    np.testing.assert_array_equal(emb(np.array([2, 0])).data, [[0.0, 0.0], [1.0, 0.0]])
