"""Batched 16-bit matrix products on the tensor cores: one cuBLAS ``gemmStridedBatchedEx`` call.

Mixed precision (Micikevicius et al. 2018, *Mixed Precision Training*, §3) multiplies 16-bit
operands and accumulates the products in float32. For a 2-D product CuPy does that itself
(``a @ b`` on float16 or bfloat16 arrays); for a batch of products, such as attention's
(B, H) pairs of (T, D) matrices, CuPy 14 has no such path: its float16 batched ``@``
converts to float32 and back, and its bfloat16 batched ``@`` raises "data type 'E' not
understood" (measured on an H200 with CuPy 14.2 and ml_dtypes). :func:`batched_gemm` calls
cuBLAS directly instead. There is no NumPy twin of this function as such: its arithmetic
(16-bit operands, float32 sums) is what :func:`minipeft.amp.round_to_compute` and a float32
``@`` emulate, and ``tests/kernels/test_amp_attention.py`` checks the two agree.

cuBLAS is column-major. A C-contiguous (row-major) matrix X of shape (r, c) is, read
column-major with leading dimension c, the matrix X^T of shape (c, r). So to get the
row-major C = op(A) op(B) of shape (m, n) we ask cuBLAS for the column-major
C^T = op(B)^T op(A)^T of shape (n, m): B's buffer goes first, A's second, and cuBLAS's
(M, N, K) are our (n, m, k). Each buffer's leading dimension is simply its last axis;
transposing an operand (``trans_a``) is cuBLAS's ``CUBLAS_OP_T`` on that operand's buffer.

The call goes to cuBLAS through :mod:`minipeft.kernels.cublas` (a handle with its own
workspace), not CuPy's wrapper, so that it can also be recorded into a CUDA graph
(:mod:`minipeft.graph_train`). A product plus a bias, a Linear layer's ``x W^T + b``, is
:func:`gemm_bias`: one cuBLASLt call (:mod:`minipeft.kernels.cublaslt`, recordable the same
way) whose epilogue adds the bias to the float32 sums, instead of a GEMM and a second pass.

Verified where: the signature of ``cublasGemmStridedBatchedEx`` and the constants below are
the CUDA headers' (CuPy 14.2's ``cupy_backends/cuda/libs/cublas.pyx`` wraps the same call with
float32 ``one``/``zero`` host scalars passed by address, as we do). The issue's H200 check
(bfloat16 operands, float32 compute: relative error 2.5e-3 against float32, 58 TFLOP/s at
96 x 512 x 512 x 64) used this call. ``tests/kernels/test_amp_attention.py`` checks the
arguments on the CPU against a NumPy model of cuBLAS's documented column-major contract, and
the products themselves on a GPU (its ``gpu`` tests); ``tests/kernels/test_cublaslt.py`` does
the same for :func:`gemm_bias`.
"""
from __future__ import annotations

import math

import numpy as np

from . import cublas, cublaslt
from ._module import cupy

# cuBLAS / CUDA enum values (stable ABI numbers, from the CUDA headers; CuPy exposes the same
# as cupy.cuda.runtime.CUDA_R_* and cupy.cuda.cublas.CUBLAS_*):
CUDA_R_32F = 0  # library_types.h: float32
CUDA_R_16F = 2  # library_types.h: float16 (IEEE half)
CUDA_R_16BF = 14  # library_types.h: bfloat16
CUBLAS_OP_N = 0  # cublas_api.h: use the matrix as stored
CUBLAS_OP_T = 1  # cublas_api.h: use its transpose
CUBLAS_COMPUTE_32F = 68  # cublas_api.h cublasComputeType_t: accumulate in float32
CUBLAS_GEMM_DEFAULT = -1  # cublas_api.h: let cuBLAS pick the algorithm (tensor cores for 16-bit inputs)
BIAS_ALIGNMENT = 16  # bytes: cuBLASLt's bias epilogue wants a 16-byte aligned bias (llm.c's matmul.cuh checks
# every cuBLASLt pointer for it; marian's gpu/prod.cpp found 8 not enough on an A100), a copy is made otherwise


