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

``maybe_cuda_bgmv`` / ``maybe_cuda_sgmv`` are the hooks :mod:`minipeft.serve` calls: they
run the kernel and return True for float32 CuPy arrays of a supported size, and return
False otherwise (the caller then runs the twin), never raising for an unsupported case.
"""
from __future__ import annotations

import numpy as np

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


def maybe_cuda_bgmv(y, x, lora_A, lora_B, indices, scales) -> bool:
    """``y[m] += scales[i] (x[m] A[i]^T) B[i]^T`` with ``i = indices[m]`` on the GPU; False if not applicable.

    ``y`` (M, H2), ``x`` (M, H1) (or any shapes of M rows, e.g. (M, 1, H)), ``lora_A``
    (N, R, H1), ``lora_B`` (N, H2, R), ``indices`` (M,) ints (< 0: skip the row),
    ``scales`` (N,): float32 C-contiguous CuPy arrays.
    """
    if type(y).__module__.split(".")[0] != "cupy":
        return False
    cp = _cupy()
    if not _usable(cp, y, x, lora_A, lora_B, scales):
        return False
    H1, R, H2 = x.shape[-1], lora_A.shape[1], lora_B.shape[1]
    M = x.size // H1 if H1 else 0
    smem = 4 * (H1 + R)
    if smem > SMEM_LIMIT or M == 0 or y.size != M * H2 or lora_A.shape[2] != H1:
        return M == 0 and y.size == 0
    idx = _int32(cp, indices)
    _kernel("bgmv_f32")((M,), (THREADS,), (x, lora_A, lora_B, idx, scales, y, np.int32(H1), np.int32(H2),
                                           np.int32(R)), shared_mem=smem)
    return True


def sgmv_tiles(indptr, seg_slot) -> tuple[np.ndarray, np.ndarray]:
    """(tile_seg, tile_row0): the tiles of up to ``TM`` rows of every segment with a slot >= 0 (host NumPy)."""
    indptr, seg_slot = np.asarray(indptr, np.int64), np.asarray(seg_slot, np.int64)
    lens = np.diff(indptr)
    n = np.where(seg_slot >= 0, -(-lens // TM), 0)              # tiles per segment
    seg = np.repeat(np.arange(len(lens)), n)                     # (n_tiles,)
    first = np.repeat(np.cumsum(n) - n, n)                       # index of each segment's first tile
    row0 = indptr[seg] + TM * (np.arange(len(seg)) - first)
    return seg.astype(np.int32), row0.astype(np.int32)


def maybe_cuda_sgmv(y, x, lora_A, lora_B, indptr, seg_slot, scales) -> bool:
    """SGMV: ``y[s:e] += scales[i] (x[s:e] A[i]^T) B[i]^T`` for each segment on the GPU; False if not applicable.

    ``indptr`` (S + 1,) and ``seg_slot`` (S,) are host integer arrays (segment ``k`` is rows
    ``indptr[k]:indptr[k+1]``, adapter slot ``seg_slot[k]``, < 0 skips it); the rest as
    :func:`maybe_cuda_bgmv`. Two launches: shrink into a (M, R) scratch, then expand.
    """
    if type(y).__module__.split(".")[0] != "cupy":
        return False
    cp = _cupy()
    if not _usable(cp, y, x, lora_A, lora_B, scales):
        return False
    M, H1 = x.shape
    R, H2 = lora_A.shape[1], lora_B.shape[1]
    if R > RMAX:
        return False
    tile_seg, tile_row0 = sgmv_tiles(indptr, seg_slot)
    if len(tile_seg) == 0:
        return True
    d_seg, d_row0 = cp.asarray(tile_seg), cp.asarray(tile_row0)
    d_ptr = cp.asarray(np.asarray(indptr, np.int32))
    d_slot = cp.asarray(np.asarray(seg_slot, np.int32))
    v = cp.empty((M, R), dtype=cp.float32)                       # (M, R) shrink output
    _kernel("sgmv_shrink_f32")((len(tile_seg),), (THREADS,), (x, lora_A, d_seg, d_row0, d_ptr, d_slot, v,
                                                              np.int32(H1), np.int32(R)))
    grid = (len(tile_seg), -(-H2 // TO))
    _kernel("sgmv_expand_f32")(grid, (THREADS,), (v, lora_B, d_seg, d_row0, d_ptr, d_slot, scales, y,
                                                  np.int32(H2), np.int32(R)))
    return True


__all__ = ["maybe_cuda_bgmv", "maybe_cuda_sgmv", "sgmv_tiles", "THREADS", "TM", "TO", "RMAX"]
