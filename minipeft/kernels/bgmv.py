"""CUDA RawKernels for multi-adapter LoRA batches: BGMV (decode) and SGMV (prefill).

Punica (Chen et al. 2023, arXiv 2310.18547), Sec. 4; semantics in
``shared/reference/peft-format.md`` section 8. Both add, in place, the LoRA part of a
batch in which row ``m`` uses adapter slot ``i = slot(m)``::

    y[m] += scales[i] * (x[m] @ A[i].T) @ B[i].T        A: (N, R, H1), B: (N, H2, R)

(slot < 0: a base-model row, left unchanged). BGMV takes one slot per row (decode: one
token per request); SGMV takes segments of consecutive rows that share a slot (prefill:
a request's prompt tokens, requests sorted by adapter) and reuses each tile of weights for
up to 32 rows. The NumPy twins are :func:`minipeft.serve.bgmv_reference` and
:func:`minipeft.serve.sgmv_reference`; ``tests/kernels/test_bgmv.py`` checks that they agree.

:func:`bgmv_cuda` / :func:`sgmv_cuda` take the twins' arguments and return ``y`` as they do;
:func:`bgmv_applies` / :func:`sgmv_applies` say for which arguments (float32 CuPy arrays of
a supported size). :mod:`minipeft.serve` registers them as its twins' fast paths in
:mod:`minipeft.fast` (the twins live there, above this package).
"""
from __future__ import annotations

import numpy as np

from ..fast import on_gpu
from ._module import cupy as _cupy, kernel

THREADS = 256        # threads per block of every kernel (the SGMV kernels assume exactly 256)
TM, TO = 32, 128     # SGMV rows per tile, expand outputs per block; must match bgmv.cu
RMAX = 64            # largest padded rank of the SGMV kernels; must match bgmv.cu
SMEM_LIMIT = 48 * 1024  # bytes of dynamic shared memory BGMV may ask for without opting in


def _kernel(name: str):
    """The kernel ``name`` of ``bgmv.cu``, compiled once per device (:mod:`minipeft.kernels._module`)."""
    return kernel("bgmv.cu", name)


def _usable(cp, *arrays) -> bool:
    """All float32, C-contiguous CuPy arrays (what the kernels index)."""
    return all(isinstance(a, cp.ndarray) and a.dtype == cp.float32 and a.flags.c_contiguous for a in arrays)


def _int32(cp, a):
    a = cp.asarray(a)
    return a if a.dtype == cp.int32 and a.flags.c_contiguous else cp.ascontiguousarray(a, dtype=cp.int32)


def bgmv_applies(y, x, lora_A, lora_B, indices, scales) -> bool:
    """True for float32 C-contiguous CuPy arrays of fitting shapes whose rows fit in shared memory."""
    if not on_gpu(y) or not _usable(_cupy(), y, x, lora_A, lora_B, scales):
        return False
    H1, R, H2 = x.shape[-1], lora_A.shape[1], lora_B.shape[1]
    M = x.size // H1 if H1 else 0
    return 4 * (H1 + R) <= SMEM_LIMIT and M > 0 and y.size == M * H2 and lora_A.shape[2] == H1


def bgmv_cuda(y, x, lora_A, lora_B, indices, scales):
    """``y[m] += scales[i] (x[m] A[i]^T) B[i]^T`` with ``i = indices[m]`` on the GPU, in place; returns ``y``.

    ``y`` (M, H2), ``x`` (M, H1) (or any shapes of M rows, e.g. (M, 1, H)), ``lora_A``
    (N, R, H1), ``lora_B`` (N, H2, R), ``indices`` (M,) ints (< 0: skip the row),
    ``scales`` (N,): float32 C-contiguous CuPy arrays (see :func:`bgmv_applies`).
    """
    cp = _cupy()
    H1, R, H2 = x.shape[-1], lora_A.shape[1], lora_B.shape[1]
    M = x.size // H1
    idx = _int32(cp, indices)
    _kernel("bgmv_f32")((M,), (THREADS,), (x, lora_A, lora_B, idx, scales, y, np.int32(H1), np.int32(H2),
                                           np.int32(R)), shared_mem=4 * (H1 + R))
    return y


def sgmv_tiles(indptr, seg_slot) -> tuple[np.ndarray, np.ndarray]:
    """(tile_seg, tile_row0): the tiles of up to ``TM`` rows of every segment with a slot >= 0 (host NumPy)."""
    indptr, seg_slot = np.asarray(indptr, np.int64), np.asarray(seg_slot, np.int64)
    lens = np.diff(indptr)
    n = np.where(seg_slot >= 0, -(-lens // TM), 0)              # tiles per segment
    seg = np.repeat(np.arange(len(lens)), n)                     # (n_tiles,)
    first = np.repeat(np.cumsum(n) - n, n)                       # index of each segment's first tile
    row0 = indptr[seg] + TM * (np.arange(len(seg)) - first)
    return seg.astype(np.int32), row0.astype(np.int32)


def sgmv_applies(y, x, lora_A, lora_B, indptr, seg_slot, scales) -> bool:
    """True for float32 C-contiguous CuPy arrays with a padded rank of at most ``RMAX``."""
    return on_gpu(y) and _usable(_cupy(), y, x, lora_A, lora_B, scales) and lora_A.shape[1] <= RMAX


def sgmv_cuda(y, x, lora_A, lora_B, indptr, seg_slot, scales):
    """SGMV: ``y[s:e] += scales[i] (x[s:e] A[i]^T) B[i]^T`` for each segment on the GPU, in place; returns ``y``.

    ``indptr`` (S + 1,) and ``seg_slot`` (S,) are host integer arrays (segment ``k`` is rows
    ``indptr[k]:indptr[k+1]``, adapter slot ``seg_slot[k]``, < 0 skips it); the rest as
    :func:`bgmv_cuda` (see :func:`sgmv_applies`). Two launches: shrink into a (M, R)
    scratch, then expand.
    """
    cp = _cupy()
    M, H1 = x.shape
    R, H2 = lora_A.shape[1], lora_B.shape[1]
    tile_seg, tile_row0 = sgmv_tiles(indptr, seg_slot)
    if len(tile_seg) == 0:
        return y
    d_seg, d_row0 = cp.asarray(tile_seg), cp.asarray(tile_row0)
    d_ptr = cp.asarray(np.asarray(indptr, np.int32))
    d_slot = cp.asarray(np.asarray(seg_slot, np.int32))
    v = cp.empty((M, R), dtype=cp.float32)                       # (M, R) shrink output
    _kernel("sgmv_shrink_f32")((len(tile_seg),), (THREADS,), (x, lora_A, d_seg, d_row0, d_ptr, d_slot, v,
                                                              np.int32(H1), np.int32(R)))
    grid = (len(tile_seg), -(-H2 // TO))
    _kernel("sgmv_expand_f32")(grid, (THREADS,), (v, lora_B, d_seg, d_row0, d_ptr, d_slot, scales, y,
                                                  np.int32(H2), np.int32(R)))
    return y


__all__ = ["bgmv_applies", "bgmv_cuda", "sgmv_applies", "sgmv_cuda", "sgmv_tiles", "THREADS", "TM", "TO", "RMAX"]
