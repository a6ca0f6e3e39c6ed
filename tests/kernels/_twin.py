"""Helpers for the fused-kernel tests: run one op on NumPy (the twin) and on CuPy (the kernel)."""
from __future__ import annotations

import numpy as np

from minipeft import fast
from minipeft.backend import to_numpy
from minipeft.engine import Tensor


def run(f, arrays, xp, grad_out=None, needs=None):
    """``f(*tensors)`` on backend ``xp``; returns (output, [grads]) as NumPy arrays.

    ``grad_out``: the upstream gradient (NumPy), or None for a scalar output.
    ``needs``: which inputs require grad (default all).
    """
    needs = needs or [True] * len(arrays)
    ts = [Tensor(xp.asarray(a), requires_grad=n) for a, n in zip(arrays, needs)]
    out = f(*ts)
    out.backward(None if grad_out is None else xp.asarray(grad_out))
    return to_numpy(out.data), [None if t.grad is None else to_numpy(t.grad) for t in ts]


def rel_err(a, b, floor: float = 1e-30) -> float:
    """||a - b|| / max(||b||, floor) in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))


class Counter:
    """Wrap a kernel launcher and count its calls (to prove the fused path ran).

    The launcher is replaced in its module and, where :mod:`minipeft.fast` holds it as a
    registered fast path (AdamW, the quantizers), in that registry entry too.
    """

    def __init__(self, monkeypatch, module, name):
        self.n = 0
        inner = getattr(module, name)

        def wrapped(*a, **k):
            self.n += 1
            return inner(*a, **k)

        monkeypatch.setattr(module, name, wrapped)
        for path in fast.paths():
            if path.impl is inner:
                monkeypatch.setattr(path, "impl", wrapped)
