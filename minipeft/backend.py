"""The one CPU/GPU switch.

NumPy is the reference backend a student reads; CuPy runs the very same code on a
GPU. Library code never imports ``numpy``/``cupy`` to *compute*: it asks the array it
holds which module owns it, ``xp = xp_of(array)``, and calls ``xp.<op>``. Only this
file and ``minipeft/kernels/`` import CuPy.

The default device comes from the environment variable ``MINIPEFT_DEVICE``
(``cpu`` | ``cuda`` | ``auto``; unset means ``cpu``). ``auto`` picks CUDA when CuPy and
a GPU are present.
"""
from __future__ import annotations

import os

import numpy as np

from . import fast

_VALID = ("cpu", "cuda", "auto")


def _import_cupy():
    """Return the cupy module or raise a clear error saying how to get it."""
    try:
        import cupy  # noqa: F401  (only backend.py and kernels/ import cupy)
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "device 'cuda' needs CuPy: install it with `pip install -e .[gpu]` "
            "(cupy-cuda12x / cupy-cuda13x matching your CUDA), or use device='cpu'"
        ) from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # pragma: no cover
        raise RuntimeError(f"CuPy is installed but no CUDA GPU is usable: {e}") from e
    if n == 0:  # pragma: no cover
        raise RuntimeError("CuPy is installed but no CUDA GPU was found; use device='cpu'")
    return cupy


def bfloat16_dtype() -> np.dtype:
    """``ml_dtypes.bfloat16`` as a NumPy dtype: what a CuPy bfloat16 array holds (imported on first use)."""
    try:
        import ml_dtypes
    except ImportError as e:
        raise ImportError("compute_dtype='bfloat16' on the GPU runs on CuPy bfloat16 arrays, whose dtype comes "
                          "from the ml_dtypes package, which is not installed: pip install ml_dtypes "
                          "(or pip install 'minipeft[gpu]')") from e
    return np.dtype(ml_dtypes.bfloat16)


def cuda_available() -> bool:
    """True when CuPy imports and at least one GPU is visible."""
    try:
        _import_cupy()
        return True
    except RuntimeError:
        return False


def resolve_device(device: str | None = None) -> str:
    """Turn ``None``/``'auto'``/``'cpu'``/``'cuda'`` into ``'cpu'`` or ``'cuda'``."""
    if device is None:
        device = os.environ.get("MINIPEFT_DEVICE", "cpu")
    device = str(device).lower()
    if device.startswith("cuda:"):
        device = "cuda"
    if device not in _VALID:
        raise ValueError(f"unknown device {device!r}: expected one of {_VALID}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda":
        _import_cupy()
    return device


def default_device() -> str:
    """The device chosen by ``MINIPEFT_DEVICE`` (``cpu`` when unset)."""
    return resolve_device(None)


def get_xp(device: str | None = None):
    """The array module for a device: ``numpy`` for cpu, ``cupy`` for cuda."""
    return _import_cupy() if resolve_device(device) == "cuda" else np


def xp_of(array):
    """The array module that owns ``array`` (numpy for NumPy arrays and scalars)."""
    mod = type(array).__module__
    if mod.startswith("cupy"):
        return _import_cupy()
    return np


def device_of(array) -> str:
    """``'cuda'`` for a CuPy array, else ``'cpu'``."""
    return "cuda" if type(array).__module__.startswith("cupy") else "cpu"


def to_device(array, device: str):
    """Move an array to ``device`` (a no-op when it is already there)."""
    device = resolve_device(device)
    if device == "cuda":
        cp = _import_cupy()
        return cp.asarray(array)
    if device_of(array) == "cuda":
        return array.get()
    return np.asarray(array)


def to_numpy(array) -> np.ndarray:
    """A NumPy copy/view of any backend's array (for printing, saving, plotting)."""
    return array.get() if device_of(array) == "cuda" else np.asarray(array)


def synchronize(device: str | None = None) -> None:
    """Wait for the GPU to finish queued work (no-op on the CPU); use before timing."""
    if resolve_device(device or "cpu") == "cuda":
        _import_cupy().cuda.Stream.null.synchronize()


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` with repeated indices accumulated (in place).

    NumPy spells it ``np.add.at``; CuPy ``cupyx.scatter_add``. Used by the backward of
    embedding lookup and of advanced indexing.
    """
    if device_of(target) == "cuda":
        import cupyx

        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


@fast.dispatch
def sum_rows(a):
    """``a.sum(axis=0)`` of a 2-D array (rows, n): the bias gradient of a linear layer.

    On the GPU a float32 one runs as one cuBLAS product, ``ones @ a``, which reads the array
    once, coalesced: 2-3x faster than CuPy's column reduction at GPT-2 sizes (its fast path
    :func:`minipeft.kernels.gemm16.sum_rows_cuda`, through the cuBLAS handle that a CUDA
    graph can record). The fast paths of ``linear`` use it; the reference writes ``g.sum(axis=0)``.
    """
    return a.sum(axis=0)


class DeviceMemoryTracker:
    """Current and peak bytes allocated on the GPU while active (CuPy memory hook).

    ``with DeviceMemoryTracker() as t: ...`` then ``t.peak`` / ``t.current`` (bytes,
    counted from the allocations CuPy's pool hands out, relative to entering). On the
    CPU it is a no-op that reports 0.
    """

    def __init__(self, device: str = "cuda"):
        self.device = resolve_device(device)
        self.current = 0
        self.peak = 0
        self._hook = None

    def __enter__(self):
        if self.device == "cuda":
            cp = _import_cupy()
            from cupy.cuda import memory_hook

            tracker = self

            class _Hook(memory_hook.MemoryHook):
                name = "minipeft_peak"

                def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
                    tracker.current += mem_size
                    tracker.peak = max(tracker.peak, tracker.current)

                def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
                    tracker.current -= mem_size

            cp.cuda.Stream.null.synchronize()
            self._hook = _Hook()
            self._hook.__enter__()
        return self

    def __exit__(self, *exc):
        if self._hook is not None:
            _import_cupy().cuda.Stream.null.synchronize()
            self._hook.__exit__(*exc)
            self._hook = None
        return False

    def reset_peak(self) -> None:
        self.peak = self.current
