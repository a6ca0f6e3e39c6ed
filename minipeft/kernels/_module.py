"""Compile a ``.cu`` file of this folder once per device (NVRTC) and hand out its kernels.

A ``.cu`` file may ``#include "common.cuh"`` (the device helpers several kernels share):
NVRTC finds it through ``-I`` this folder. CuPy caches compiled modules on disk by source
text and options, not by the headers a source includes, so a digest of the headers is
passed as one more option: editing a header recompiles what includes it.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def _headers_digest() -> str:
    """sha256 of every ``.cuh`` file of this folder (first 16 hex digits)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(_HERE, "*.cuh"))):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def compile_options() -> tuple[str, ...]:
    """NVRTC options of every module: C++17, this folder on the include path, the headers' digest."""
    return ("-std=c++17", f"-I{_HERE}", f"-DMINIPEFT_HEADERS_SHA={_headers_digest()}")
THREADS = 256  # threads per CUDA block of the fused kernels
MAX_GRID = 132 * 32  # grid-stride kernels launch at most this many blocks (H100: 132 SMs)


def cupy():
    import cupy as cp  # only kernels/ and backend.py import cupy

    return cp


def _defines_key(defines) -> tuple:
    """``defines`` (a dict or ``(NAME, value)`` pairs) as sorted pairs: the cache key of a compile.
    Names must be C identifiers and values ints or strings without spaces (one ``-DNAME=value`` each)."""
    pairs = tuple(sorted(dict(defines).items()))
    for name, value in pairs:
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"a kernel define needs a C identifier as its name, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value) or any(
                ch.isspace() for ch in str(value)):
            raise ValueError(f"kernel define {name}={value!r}: expected an int or a string without spaces")
    return pairs


@functools.lru_cache(maxsize=None)
def _module(filename: str, device_id: int, defines: tuple = ()):
    """``filename`` compiled for ``device_id`` with one ``-DNAME=value`` option per pair of ``defines``
    (each distinct set is its own module; CuPy's disk cache keys by the options too)."""
    with open(os.path.join(_HERE, filename), encoding="utf-8") as f:
        options = compile_options() + tuple(f"-D{name}={value}" for name, value in defines)
        return cupy().RawModule(code=f.read(), options=options)


@functools.lru_cache(maxsize=None)
def _function(filename: str, name: str, device_id: int, defines: tuple = ()):
    return _module(filename, device_id, defines).get_function(name)


def kernel(filename: str, name: str, device_id: int | None = None, defines=()):
    """The kernel ``name`` of ``minipeft/kernels/<filename>``, compiled for ``device_id``
    (default: the current device). ``defines`` (a dict or ``(NAME, value)`` pairs; default none)
    are macros for this compile, as ``-DNAME=value``: a compile-time variant of the file, compiled
    once per distinct set and cached apart from the plain one."""
    device_id = cupy().cuda.runtime.getDevice() if device_id is None else int(device_id)
    return _function(filename, name, device_id, _defines_key(defines) if defines else ())


def resident_blocks(filename: str, name: str, threads: int, device_id: int, defines=()) -> int:
    """CUDA blocks of ``threads`` threads of kernel ``name`` (compiled with ``defines``, as
    :func:`kernel`) that ``device_id`` runs at once (one wave): the occupancy calculator's blocks
    per SM (registers, shared memory) times the SMs."""
    return _resident_blocks(filename, name, int(threads), int(device_id), _defines_key(defines) if defines else ())


@functools.lru_cache(maxsize=None)
def _resident_blocks(filename: str, name: str, threads: int, device_id: int, defines: tuple) -> int:
    cp = cupy()
    fn = _function(filename, name, device_id, defines)
    per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0)
    return max(1, per_sm) * cp.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


@functools.lru_cache(maxsize=None)
def compute_capability(device_id: int) -> int:
    """The device's compute capability as one number, major * 10 + minor (90 for an H100 or H200)."""
    props = cupy().cuda.runtime.getDeviceProperties(int(device_id))
    return 10 * int(props["major"]) + int(props["minor"])


def blocks(n: int, per_block: int = THREADS) -> int:
    """Grid size of a grid-stride loop over ``n`` items."""
    return int(max(1, min(MAX_GRID, -(-int(n) // per_block))))


def f32(x: float) -> np.float32:
    return np.float32(x)


def i32(x: int) -> np.int32:
    return np.int32(x)


def i64(x: int) -> np.int64:
    return np.int64(x)


def log2(b: int) -> int:
    """log2 of a power of two (block sizes are passed to the kernels as shifts)."""
    return int(b).bit_length() - 1


def aligned_to(cp, a, align: int):
    """``a`` as a C-contiguous CuPy array whose data starts on an ``align``-byte boundary
    (itself when it already is one: the kernels only need the pointer)."""
    if not (isinstance(a, cp.ndarray) and a.flags.c_contiguous and a.data.ptr % align == 0):
        a = cp.ascontiguousarray(a)
        if a.data.ptr % align:
            a = a.copy()
    return a


def as_f32(cp, a):
    """``a`` as a C-contiguous float32 CuPy array (itself when it already is one)."""
    if isinstance(a, cp.ndarray) and a.dtype == cp.float32 and a.flags.c_contiguous:
        return a
    return cp.ascontiguousarray(cp.asarray(a, dtype=cp.float32))
