"""Launch a compiled kernel with programmatic dependent launch (PDL, sm_90+), through ``cuLaunchKernelEx``.

Two kernels in one stream normally run one after the other: the second's blocks are placed only
once the first has finished, and its loads start only then. With the launch attribute
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` the second kernel may be placed as soon as
every block of the first has executed ``griddepcontrol.launch_dependents`` (or exited); it then
calls ``griddepcontrol.wait``, which returns when the first kernel has finished and its writes are
visible (CUDA Programming Guide, "Programmatic Dependent Launch and Synchronization"). The start of
one kernel thus overlaps the end of the one before. A kernel launched this way must wait before it
touches memory the kernel before may write; ``quant4bit.cu``'s ``PDL`` variants do.

CuPy launches a ``RawKernel`` without launch attributes, so this module calls the driver's
``cuLaunchKernelEx`` through :mod:`ctypes`, with the function handle CuPy compiled and loaded. The
structures below are ``CUlaunchConfig`` and ``CUlaunchAttribute`` of ``cuda.h`` (CUDA 12.0+).
"""
from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

from ._module import cupy as _cupy

PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CUlaunchAttributeID: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _AttributeValue(ctypes.Union):    # CUlaunchAttributeValue: a 64-byte union
    _fields_ = [("pad", ctypes.c_char * 64), ("flag", ctypes.c_int)]


class _Attribute(ctypes.Structure):     # CUlaunchAttribute: the id, padded to 8 bytes, then the value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttributeValue)]


class _Config(ctypes.Structure):        # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attribute)), ("numAttrs", ctypes.c_uint)]


DRIVER_LIBRARIES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")   # the CUDA driver: Linux, then Windows


@functools.lru_cache(maxsize=None)
def _driver():
    """``(name, library)`` of the first CUDA driver library of :data:`DRIVER_LIBRARIES` that loads, or None."""
    for name in DRIVER_LIBRARIES:
        try:
            return name, ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def _launch_kernel_ex():
    """The driver's ``cuLaunchKernelEx`` (CUDA 12.0+), its argument types set."""
    if _driver() is None:
        raise OSError(f"the CUDA driver library was not found (tried {', '.join(DRIVER_LIBRARIES)}): programmatic "
                      "dependent launch calls it directly; install the NVIDIA driver, or launch with PDL=0")
    name, lib = _driver()
    try:
        f = lib.cuLaunchKernelEx
    except AttributeError:
        raise OSError(f"the CUDA driver {name} has no cuLaunchKernelEx: programmatic dependent launch needs "
                      "a CUDA 12.0 or newer driver; update the driver, or launch with PDL=0") from None
    f.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    f.restype = ctypes.c_int
    return f


@functools.lru_cache(maxsize=None)
def _driver_error_name():
    """The driver's ``cuGetErrorName`` (``CUresult`` -> its name), or None where it cannot be had."""
    driver = _driver()
    f = getattr(driver[1], "cuGetErrorName", None) if driver is not None else None
    if f is not None:
        f.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        f.restype = ctypes.c_int
    return f


def error_name(err: int) -> str:
    """``CUresult`` ``err`` as the driver names it (``CUDA_ERROR_INVALID_HANDLE``), else as a number."""
    f = _driver_error_name()
    text = ctypes.c_char_p()
    if f is not None and f(int(err), ctypes.byref(text)) == 0 and text.value:
        return f"{text.value.decode()} ({int(err)})"
    return f"CUresult {int(err)}"


def _slot(arg):
    """One kernel argument as the ctypes value whose bytes the launch copies."""
    if hasattr(arg, "data") and hasattr(arg.data, "ptr"):             # a CuPy array: its device address
        return ctypes.c_void_p(arg.data.ptr)
    if isinstance(arg, np.int64):
        return ctypes.c_int64(int(arg))
    if isinstance(arg, np.int32):
        return ctypes.c_int32(int(arg))
    raise TypeError(f"a dependent launch takes CuPy arrays, np.int64 and np.int32 arguments, got {type(arg).__name__}")


class DependentLaunch:
    """``function`` (a CuPy ``RawKernel`` from :func:`minipeft.kernels._module.kernel`) launched with
    programmatic dependent launch on ``grid`` x ``block`` threads, with ``args`` fixed and one last
    argument, an output array, given per call. The arrays in ``args`` are kept alive here. A call
    writes the output's address and the current stream into structures it reuses, under a lock, so two
    threads may share one launch. ``device`` is the device the function was loaded on and the arrays
    live on (default: the current one); a call checks that it is still current and holds the output,
    which CuPy checks for its own launches and the driver would report only as an invalid handle or a
    fault.
    """

    def __init__(self, function, grid: int, block: int, args: tuple, device: int | None = None):
        self._device = _cupy().cuda.runtime.getDevice() if device is None else int(device)
        self._current_device = _cupy().cuda.runtime.getDevice
        self._function = function.kernel.ptr                          # the CUfunction CuPy loaded
        self._args = args                                             # kept alive: the launch reads their addresses
        self._slots = [_slot(a) for a in args] + [ctypes.c_void_p(0)]
        self._params = (ctypes.c_void_p * len(self._slots))(*[ctypes.addressof(v) for v in self._slots])
        self._attribute = _Attribute(id=PROGRAMMATIC_STREAM_SERIALIZATION)
        self._attribute.value.flag = 1
        self._config = _Config(int(grid), 1, 1, int(block), 1, 1, 0, None, ctypes.pointer(self._attribute), 1)
        self._launch = _launch_kernel_ex()
        self._stream = _cupy().cuda.get_current_stream
        self._lock = threading.Lock()

    def __call__(self, out) -> None:
        current, out_device = self._current_device(), out.device.id
        if current != self._device or out_device != self._device:
            raise ValueError(f"this dependent launch was built on GPU {self._device}, but the current device is "
                             f"{current} and the output is on {out_device}: call it inside "
                             f"`with cupy.cuda.Device({self._device}):` with an output allocated there")
        with self._lock:
            self._slots[-1].value = out.data.ptr
            self._config.hStream = self._stream().ptr or None          # 0: the legacy default stream
            err = self._launch(ctypes.byref(self._config), self._function, self._params, None)
        if err:
            raise RuntimeError(f"cuLaunchKernelEx failed with {error_name(err)} (CUDA driver API)")
