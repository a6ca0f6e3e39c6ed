"""cuBLASLt called directly: a GEMM whose epilogue adds the bias, so ``x W^T + b`` is one kernel.

A 16-bit Linear layer under :func:`minipeft.amp.autocast` computes ``x W^T`` with one cuBLAS GEMM
(:mod:`minipeft.kernels.cublas`) and then ``+ b``, a second pass that reads and writes the whole
float32 activation again. cuBLASLt, the matmul library that libcublas itself is built on, takes
an *epilogue* (cuBLAS documentation, "cuBLASLt API", ``cublasLtEpilogue_t``; ``cublasLt.h``):
``CUBLASLT_EPILOGUE_BIAS`` adds a bias vector to the float32 accumulators before they are
written: "Bias vector length must match matrix D rows ... Bias vector is broadcasted to all
columns and added before applying final postprocessing". This module opens the
``libcublasLt`` that libcublas loaded (found in the process's memory map, as
:mod:`minipeft.kernels.cublas` finds libcublas), makes one ``cublasLtHandle_t`` per device with
a 32 MiB workspace of its own from CuPy's memory pool, and calls ``cublasLtMatmul`` through
:mod:`ctypes` with alpha = 1, beta = 0. The row-major caller, which puts the output features
on D's rows, is :func:`minipeft.kernels.gemm16.gemm_bias`.

Capture. Everything but ``cublasLtMatmul`` itself (the matmul descriptor, the A, B and D
layouts, the algorithm cuBLASLt's heuristic picks) is made once per GEMM shape and kept in the
handle's :class:`_Plan` cache, keyed by transposes, sizes, dtypes, leading dimensions and the
pointers' alignments. A call whose plan exists (any eager call of the same shapes before a
recording, as :mod:`minipeft.graph_train`'s warm-up step makes) does only host-side attribute
writes and the one ``cublasLtMatmul``, which a CUDA graph can record: the workspace is ours,
passed explicitly to every call (what cuBLAS's documentation, "CUDA Graphs Support", asks of a
captured handle; see :mod:`minipeft.kernels.cublas`), and an eager call and a replay run the
same algorithm on the same workspace.

Enum values and attribute types, each checked against two header sources: NVIDIA's ``cublasLt.h``
of 2021 as vendored in llama.cpp (``include/cuda/cublasLt.h``), and the 2024 copies of its enums
in TensorRT's ``cublasLtWrapper.h`` and Triton's ``cublas_types.h``; ``CUBLASLT_EPILOGUE_BIAS = 4``
also in NVIDIA's nvmath-python (``nvmath.bindings.cublasLt.Epilogue``)::

    CUBLASLT_MATMUL_DESC_TRANSA                   3   int32_t (cublasOperation_t)
    CUBLASLT_MATMUL_DESC_TRANSB                   4   int32_t
    CUBLASLT_MATMUL_DESC_EPILOGUE                 7   uint32_t (cublasLtEpilogue_t)
    CUBLASLT_MATMUL_DESC_BIAS_POINTER             8   const void *
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE          26   int32_t (cudaDataType)
    CUBLASLT_EPILOGUE_BIAS                        4
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES      1   uint64_t
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES    5   uint32_t (B, C, D: 6, 7, 8; default 256)
    cublasLtMatmulHeuristicResult_t                   algo (uint64_t[8]), size_t workspaceSize,
                                                      cublasStatus_t state, float wavesCount, int[4]

Alignment. The heuristic assumes 256-byte aligned A, B, C, D unless told less
(``CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*``) and reads the bias pointer's alignment off the
descriptor ("routines that don't dereference this pointer, like cublasLtMatmulAlgoGetHeuristic(),
depend on its value to determine expected pointer alignment", ``cublasLt.h``), so every
pointer's alignment (up to 256) is part of the plan's key and set before the heuristic runs.
CuPy's pool hands out 256-byte aligned blocks, so one plan per shape is the rule.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import os

import numpy as np

from . import cublas
from ._module import cupy

WORKSPACE_BYTES = cublas.WORKSPACE_BYTES  # 32 MiB, cuBLAS's recommendation on Hopper (cublasSetWorkspace)
MAX_PLANS = 512  # plans kept per device (least recently used dropped): one per (shape, dtype, alignment)

CUDA_R_32F = 0  # library_types.h cudaDataType: float32 (scale type, D's type, the bias's type)
CUBLAS_COMPUTE_32F = 68  # cublas_api.h cublasComputeType_t: multiply 16-bit operands, accumulate in float32
CUBLAS_STATUS_SUCCESS, CUBLAS_STATUS_NOT_SUPPORTED = 0, 15  # cublas_api.h cublasStatus_t
# cublasLt.h cublasLtMatmulDescAttributes_t (sources and value types in the module docstring)
CUBLASLT_MATMUL_DESC_TRANSA = 3
CUBLASLT_MATMUL_DESC_TRANSB = 4
CUBLASLT_MATMUL_DESC_EPILOGUE = 7
CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8
CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26
CUBLASLT_EPILOGUE_BIAS = 4  # cublasLt.h cublasLtEpilogue_t: D = op(A) op(B) + bias, bias[i] added to row i of D
# cublasLt.h cublasLtMatmulPreferenceAttributes_t
CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5  # B, C, D: 6, 7, 8
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8

_ONE = np.ones(1, np.float32)  # alpha and beta (scale type float32), read from host memory when the call is made
_ZERO = np.zeros(1, np.float32)


class _Algo(ctypes.Structure):
    """``cublasLtMatmulAlgo_t``: 64 opaque bytes (``uint64_t data[8]``)."""

    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):
    """``cublasLtMatmulHeuristicResult_t`` (cublasLt.h)."""

    _fields_ = [("algo", _Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def alignment(ptr: int) -> int:
    """The largest power of two up to 256 that divides the address ``ptr`` (256 for a null pointer)."""
    return min(256, ptr & -ptr) if ptr else 256


def locate(mapped: str | None, cublas_path: str) -> str:
    """Where ``libcublasLt`` is: the one this process has mapped, else the file beside ``cublas_path``
    (libcublas's own) with libcublas's version suffix, else any ``libcublasLt.so*`` there."""
    if mapped is not None:
        return mapped
    folder, name = os.path.split(cublas_path)
    suffix = name[len("libcublas"):] if name.startswith("libcublas.so") else ".so"
    candidates = [os.path.join(folder, "libcublasLt" + suffix)]
    if os.path.isdir(folder):
        candidates += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("libcublasLt.so"))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise RuntimeError(f"libcublasLt was not found: not loaded in this process, and no libcublasLt.so* beside "
                       f"{cublas_path}. The bias GEMM of 16-bit Linear layers needs it (it ships with cuBLAS: "
                       "install the CUDA toolkit's cuBLAS, or pip install nvidia-cublas-cu12 for CuPy's CUDA 12), "
                       "or turn the fast paths off with MINIPEFT_KERNELS=0")


def library_path() -> str:
    """The path of the ``libcublasLt`` that CuPy's libcublas loaded (libcublas links against it)."""
    cublas_path = cublas.library_path()  # makes CuPy load libcublas, and with it libcublasLt
    return locate(cublas.mapped_library("libcublasLt.so"), cublas_path)


@functools.lru_cache(maxsize=None)
def _library():
    lib = ctypes.CDLL(library_path())
    vp, i32, u64, i64, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    pvp = ctypes.POINTER(vp)
    signatures = {
        "cublasLtCreate": [pvp],
        "cublasLtMatmulDescCreate": [pvp, i32, i32],  # desc*, cublasComputeType_t, scale cudaDataType_t
        "cublasLtMatmulDescDestroy": [vp],
        "cublasLtMatmulDescSetAttribute": [vp, i32, vp, size],  # desc, attribute, buf, sizeInBytes
        "cublasLtMatrixLayoutCreate": [pvp, i32, u64, u64, i64],  # layout*, cudaDataType, rows, cols, ld
        "cublasLtMatrixLayoutDestroy": [vp],
        "cublasLtMatmulPreferenceCreate": [pvp],
        "cublasLtMatmulPreferenceDestroy": [vp],
        "cublasLtMatmulPreferenceSetAttribute": [vp, i32, vp, size],
        # handle, desc, Adesc, Bdesc, Cdesc, Ddesc, preference, requestedAlgoCount, results[], returnAlgoCount*
        "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, i32, vp, vp],
        # handle, desc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo*, workspace, size, stream
        "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, size, vp],
    }
    for name, argtypes in signatures.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = argtypes, ctypes.c_int
    return lib


def _set(setter, obj, attribute: int, value) -> None:
    """``cublasLt*SetAttribute(obj, attribute, &value, sizeof value)`` for a ctypes scalar ``value``."""
    cublas._check(setter(obj, attribute, ctypes.addressof(value), ctypes.sizeof(value)), f"set attribute {attribute}")


class _Plan:
    """What one GEMM shape needs besides its pointers: a matmul descriptor (float32 compute and
    scale, the transposes, the bias epilogue), the A, B and D layouts (D serves as C: beta is 0),
    and the algorithm the heuristic chose. ``algo`` is None where the heuristic had none."""

    def __init__(self, lib, handle, key, bias_ptr: int) -> None:
        trans_a, trans_b, m, n, k, a_type, lda, b_type, ldb, ldd, aligns = key
        self.lib, self.desc, self.layouts, self.algo = lib, ctypes.c_void_p(), [], None
        try:
            self._build(handle, trans_a, trans_b, m, n, k, a_type, lda, b_type, ldb, ldd, aligns, bias_ptr)
        except BaseException:
            self.destroy()
            raise

    def _layout(self, dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        """A column-major (the default order) layout of ``rows x cols`` with leading dimension ``ld``."""
        h = ctypes.c_void_p()
        cublas._check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(h), dtype, rows, cols, ld),
                      "cublasLtMatrixLayoutCreate")
        self.layouts.append(h)
        return h

    def _build(self, handle, trans_a, trans_b, m, n, k, a_type, lda, b_type, ldb, ldd, aligns, bias_ptr) -> None:
        lib = self.lib
        cublas._check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
                      "cublasLtMatmulDescCreate")
        setd = lib.cublasLtMatmulDescSetAttribute
        _set(setd, self.desc, CUBLASLT_MATMUL_DESC_TRANSA, ctypes.c_int32(trans_a))
        _set(setd, self.desc, CUBLASLT_MATMUL_DESC_TRANSB, ctypes.c_int32(trans_b))
        _set(setd, self.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, ctypes.c_uint32(CUBLASLT_EPILOGUE_BIAS))
        _set(setd, self.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, ctypes.c_int32(CUDA_R_32F))
        _set(setd, self.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, ctypes.c_void_p(bias_ptr))  # its alignment counts
        # the stored matrices, before op(): A is m x k (k x m transposed), B is k x n (n x k), D is m x n
        self.a = self._layout(a_type, *((m, k) if trans_a == 0 else (k, m)), lda)
        self.b = self._layout(b_type, *((k, n) if trans_b == 0 else (n, k)), ldb)
        self.d = self._layout(CUDA_R_32F, m, n, ldd)
        pref = ctypes.c_void_p()
        cublas._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        try:
            setp = lib.cublasLtMatmulPreferenceSetAttribute
            _set(setp, pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(WORKSPACE_BYTES))
            a_al, b_al, d_al, _ = aligns
            for attribute, al in ((CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a_al),
                                  (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b_al),
                                  (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, d_al),  # C is D
                                  (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d_al)):
                _set(setp, pref, attribute, ctypes.c_uint32(al))
            result, found = _HeuristicResult(), ctypes.c_int(0)
            status = lib.cublasLtMatmulAlgoGetHeuristic(handle, self.desc, self.a, self.b, self.d, self.d, pref, 1,
                                                        ctypes.addressof(result), ctypes.addressof(found))
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        if status != CUBLAS_STATUS_NOT_SUPPORTED:  # NOT_SUPPORTED: no heuristic for this configuration
            cublas._check(status, "cublasLtMatmulAlgoGetHeuristic")  # another error: a wrong call, said aloud
        if status == CUBLAS_STATUS_SUCCESS and found.value > 0 and result.state == CUBLAS_STATUS_SUCCESS:
            self.algo = _Algo.from_buffer_copy(result.algo)
        # else no algorithm for this case: algo stays None, and the caller computes it another way

    def destroy(self) -> None:
        """Free the descriptors (host memory only: a graph that recorded a call keeps what it needs)."""
        for h in self.layouts:
            self.lib.cublasLtMatrixLayoutDestroy(h)
        if self.desc.value:
            self.lib.cublasLtMatmulDescDestroy(self.desc)
        self.layouts, self.desc, self.algo = [], ctypes.c_void_p(), None


