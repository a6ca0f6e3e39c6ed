"""cuBLAS called directly, so that a matrix product can be recorded into a CUDA graph.

CuPy's cuBLAS wrapper refuses to run while a stream is being captured ("calling cuBLAS API
during stream capture is currently unsupported"), although cuBLAS itself supports capture:
its documentation ("CUDA Graphs Support") asks only that the handle have a workspace of the
caller's (``cublasSetWorkspace``), so that nothing is allocated inside the capture. This
module opens the ``libcublas`` that CuPy has already loaded (the same library, found in the
process's memory map), makes one handle per device with a 32 MiB workspace from CuPy's
memory pool, and calls ``cublasGemmStridedBatchedEx`` through :mod:`ctypes`.

:func:`minipeft.kernels.gemm16.batched_gemm` goes through here for every 16-bit product,
captured or not: a step replayed from a graph and the same step run eagerly call the same
handle with the same workspace, so cuBLAS picks the same algorithm and the two agree bit
for bit (``tests/test_graph_train.py``'s ``gpu`` tests).

``cublasSetStream`` resets the handle's workspace to cuBLAS's default pool (cuBLAS
documentation of ``cublasSetStream``), so the workspace is set again after every change
of stream.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from ._module import cupy

WORKSPACE_BYTES = 32 << 20  # cuBLAS's recommended workspace on Hopper (cuBLAS docs, cublasSetWorkspace)
_STATUS = {0: "SUCCESS", 1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH",
           11: "MAPPING_ERROR", 13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED"}
_ONE = np.ones(1, np.float32)  # alpha and beta, read by cuBLAS from host memory when the call is made
_ZERO = np.zeros(1, np.float32)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: CUBLAS_STATUS_{_STATUS.get(status, status)}")


def mapped_library(prefix: str) -> str | None:
    """The path of a shared library this process has mapped whose file name starts with ``prefix``
    (``"libcublas.so"``), read from ``/proc/self/maps``; None if there is none."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            path = line.split()[-1] if "/" in line else ""
            if path.rsplit("/", 1)[-1].startswith(prefix):
                return path
    return None


def library_path() -> str:
    """The path of the ``libcublas`` this process has loaded (CuPy loads it on its first product)."""
    cp = cupy()
    cp.cuda.device.get_cublas_handle()  # makes CuPy load libcublas if it has not yet
    path = mapped_library("libcublas.so")
    if path is not None:
        return path
    raise RuntimeError("libcublas is not loaded in this process (CuPy's cuBLAS did not load it?); "
                       "16-bit products need cuBLAS: check the CUDA installation with "
                       "python -c 'import cupy; cupy.show_config()'")


@functools.lru_cache(maxsize=None)
def _library():
    lib = ctypes.CDLL(library_path())
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
    lib.cublasSetStream_v2.argtypes = [vp, vp]
    lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
    lib.cublasGemmStridedBatchedEx.argtypes = [
        vp, i32, i32, i32, i32, i32,  # handle, transa, transb, m, n, k
        vp,  # alpha
        vp, i32, i32, i64,  # A, Atype, lda, strideA
        vp, i32, i32, i64,  # B, Btype, ldb, strideB
        vp,  # beta
        vp, i32, i32, i64,  # C, Ctype, ldc, strideC
        i32, i32, i32]  # batchCount, computeType, algo
    for f in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2,
              lib.cublasGemmStridedBatchedEx):
        f.restype = ctypes.c_int
    return lib


class Handle:
    """One cuBLAS handle of one device, with its own workspace (kept for the handle's lifetime)."""

    def __init__(self, device_id: int) -> None:
        cp = cupy()
        self.lib = _library()
        with cp.cuda.Device(device_id):
            h = ctypes.c_void_p()
            _check(self.lib.cublasCreate_v2(ctypes.byref(h)), "cublasCreate")
            self.handle = h
            self.workspace = cp.cuda.alloc(WORKSPACE_BYTES)  # MemoryPointer: freed with the handle's owner
        self.stream = None  # the stream last set (None: none yet)

    def on_stream(self, stream_ptr: int) -> ctypes.c_void_p:
        """The handle, set to run on ``stream_ptr`` with this handle's workspace."""
        if stream_ptr != self.stream:
            _check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream_ptr)), "cublasSetStream")
            _check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.ptr),
                                                  WORKSPACE_BYTES), "cublasSetWorkspace")
            self.stream = stream_ptr
        return self.handle


@functools.lru_cache(maxsize=None)
def handle(device_id: int) -> Handle:
    """This process's :class:`Handle` of ``device_id``, made on first use."""
    return Handle(device_id)


def gemm_strided_batched(trans_a: int, trans_b: int, m: int, n: int, k: int,
                         a_ptr: int, a_type: int, lda: int, stride_a: int,
                         b_ptr: int, b_type: int, ldb: int, stride_b: int,
                         c_ptr: int, c_type: int, ldc: int, stride_c: int,
                         batch: int, compute_type: int, algo: int) -> None:
    """``cublasGemmStridedBatchedEx`` with alpha = 1, beta = 0 (column-major, cuBLAS's own
    argument order and meaning) on the current device and CuPy's current stream."""
    cp = cupy()
    h = handle(cp.cuda.runtime.getDevice())
    hd = h.on_stream(cp.cuda.get_current_stream().ptr)
    _check(h.lib.cublasGemmStridedBatchedEx(
        hd, trans_a, trans_b, m, n, k, _ONE.ctypes.data,
        a_ptr, a_type, lda, stride_a, b_ptr, b_type, ldb, stride_b, _ZERO.ctypes.data,
        c_ptr, c_type, ldc, stride_c, batch, compute_type, algo), "cublasGemmStridedBatchedEx")
