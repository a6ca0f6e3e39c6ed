"""Finite-difference gradient checks for ops, layers and whole models.

The engine's backward is checked against central differences in float64:

    L(theta) = sum(f(theta) * W)          W: fixed random weights, the shape of f's output
    dL/dtheta_i  ~=  (L(theta + eps e_i) - L(theta - eps e_i)) / (2 eps)

Projecting the output on random weights turns any output shape into a scalar whose
gradient involves every output element, so one backward pass checks the whole Jacobian
(up to the projection). The truncation error of the central difference is O(eps^2) and
its rounding error O(1e-16 / eps); float64 with eps = 1e-6 leaves both far below the
tolerances. ``gradcheck`` checks a function of tensors; ``gradcheck_module`` checks every
trainable parameter of a Module (perturbing ``p.data`` in place) and is what each PEFT
layer's test uses.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .backend import to_numpy, xp_of
from .engine import Tensor, no_grad


def asarray_on(xp, a, dtype=None):
    """``a`` (NumPy array, list, scalar or array of either backend) as an array of ``xp``."""
    if hasattr(a, "shape") and xp_of(a) is not xp:
        a = to_numpy(a)
    return xp.asarray(a, dtype=dtype)


def _projected(out: Tensor, w) -> float:
    """sum(out * w) in float64 on the host (the scalar the finite differences use)."""
    xp = xp_of(out.data)
    return float(to_numpy(xp.sum(out.data.astype(np.float64) * w)))


def _check(f: Callable[[], Tensor], named: Sequence[tuple[str, Tensor]], eps: float, atol: float,
           rtol: float, rng) -> float:
    """Compare the engine's gradients of sum(f() * W) with central differences."""
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    named = [(n, t) for n, t in named if t.requires_grad]
    if not named:
        raise ValueError("gradcheck: no input requires grad, so there is nothing to check "
                         "(pass Tensors with requires_grad=True, or unfreeze the module's parameters)")
    for n, t in named:
        if t.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 inputs for meaningful finite differences; "
                            f"{n} is {t.dtype} (build it with dtype=np.float64 or .astype(np.float64))")
    rng = np.random.default_rng(0) if rng is None else rng
    if isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(int(rng))

    # analytic: one backward of the projection, with the callers' .grad set aside
    kept = [t.grad for _, t in named]
    for _, t in named:
        t.grad = None
    try:
        out = f()
        if not isinstance(out, Tensor):
            raise TypeError(f"gradcheck: the function must return a Tensor, got {type(out).__name__}")
        xp = xp_of(out.data)
        w = asarray_on(xp, rng.standard_normal(out.shape))  # (out.shape) float64
        if not out.requires_grad:
            raise ValueError("gradcheck: the output does not require grad (did f run under no_grad(), "
                             "or detach its inputs?)")
        (out * Tensor(w)).sum().backward()
        analytic = [np.zeros(t.shape) if t.grad is None else to_numpy(t.grad).astype(np.float64)
                    for _, t in named]
    finally:
        for (_, t), g in zip(named, kept):
            t.grad = g

    # numeric: perturb one element at a time, in place
    with no_grad():
        base = _projected(f(), w)
        if _projected(f(), w) != base:
            raise AssertionError("gradcheck: the function is not deterministic (two calls gave different "
                                 "outputs); fix its randomness, e.g. a fresh Generator with a fixed seed per call")
        max_err = 0.0
        for (name, t), a in zip(named, analytic):
            numeric = np.zeros(t.shape)
            for pos in np.ndindex(*t.shape):
                old = float(t.data[pos])
                t.data[pos] = old + eps
                fp = _projected(f(), w)
                t.data[pos] = old - eps
                fm = _projected(f(), w)
                t.data[pos] = old
                numeric[pos] = (fp - fm) / (2 * eps)
            err = np.abs(a - numeric)
            bad = err > atol + rtol * np.abs(numeric)
            if t.size:
                max_err = max(max_err, float(err.max()))
            if bad.any():
                worst = np.unravel_index(int(np.argmax(np.where(bad, err, -1))), t.shape) if t.ndim else ()
                raise AssertionError(
                    f"gradcheck failed for {name} (shape {t.shape}): {int(bad.sum())} of {t.size} elements "
                    f"differ; worst at index {tuple(int(i) for i in worst)}: analytic {a[worst]:.8g} vs "
                    f"numeric {numeric[worst]:.8g} (|diff| {err[worst]:.3g} > atol {atol:g} + "
                    f"rtol {rtol:g} * |numeric|); max |diff| over the input {float(err.max()):.3g}"
                )
    return max_err


def gradcheck(fn: Callable[..., Tensor], inputs: list, eps: float = 1e-6, atol: float = 1e-5,
              rtol: float = 1e-4, rng=None) -> float:
    """Check ``fn(*inputs)``'s gradient for every input with ``requires_grad``.

    ``fn`` returns a Tensor of any shape; ``inputs`` are float64 Tensors (Parameters too);
    items that are not Tensors are passed through unchanged. ``fn`` must be deterministic.
    Returns the largest |analytic - numeric|; raises AssertionError naming the input, the
    index and both values when they disagree beyond ``atol + rtol * |numeric|``.
    """
    inputs = list(inputs)
    named = [(f"input {i}", t) for i, t in enumerate(inputs) if isinstance(t, Tensor)]
    return _check(lambda: fn(*inputs), named, eps, atol, rtol, rng)


def gradcheck_module(module, forward_fn: Callable, eps: float = 1e-6, atol: float = 1e-5,
                     rtol: float = 1e-4, rng=None, extra_inputs: Sequence[Tensor] = ()) -> float:
    """Check every trainable parameter of ``module`` (by name) for ``forward_fn(module)``.

    The module must be in float64 and deterministic (``eval()`` or dropout p = 0).
    ``extra_inputs``: Tensors that ``forward_fn`` uses and that should be checked too.
    """
    named = [(f"parameter {n!r}", p) for n, p in module.named_parameters()]
    named += [(f"extra input {i}", t) for i, t in enumerate(extra_inputs)]
    return _check(lambda: forward_fn(module), named, eps, atol, rtol, rng)
