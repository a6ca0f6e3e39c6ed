"""CUDA RawKernels (``<name>.cu``) with their Python launchers (``<name>.py``).

Only this package and :mod:`minipeft.backend` import CuPy, and only when a CuPy array
reaches them. Each kernel has a NumPy twin (the code that runs on the CPU, usually in
:mod:`minipeft.functional` or :mod:`minipeft.optim`) and a ``gpu`` test in
``tests/kernels`` that they agree.

The fused training kernels (layer norm, GELU, attention softmax, cross-entropy, AdamW)
replace the twin's array code only for float32 CuPy arrays. ``MINIPEFT_KERNELS=0`` in the
environment turns them off, so the very same NumPy-style code runs through CuPy instead
(what ``benchmarks/gpu_profile.py`` compares against, and how a student can check that a
kernel changes speed, not results). The quantization kernels are not affected: they are
bit-exact twins with nothing to compare.
"""
from __future__ import annotations

import os


def fused_enabled() -> bool:
    """True unless ``MINIPEFT_KERNELS=0``: use the fused training kernels on float32 CuPy arrays."""
    return os.environ.get("MINIPEFT_KERNELS", "1") != "0"


def use_fused(*arrays, contiguous: bool = True) -> bool:
    """True when every array is a float32 CuPy array (C-contiguous unless ``contiguous=False``)
    and the fused kernels are on.

    Cheap on the CPU path: a NumPy array fails the first test without importing anything.
    """
    for a in arrays:
        if not type(a).__module__.startswith("cupy") or a.dtype != "float32":
            return False
        if contiguous and not a.flags.c_contiguous:
            return False
    return fused_enabled()