def cuda_data_type(dtype) -> int:
    """The ``cudaDataType`` code of float32, float16 or bfloat16 (``ml_dtypes.bfloat16``)."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return CUDA_R_32F
    if dtype == np.float16:
        return CUDA_R_16F
    if dtype.name == "bfloat16":  # ml_dtypes' dtype (its char 'E' is ambiguous, so go by name)
        return CUDA_R_16BF
    raise TypeError(f"batched_gemm takes float16, bfloat16 or float32 arrays, got {dtype}")


def batched_gemm(a, b, *, trans_a: bool = False, trans_b: bool = False, out_dtype=np.float32):
    """``op(a) @ op(b)`` for C-contiguous 16-bit CuPy arrays, float32 accumulation.

    ``a`` is (..., m, k) (or (..., k, m) with ``trans_a``), ``b`` is (..., k, n) (or (..., n, k)
    with ``trans_b``), both float16 or both bfloat16, with the same leading axes, which are
    flattened into one batch. Returns a new C-contiguous (..., m, n) array of ``out_dtype``
    (float32 by default; float16/bfloat16 round the float32 sums once).
    """
    if a.dtype != b.dtype or cuda_data_type(a.dtype) == CUDA_R_32F:
        raise TypeError(f"batched_gemm needs two float16 or two bfloat16 operands, got {a.dtype} and {b.dtype}")
    if a.ndim < 2 or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"batched_gemm needs operands (..., m, k), (..., k, n) with the same leading axes, "
                         f"got {a.shape} and {b.shape}")
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        raise ValueError("batched_gemm needs C-contiguous operands (cp.ascontiguousarray them first)")
    m, k = a.shape[-2:][::-1] if trans_a else a.shape[-2:]
    kb, n = b.shape[-2:][::-1] if trans_b else b.shape[-2:]
    if k != kb:
        raise ValueError(f"batched_gemm: inner sizes differ ({k} vs {kb}) for shapes {a.shape}, {b.shape} "
                         f"with trans_a={trans_a}, trans_b={trans_b}")
    cp = cupy()
    batch = math.prod(a.shape[:-2])
    c = cp.empty(a.shape[:-2] + (m, n), dtype=out_dtype)  # (..., m, n)
    if c.size == 0:
        return c
    if k == 0:  # an empty sum
        c.fill(0)
        return c
    # column-major C^T (n, m) = op(B)^T (n, k) @ op(A)^T (k, m): b's buffer first, then a's
    cublas.gemm_strided_batched(
        CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
        n, m, k,
        b.data.ptr, cuda_data_type(b.dtype), b.shape[-1], b.shape[-2] * b.shape[-1],
        a.data.ptr, cuda_data_type(a.dtype), a.shape[-1], a.shape[-2] * a.shape[-1],
        c.data.ptr, cuda_data_type(c.dtype), n, m * n,
        batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    return c


def gemm_bias(a, b, bias, *, trans_a: bool = False, trans_b: bool = False):
    """``op(a) @ op(b) + bias`` for 2-D C-contiguous 16-bit CuPy arrays and a float32 ``bias``, as one
    cuBLASLt matmul whose epilogue adds the bias to the float32 sums before they are written.

    ``a`` is (m, k) (or (k, m) with ``trans_a``), ``b`` is (k, n) (or (n, k) with ``trans_b``), both
    float16 or both bfloat16; ``bias`` is (n,) float32, one value per column of the product.
    Returns a new C-contiguous (m, n) float32 array, or None where cuBLASLt has no algorithm for
    these shapes and alignments (nothing was computed: the caller adds the bias itself).

    Column-major (see the module docstring), the row-major (m, n) result C is C^T (n, m) =
    op(B)^T op(A)^T: b's buffer is cuBLASLt's A, a's buffer its B, and cuBLASLt's (M, N, K) are
    our (n, m, k). C^T has one row per column of C, so the bias, one value per output feature,
    is one value per row of cuBLASLt's D: exactly ``CUBLASLT_EPILOGUE_BIAS``'s broadcast ("bias
    vector length must match matrix D rows ... broadcasted to all columns", cublasLt.h). For
    ``x @ w.T`` (x (m, k), w (n, k)): A = w's buffer, stored k x n with ld k, op T; B = x's buffer,
    stored k x m with ld k, op N; D n x m with ld n, which is C-contiguous (m, n).
    """
    if a.dtype != b.dtype or cuda_data_type(a.dtype) == CUDA_R_32F:
        raise TypeError(f"gemm_bias needs two float16 or two bfloat16 operands, got {a.dtype} and {b.dtype}")
    if a.ndim != 2 or b.ndim != 2 or not (a.flags.c_contiguous and b.flags.c_contiguous):
        raise ValueError(f"gemm_bias needs 2-D C-contiguous operands, got {a.shape} and {b.shape}")
    m, k = a.shape[::-1] if trans_a else a.shape
    kb, n = b.shape[::-1] if trans_b else b.shape
    if k != kb:
        raise ValueError(f"gemm_bias: inner sizes differ ({k} vs {kb}) for shapes {a.shape}, {b.shape} "
                         f"with trans_a={trans_a}, trans_b={trans_b}")
    if bias.shape != (n,) or bias.dtype != np.float32 or not bias.flags.c_contiguous:
        raise ValueError(f"gemm_bias needs a contiguous float32 bias of shape ({n},), got {bias.dtype} {bias.shape}")
    cp = cupy()
    c = cp.empty((m, n), dtype=np.float32)  # (m, n)
    if c.size == 0:
        return c
    if k == 0:  # an empty sum, plus the bias
        c[...] = bias
        return c
    if bias.data.ptr % BIAS_ALIGNMENT:
        bias = cp.array(bias)  # a fresh (aligned) copy of a view into some larger buffer
    ran = cublaslt.matmul_bias(
        CUBLAS_OP_T if trans_b else CUBLAS_OP_N, CUBLAS_OP_T if trans_a else CUBLAS_OP_N, n, m, k,
        b.data.ptr, cuda_data_type(b.dtype), b.shape[-1],
        a.data.ptr, cuda_data_type(a.dtype), a.shape[-1],
        bias.data.ptr, c.data.ptr, n)
    return c if ran else None


def sum_rows_cuda(a):
    """``a.sum(axis=0)`` of a 2-D float32 CuPy array (rows, n) as one cuBLAS product ``ones (rows,) @ a``.

    Column-major, ``a``'s buffer is a^T (n, rows) with leading dimension n, so the (n, 1)
    result is ``a^T @ ones`` with no transpose flag (float32 in, float32 sums).
    """
    cp = cupy()
    a = cp.ascontiguousarray(a)
    rows, n = a.shape
    out = cp.empty(n, dtype=cp.float32)  # (n,)
    if n == 0:
        return out
    if rows == 0:
        out.fill(0)
        return out
    ones = cp.ones(rows, dtype=cp.float32)  # (rows,)
    cublas.gemm_strided_batched(CUBLAS_OP_N, CUBLAS_OP_N, n, 1, rows,
                                a.data.ptr, CUDA_R_32F, n, 0, ones.data.ptr, CUDA_R_32F, rows, 0,
                                out.data.ptr, CUDA_R_32F, n, 0, 1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    return out


def sum_rows_applies(a) -> bool:
    """A 2-D float32 CuPy array."""
    from ..fast import float32_on_gpu

    return float32_on_gpu(a, contiguous=False) and a.ndim == 2


def matmul_16bit_applies(a, b, out_dtype=None) -> bool:
    """Two 2-D CuPy arrays, both float16 or both bfloat16 (``out_dtype``: any that batched_gemm writes)."""
    from ..fast import on_gpu

    return (on_gpu(a) and on_gpu(b) and a.ndim == b.ndim == 2 and a.dtype == b.dtype
            and (a.dtype == np.float16 or a.dtype.name == "bfloat16"))


def matmul_16bit_cuda(a, b, out_dtype=np.float32):
    """``a @ b`` (2-D, 16-bit) as one cuBLAS GEMM with a float32 (or ``out_dtype``: float16, bfloat16, the float32
    sums rounded once by cuBLAS) result (:func:`minipeft.amp.matmul_16bit`'s fast path). A transposed view
    (``w.T``) goes to cuBLAS as its buffer with the transpose flag, not copied."""
    (a, ta), (b, tb) = _as_buffer(a), _as_buffer(b)
    return batched_gemm(a, b, trans_a=ta, trans_b=tb, out_dtype=out_dtype)  # (m, n)


def matmul_16bit_bias_applies(a, b, bias) -> bool:
    """:func:`matmul_16bit_applies`, and a contiguous float32 CuPy bias with one value per column of ``a @ b``."""
    from ..fast import on_gpu

    return (matmul_16bit_applies(a, b) and on_gpu(bias) and bias.ndim == 1 and bias.dtype == np.float32
            and bias.flags.c_contiguous and bias.shape[0] == b.shape[1])


def matmul_16bit_bias_cuda(a, b, bias):
    """``a @ b + bias`` (2-D, 16-bit, float32 bias) as one cuBLASLt GEMM with the bias added in its
    epilogue (:func:`minipeft.amp.matmul_16bit_bias`'s fast path): the float32 result written once,
    no second pass over it. A transposed view (``w.T``) goes as its buffer with the transpose flag."""
    (a, ta), (b, tb) = _as_buffer(a), _as_buffer(b)
    y = gemm_bias(a, b, bias, trans_a=ta, trans_b=tb)  # (m, n) float32
    if y is None:  # cuBLASLt has no algorithm for this case: the product, then the bias
        y = batched_gemm(a, b, trans_a=ta, trans_b=tb, out_dtype=np.float32)
        y += bias
    return y


def _as_buffer(a):
    """``(buffer, transposed)``: a C-contiguous 2-D array whose (transpose) is ``a``, copying only if neither is."""
    if a.flags.c_contiguous:
        return a, False
    if a.T.flags.c_contiguous:
        return a.T, True
    return cupy().ascontiguousarray(a), False
