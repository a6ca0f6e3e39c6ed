"""The one registry of fast paths, and the one switch that turns them off.

minipeft's reference code (``minipeft/ops``, ``minipeft/quant``, ``optim.core.adamw_update``,
the multi-adapter twins in ``minipeft/serve``) is what a student reads: NumPy math that
CuPy also runs. A *fast path* computes the same thing another way - a CUDA RawKernel, a
GEMM shaped for cuBLAS - or, for mixed precision, in other (16-bit) arithmetic. It never
hides inside the reference code. Instead the module that defines it enters it in this
module's table, keyed by the op it replaces, with the condition under which it applies::

    fast.register(GELU, FusedGELU, when=float32_on_gpu)

and it is looked up in one place, :func:`choose`:

* ``Function.apply`` (:mod:`minipeft.engine`) asks ``choose(cls, *arrays)`` which Function
  runs the forward (and therefore the backward) of an op;
* a plain array function marked ``@fast.dispatch`` asks the same on every call;
* a caller may ask :func:`call` explicitly (the multi-adapter server does).

``choose`` returns the first registered fast path whose ``when(*args, **kwargs)`` is true,
or the reference itself. Who registers what: ``minipeft/amp.py`` (16-bit products under
``autocast``), ``minipeft/kernels/__init__.py`` (every RawKernel whose twin lives below it)
and ``minipeft/serve.py`` (BGMV / SGMV, whose twins live there). ``paths()`` lists them.

The switch: ``MINIPEFT_KERNELS=0`` in the environment turns off every fast path that
computes *the same numbers* faster, so the very code a student reads runs, also on a GPU
(how to check that a kernel changes speed, not results). Mixed precision is not such a
path: ``autocast`` asks for other numbers, so it is registered with ``switch=False`` and
stays on.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable


def enabled() -> bool:
    """True unless ``MINIPEFT_KERNELS=0``: fast paths may run (read on every call, so tests can flip it)."""
    return os.environ.get("MINIPEFT_KERNELS", "1") != "0"


@dataclass(eq=False)  # two paths are the same only if they are one object
class FastPath:
    """One registered fast path: ``impl`` replaces ``reference`` whenever ``when(*args, **kwargs)``."""

    reference: Any  # the reference op: a Function class or a function
    impl: Any  # what runs instead: a Function class (for a Function) or a function with the same signature
    when: Callable[..., bool]  # the arguments of one call -> does ``impl`` apply to them?
    switch: bool = True  # True: honours MINIPEFT_KERNELS=0 (same numbers, faster); False: a precision mode

    @property
    def name(self) -> str:
        return f"{getattr(self.impl, '__module__', '?')}.{getattr(self.impl, '__qualname__', self.impl)}"


_PATHS: dict[Any, list[FastPath]] = {}


def register(reference, impl, when: Callable[..., bool], *, switch: bool = True) -> FastPath:
    """Make ``impl`` run instead of ``reference`` for the calls where ``when`` says so.

    Paths of one reference are tried in the order they were registered.
    """
    if not callable(when):
        raise TypeError(f"register({reference!r}, ...): when must be a function of the op's arguments, "
                        f"got {type(when).__name__}")
    path = FastPath(reference, impl, when, switch)
    _PATHS.setdefault(reference, []).append(path)
    return path


def unregister(path: FastPath) -> None:
    """Take a path returned by :func:`register` out of the registry again."""
    registered = _PATHS.get(path.reference, [])
    if path not in registered:
        raise ValueError(f"{path.name} is not registered for {path.reference!r}; "
                         "pass the FastPath that register() returned")
    registered.remove(path)
    if not registered:
        del _PATHS[path.reference]


def paths(reference=None) -> list[FastPath]:
    """The registered fast paths (of ``reference``, or all of them), in registration order."""
    if reference is not None:
        return list(_PATHS.get(reference, ()))
    return [p for ps in _PATHS.values() for p in ps]


def choose(reference, *args, **kwargs):
    """The implementation that runs ``reference(*args, **kwargs)``: a fast path that applies, or ``reference``."""
    candidates = _PATHS.get(reference)
    if candidates:  # most ops have none: one dict look-up is all they pay
        for path in candidates:  # `when` first: on NumPy arrays it says no at once, without reading the switch
            if path.when(*args, **kwargs) and (not path.switch or enabled()):
                return path.impl
    return reference


def call(reference, *args, allow_fast: bool = True, **kwargs):
    """``reference(*args, **kwargs)`` of a plain function, or a registered fast path of it.

    ``allow_fast=False`` runs the reference whatever is registered (a per-caller override,
    such as ``ServeConfig.use_kernels``; the switch still turns fast paths off for all).
    """
    impl = choose(reference, *args, **kwargs) if allow_fast else reference
    if impl is reference:
        impl = getattr(reference, "reference", reference)  # the body of a @dispatch function
    return impl(*args, **kwargs)


def dispatch(fn):
    """Decorate a plain array function so that each call goes through :func:`choose`.

    The decorated function is the registry key (``fast.register(module.fn, ...)``); its
    body, also kept as ``.reference``, is the reference, which runs when no fast path applies.
    """

    @functools.wraps(fn)
    def op(*args, **kwargs):
        impl = choose(op, *args, **kwargs)
        return fn(*args, **kwargs) if impl is op else impl(*args, **kwargs)

    op.reference = fn  # the undecorated reference, for call(..., allow_fast=False)
    return op


def on_gpu(a) -> bool:
    """True for a CuPy array (without importing CuPy): the first test of every GPU path's ``when``."""
    return type(a).__module__.startswith("cupy")


def float32_on_gpu(*arrays, contiguous: bool = True) -> bool:
    """True when every array is a float32 CuPy array (C-contiguous unless ``contiguous=False``).

    Cheap on the CPU: a NumPy array fails the first test without importing anything.
    """
    for a in arrays:
        if not on_gpu(a) or a.dtype != "float32":
            return False
        if contiguous and not a.flags.c_contiguous:
            return False
    return True