class Handle:
    """One cuBLASLt handle of one device, its workspace (kept for the handle's lifetime) and its plans."""

    def __init__(self, device_id: int) -> None:
        cp = cupy()
        self.lib = _library()
        with cp.cuda.Device(device_id):
            h = ctypes.c_void_p()
            cublas._check(self.lib.cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
            self.handle = h
            self.workspace = cp.cuda.alloc(WORKSPACE_BYTES)  # MemoryPointer: freed with the handle's owner
        self.plans: collections.OrderedDict = collections.OrderedDict()  # key -> _Plan, least recently used first

    def plan(self, key, bias_ptr: int) -> _Plan:
        """The plan of ``key``, made (and the heuristic asked) on its first use."""
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = _Plan(self.lib, self.handle, key, bias_ptr)
            if len(self.plans) > MAX_PLANS:
                self.plans.popitem(last=False)[1].destroy()
        else:
            self.plans.move_to_end(key)
        return plan


@functools.lru_cache(maxsize=None)
def handle(device_id: int) -> Handle:
    """This process's :class:`Handle` of ``device_id``, made on first use."""
    return Handle(device_id)


def matmul_bias(trans_a: int, trans_b: int, m: int, n: int, k: int,
                a_ptr: int, a_type: int, lda: int, b_ptr: int, b_type: int, ldb: int,
                bias_ptr: int, d_ptr: int, ldd: int) -> bool:
    """``D = op(A) op(B) + bias``, column-major, on the current device and CuPy's current stream.

    cuBLAS's own conventions: op(A) is m x k (A stored m x k, or k x m with ``trans_a`` =
    ``CUBLAS_OP_T``), op(B) is k x n, D is the m x n float32 matrix at ``d_ptr`` with leading
    dimension ``ldd``; A and B are float16 (``CUDA_R_16F``) or bfloat16 (``CUDA_R_16BF``),
    multiplied with float32 accumulation (``CUBLAS_COMPUTE_32F``); ``bias`` is m float32 values,
    16-byte aligned, ``bias[i]`` added to every element of row i of D by the epilogue. Returns
    False, having launched nothing, where cuBLASLt's heuristic has no algorithm for the case.
    """
    cp = cupy()
    h = handle(cp.cuda.runtime.getDevice())
    key = (trans_a, trans_b, m, n, k, a_type, lda, b_type, ldb, ldd,
           (alignment(a_ptr), alignment(b_ptr), alignment(d_ptr), alignment(bias_ptr)))
    plan = h.plan(key, bias_ptr)
    if plan.algo is None:
        return False
    lib = h.lib
    _set(lib.cublasLtMatmulDescSetAttribute, plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, ctypes.c_void_p(bias_ptr))
    cublas._check(lib.cublasLtMatmul(
        h.handle, plan.desc, _ONE.ctypes.data, a_ptr, plan.a, b_ptr, plan.b, _ZERO.ctypes.data,
        d_ptr, plan.d, d_ptr, plan.d, ctypes.addressof(plan.algo), h.workspace.ptr, WORKSPACE_BYTES,
        cp.cuda.get_current_stream().ptr), "cublasLtMatmul")
    return True
