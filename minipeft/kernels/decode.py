"""Launchers of the greedy decode step's kernels (``decode.cu``): one call, one kernel, no allocation.

The step these kernels make, and why each takes only preallocated buffers and reads the
per-token counters (``tok``, ``pos``, ``slot``, ``step``) from device memory, is told in
``decode.cu`` and in :mod:`minipeft.decoding.graph`, which captures the launches once into a
CUDA graph (CUDA C++ Programming Guide, "CUDA Graphs") and replays them per token. Each
launcher has the signature of its NumPy twin in :class:`minipeft.decoding.graph.Reference`
and writes its result into its last array argument, as the twin does;
``tests/test_graph_decode.py`` checks that the two agree.

The multi-adapter server's step (:mod:`minipeft.serve_graph`) adds each row's own LoRA term to a
served Linear with two launches, Punica's BGMV (Chen et al. 2023, arXiv 2310.18547, Sec. 4)
split at its rank-``R`` middle: :func:`lora_shrink` (``u[b] = A_j x[b]``) and :func:`gemv_lora`
(the GEMV with ``s_j B_j u[b]`` added before its epilogue), ``j`` the row's adapter slot.

Arrays are CuPy arrays: activations and weights float32, counters int32, all C-contiguous
(the kernels index raw pointers). A launcher checks that, and raises ``ValueError`` naming
the argument, before anything is launched: inside a capture a wrong launch would only show
up as wrong tokens.

Floors (GPT-2 small, 124M parameters): one step reads every weight once, ~0.5 GB in float32
(the tied LM head ``wte`` alone 154 MB), so at the H200's ~4.8 TB/s a token costs at least
~0.1 ms whatever B <= 8 is; the ~90 launches of a step cost a few microseconds each inside a
graph instead of the ~10 µs of Python and driver work each costs outside one.
"""
from __future__ import annotations

import numpy as np

from ._module import blocks, cupy, f32, i32, kernel

MAX_ROWS = 8  # rows one GEMV takes (its per-row accumulators live in registers); must match decode.cu
GEMV_WARPS = 4  # output features per GEMV block (one warp each)
EPILOGUES = {"none": 0, "gelu": 1, "residual": 2}  # must match decode.cu's EPILOGUE_*
SMEM_LIMIT = 48 * 1024  # bytes of dynamic shared memory a kernel may use without opting in
SHRINK_WARPS = 4  # (row, rank) pairs per lora_shrink block (one warp each)
KERNELS = ("embed", "layernorm_rows", "gemv_rows", "gemv_lora_rows", "lora_shrink", "attend", "argmax_rows",
           "advance")


def load() -> None:
    """Compile and load every kernel of ``decode.cu`` now (before a capture, which must not compile)."""
    for name in KERNELS:
        kernel("decode.cu", name)


def _check(name: str, a, dtype, ndim: int | None = None) -> None:
    cp = cupy()
    if not isinstance(a, cp.ndarray):
        raise ValueError(f"decode kernels: {name} must be a CuPy array, got {type(a).__name__}; move it to the GPU")
    if a.dtype != dtype or not a.flags.c_contiguous or (ndim is not None and a.ndim != ndim):
        raise ValueError(f"decode kernels: {name} must be a C-contiguous {np.dtype(dtype).name} array"
                         f"{'' if ndim is None else f' of {ndim} dimensions'}, got {a.dtype} {a.shape} "
                         f"(contiguous: {a.flags.c_contiguous}); pass cupy.ascontiguousarray(a, dtype=...)")


def embed(tok, pos, wte, wpe, x) -> None:
    """``x[b] = wte[tok[b]] + wpe[pos[b]]``; x (B, C)."""
    for n, a, t in (("tok", tok, np.int32), ("pos", pos, np.int32), ("wte", wte, np.float32),
                    ("wpe", wpe, np.float32), ("x", x, np.float32)):
        _check(n, a, t)
    B, C = x.shape
    kernel("decode.cu", "embed")((blocks(B * C),), (256,), (tok, pos, wte, wpe, x, i32(B), i32(C)))


def layernorm(x, weight, bias, eps: float, y) -> None:
    """``y = LayerNorm(x) * weight + bias`` row by row; x, y (B, C)."""
    for n, a in (("x", x), ("weight", weight), ("bias", bias), ("y", y)):
        _check(n, a, np.float32)
    B, C = x.shape
    kernel("decode.cu", "layernorm_rows")((B,), (256,), (x, weight, bias, y, i32(C), f32(eps)))


def gemv(x, weight, bias, y, epilogue: str = "none") -> None:
    """``y = epilogue(x weight^T + bias)``: x (B, in), weight (out, in), bias (out,) or None, y (B, out).

    ``epilogue``: ``"none"``, ``"gelu"`` (tanh form) or ``"residual"`` (``y += ...``, in place).
    """
    _gemv(x, weight, bias, y, epilogue, None)


def _gemv(x, weight, bias, y, epilogue: str, lora) -> None:
    """:func:`gemv`; with ``lora`` = ``(u, lora_B, scales, slot)`` (checked by :func:`gemv_lora`), its LoRA form."""
    for n, a in (("x", x), ("weight", weight), ("y", y)):
        _check(n, a, np.float32, 2)
    if bias is not None:
        _check("bias", bias, np.float32, 1)
    B, n_in = x.shape
    n_out = weight.shape[0]
    if B > MAX_ROWS:
        raise ValueError(f"decode kernels: gemv takes at most {MAX_ROWS} rows, got {B}; decode in smaller batches")
    if weight.shape[1] != n_in or y.shape != (B, n_out) or (bias is not None and bias.shape != (n_out,)):
        raise ValueError(f"decode kernels: gemv shapes do not fit: x {x.shape}, weight {weight.shape}, "
                         f"bias {None if bias is None else bias.shape}, y {y.shape}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"decode kernels: epilogue must be one of {sorted(EPILOGUES)}, got {epilogue!r}")
    b = weight if bias is None else bias  # a valid pointer the kernel never reads when has_bias is 0
    args = (x, weight, b, y, y, i32(B), i32(n_in), i32(n_out), i32(bias is not None), i32(EPILOGUES[epilogue]))
    grid, block = (-(-n_out // GEMV_WARPS),), (32 * GEMV_WARPS,)
    if lora is None:
        kernel("decode.cu", "gemv_rows")(grid, block, args)
    else:
        u, lora_B, scales, slot = lora
        kernel("decode.cu", "gemv_lora_rows")(grid, block, args + (u, lora_B, scales, slot, i32(u.shape[1])))


def lora_shrink(x, lora_A, slot, u) -> None:
    """LoRA's shrink per row: ``u[b] = lora_A[slot[b]] @ x[b]`` (zeros where ``slot[b] < 0``).

    x (B, in), lora_A (N, R, in) (the served layer's stack), slot (B,) int32 in [-1, N) (not
    checked: it is read on the device), u (B, R).
    """
    for n, a, t, d in (("x", x, np.float32, 2), ("lora_A", lora_A, np.float32, 3), ("slot", slot, np.int32, 1),
                       ("u", u, np.float32, 2)):
        _check(n, a, t, d)
    B, n_in = x.shape
    R = lora_A.shape[1]
    if lora_A.shape[2] != n_in or u.shape != (B, R) or slot.shape != (B,):
        raise ValueError(f"decode kernels: lora_shrink shapes do not fit: x {x.shape}, lora_A {lora_A.shape}, "
                         f"slot {slot.shape}, u {u.shape}")
    if B * R == 0:
        return
    kernel("decode.cu", "lora_shrink")((-(-(B * R) // SHRINK_WARPS),), (32 * SHRINK_WARPS,), (
        x, lora_A, slot, u, i32(B), i32(n_in), i32(R)))


def gemv_lora(x, weight, bias, u, lora_B, scales, slot, y, epilogue: str = "none") -> None:
    """:func:`gemv` plus each row's LoRA term before the epilogue (the expand of :func:`lora_shrink`'s ``u``):

    ``y[b] = epilogue(x[b] weight^T + bias + scales[j] * lora_B[j] @ u[b])``, ``j = slot[b]``
    (no term where ``j < 0``); u (B, R), lora_B (N, out, R), scales (N,), slot (B,) int32.
    """
    for n, a, t in (("u", u, np.float32), ("lora_B", lora_B, np.float32), ("scales", scales, np.float32),
                    ("slot", slot, np.int32)):
        _check(n, a, t)
    B, n_out = x.shape[0], weight.shape[0]
    if lora_B.ndim != 3 or lora_B.shape[1] != n_out or u.shape != (B, lora_B.shape[2]) \
            or scales.shape != (lora_B.shape[0],) or slot.shape != (B,):
        raise ValueError(f"decode kernels: gemv_lora shapes do not fit: x {x.shape}, weight {weight.shape}, "
                         f"u {u.shape}, lora_B {lora_B.shape}, scales {scales.shape}, slot {slot.shape}")
    _gemv(x, weight, bias, y, epilogue, (u, lora_B, scales, slot))


def attend(qkv, k_cache, v_cache, kept, slot, out, n_head: int) -> None:
    """One query per row against its cache: writes k, v at ``slot[0]``, then ``out`` (B, C).

    qkv (B, 3C); k_cache, v_cache (B, H, S, D); kept (B, S) int32; slot (1,) int32.
    """
    for n, a, t in (("qkv", qkv, np.float32), ("k_cache", k_cache, np.float32), ("v_cache", v_cache, np.float32),
                    ("kept", kept, np.int32), ("slot", slot, np.int32), ("out", out, np.float32)):
        _check(n, a, t)
    B, H, S, D = k_cache.shape
    if H != n_head or v_cache.shape != k_cache.shape or qkv.shape != (B, 3 * H * D) or kept.shape != (B, S):
        raise ValueError(f"decode kernels: attend shapes do not fit: qkv {qkv.shape}, cache {k_cache.shape}, "
                         f"kept {kept.shape}, n_head {n_head}")
    smem = 4 * (D + S)
    if smem > SMEM_LIMIT:
        raise ValueError(f"decode kernels: attend keeps {S} scores in shared memory ({smem} bytes > {SMEM_LIMIT}); "
                         "use a model with a smaller block_size, or model.generate")
    kernel("decode.cu", "attend")((B * H,), (128,), (
        qkv, k_cache, v_cache, kept, slot, out, i32(H), i32(D), i32(S), f32(1.0 / np.sqrt(D))), shared_mem=smem)


def argmax(logits, tok, out, step) -> None:
    """``tok[b] = argmax(logits[b])`` (NumPy's tie rule) and ``out[b, step[0]] = tok[b]``."""
    for n, a, t in (("logits", logits, np.float32), ("tok", tok, np.int32), ("out", out, np.int32),
                    ("step", step, np.int32)):
        _check(n, a, t)
    B, V = logits.shape
    kernel("decode.cu", "argmax_rows")((B,), (512,), (logits, i32(V), tok, out, i32(out.shape[1]), step))


def advance(pos, slot, step, kept) -> None:
    """The step's last kernel: ``kept[:, slot] = 1``, then ``pos += 1``, ``slot += 1``, ``step += 1``."""
    for n, a in (("pos", pos), ("slot", slot), ("step", step), ("kept", kept)):
        _check(n, a, np.int32)
    B, S = kept.shape
    kernel("decode.cu", "advance")((1,), (32,), (pos, slot, step, kept, i32(B), i32(S)))


__all__ = ["load", "embed", "layernorm", "gemv", "gemv_lora", "lora_shrink", "attend", "argmax", "advance", "MAX_ROWS",
           "EPILOGUES"]
