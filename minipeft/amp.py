"""Mixed precision: 16-bit matrix products, float32 master weights, dynamic loss scaling.

Micikevicius et al. (2018), *Mixed Precision Training* (arXiv 1710.03740):

* **16-bit products** (§3): the operands of every matrix product are rounded to float16 (or
  bfloat16) and the products are accumulated in float32. That is what a GPU's tensor cores
  do, many times faster than float32 arithmetic. The paper then writes the sums out in 16
  bits for the next 16-bit op; here the next ops (bias, GELU, residual, layer norm) read
  float32, so cuBLAS writes the float32 sums directly: one rounding fewer, and no pass that
  converts a 16-bit result back to float32 (issue [fast16]: those passes were a third of a
  bfloat16 step's GPU time on the H200). The one product whose consumer reads 16 bits is the
  LM head's: its logits go to the loss alone, which widens them itself (as torch.autocast's
  linear writes 16-bit logits and its cross_entropy upcasts them), so there cuBLAS rounds the
  float32 sums once to the compute dtype (:class:`AmpLinearOut16`, asked for by a layer's
  ``nn.Linear.output_16bit``): half the bytes of the largest activation of a GPT-2 step.
* **float32 master weights** (§3.1): parameters and optimizer state stay float32; a
  16-bit copy of a weight is made for each product. Updates much smaller than a weight
  (lr x grad < 2^-11 of it) would vanish if the weight itself were float16.
* **Loss scaling** (§3.2): float16 cannot hold magnitudes below 2^-24, where small
  activation gradients fall. Multiplying the loss by ``S`` scales every gradient by ``S``;
  the weight gradients are divided by ``S`` again before the update. :class:`GradScaler`
  picks ``S`` dynamically: halve it and skip the step when a gradient overflows to
  inf/nan, double it after ``growth_interval`` clean steps (as NVIDIA Apex and PyTorch do).
  bfloat16 keeps float32's exponent range, so it trains without loss scaling.
* Everything else (layer norm statistics, softmax, cross-entropy, GELU, the residual
  stream, gradients handed to the optimizer) stays float32 (§3.3: reductions in float32). A
  layer norm whose one reader rounds its output to 16 bits anyway writes it rounded
  (:mod:`minipeft.amp_layernorm`): the same bits, one pass fewer.

How it runs here. Under ``with autocast("float16"):`` (or ``"bfloat16"``) the float32 2-D matrix products
(``linear``, the LoRA branches, the LM head, 2-D ``matmul``) run as :class:`AmpLinear` and
:class:`AmpMatMul`, 16-bit versions of the reference ops registered in :mod:`minipeft.fast`
for the time autocast is on (the reference ops in ``minipeft/ops`` never see a 16-bit array);
the quantized layers (:mod:`minipeft.quant.modules`) call the same helpers. Attention under
autocast runs as :class:`minipeft.kernels.amp_attention.AmpAttention`: its four batched (B, H)
products on 16-bit operands through cuBLAS (``minipeft/kernels/gemm16.py``: CuPy's own batched
``@`` converts float16 to float32 and back and refuses bfloat16), the masked softmax in float32,
q, k, v and the probabilities saved in 16 bits. Other batched products stay float32. The LM head
(``nn.Linear.output_16bit``, set by :class:`minipeft.gpt.GPT`) runs as :class:`AmpLinearOut16` and its
16-bit logits go to :class:`minipeft.kernels.amp_cross_entropy.AmpCrossEntropy`: float32 statistics,
the logits themselves and a float32 log-sum-exp per row saved instead of probabilities, and the
gradient written in 16 bits in the padded layout this module's backward GEMMs multiply.

On the GPU a 16-bit product is real: CuPy float16 or bfloat16 arrays (bfloat16 is
``ml_dtypes.bfloat16``, the NumPy dtype CuPy uses for it), one cuBLAS GEMM on the tensor
cores with float32 accumulation whose float32 result cuBLAS writes (``gemmEx``, the fast path of
:func:`matmul_16bit`; a Linear layer's bias is added by the same GEMM, in cuBLASLt's epilogue,
:func:`matmul_16bit_bias`), and the operands saved for backward are 16-bit,
which also halves their memory. NumPy has no fast float16 GEMM and no bfloat16 GEMM, so on the
CPU the product is *emulated*: operands rounded to 16-bit values held in float32 (round to
nearest even, :func:`round_to_compute`), then a float32 product. Both give the same numbers up
to the order of the float32 sums, so the CPU tests stand for the GPU path (``tests/test_bf16.py``
compares the two on a GPU). The emulation's 16-bit logits are float32 arrays of values on the 16-bit
grid too: on NumPy, float32 logits under a 16-bit autocast are taken to be those.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from . import fast
from .backend import bfloat16_dtype, sum_rows, xp_of
from .capture import capturing
from .engine import Tensor
from .ops.linalg import Linear, MatMul, check_linear, linear

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")

_autocast: list[str] = []  # stack of active autocast dtypes (innermost last)


def check_compute_dtype(compute_dtype) -> str:
    """The name of a compute dtype (``'float32'``, ``'float16'`` or ``'bfloat16'``); raise otherwise."""
    name = compute_dtype if isinstance(compute_dtype, str) else np.dtype(compute_dtype).name
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    return name


@contextlib.contextmanager
def autocast(dtype: str = "float16", enabled: bool = True):
    """Run the float32 matrix products inside the block in ``dtype`` (see the module docstring).

    Ops record the dtype they ran in, so their backward runs in it too, also outside the block.
    """
    dtype = check_compute_dtype(dtype)
    _autocast.append(dtype if enabled else "float32")
    try:
        yield
    finally:
        _autocast.pop()


def autocast_dtype(*arrays) -> str | None:
    """The active autocast dtype if it changes a product of ``arrays`` (each float32, or already in that
    dtype: a 16-bit layer norm's output, :mod:`minipeft.amp_layernorm`), else None."""
    if not _autocast or _autocast[-1] == "float32":
        return None
    dt = _autocast[-1]
    if all(a.dtype == np.float32 or a.dtype.name == dt for a in arrays):
        return dt
    return None


def _real_16bit(a, compute_dtype: str) -> bool:
    """True where a 16-bit product runs in real 16-bit arrays: float16 or bfloat16 on a CuPy array."""
    return compute_dtype in ("float16", "bfloat16") and fast.on_gpu(a)


def device_dtype(compute_dtype: str) -> np.dtype:
    """The dtype of a real 16-bit operand: float16, or ml_dtypes' bfloat16."""
    return bfloat16_dtype() if compute_dtype == "bfloat16" else np.dtype(np.float16)


def round_to_compute(a, compute_dtype: str):
    """Round ``a`` to the values ``compute_dtype`` can hold (nearest, ties to even), kept in float32.

    The emulation's rounding. bfloat16 on NumPy is :func:`minipeft.quant.floats.round_to_bfloat16`,
    the course's rounding on the bit patterns; on CuPy a cast there and back gives the same values.
    """
    if compute_dtype == "float32":
        return a
    xp = xp_of(a)
    a32 = a.astype(xp.float32, copy=False)
    if compute_dtype == "float16":
        with np.errstate(over="ignore"):  # beyond 65504 is inf, as on the GPU; GradScaler handles it
            return a32.astype(xp.float16).astype(xp.float32)
    if fast.on_gpu(a):
        return a32.astype(bfloat16_dtype()).astype(xp.float32)
    from .quant.floats import round_to_bfloat16  # lazy: only bfloat16 needs minipeft.quant

    return round_to_bfloat16(a32)


_cupy_fp32_accumulation: set[str] = set()


def use_float32_accumulation(compute_dtype: str = "float16") -> None:
    """Make CuPy's float16 (or bfloat16) matmuls accumulate in float32 (cuBLAS ``CUBLAS_COMPUTE_32F``).

    CuPy's default compute type for 16-bit GEMMs may let cuBLAS sum in 16 bits, which loses
    about log2(k) bits over a k-long dot product; mixed precision training needs float32
    sums (Micikevicius et al. 2018, §3.3). Set once per dtype, for the process, on the first use.
    """
    if compute_dtype not in _cupy_fp32_accumulation:
        import cupy
        from cupy._core import _routines_linalg

        # a NumPy dtype, not the scalar type: CuPy recognises bfloat16 by ``dtype.name``
        cupy._core.set_compute_type(device_dtype(compute_dtype), _routines_linalg.COMPUTE_TYPE_FP32)
        _cupy_fp32_accumulation.add(compute_dtype)


@fast.dispatch
def cast_16bit(a, dtype, n: int | None = None, axis: int = -1):
    """``a`` (float32) rounded to a C-contiguous 16-bit ``dtype`` array (float16, or ml_dtypes'
    bfloat16), round to nearest even, with ``axis`` zero-padded to length ``n`` (None: as it is).

    This reference is CuPy's ``astype`` (into a zero-filled array when padded); on the GPU
    :func:`minipeft.kernels.cast16.cast_16bit_cuda` does it in one pass with the same bits, strided
    views (attention's q, k, v) included."""
    if n is None or a.shape[axis] == n:
        return a.astype(dtype, order="C")
    axis = axis % a.ndim
    out = xp_of(a).zeros(a.shape[:axis] + (n,) + a.shape[axis + 1:], dtype)
    out[(slice(None),) * axis + (slice(0, a.shape[axis]),)] = a
    return out


def to_compute(a, compute_dtype: str):
    """An operand of a 16-bit product: a float16/bfloat16 array on the GPU, else rounded float32 values."""
    if compute_dtype == "float32":
        return a
    if _real_16bit(a, compute_dtype):
        use_float32_accumulation(compute_dtype)
        dt = device_dtype(compute_dtype)
        return a if a.dtype == dt else cast_16bit(a, dt)  # round to nearest even, as the emulation
    return round_to_compute(a, compute_dtype)


def _address(a) -> int:
    return a.data.ptr if fast.on_gpu(a) else a.__array_interface__["data"][0]


def padded_parent(a, n: int):
    """The C-contiguous array (..., n) whose first ``a.shape[-1]`` columns ``a`` is a view of, or None.

    The 16-bit cross-entropy (:mod:`minipeft.kernels.amp_cross_entropy`) writes its gradient into rows
    of ``aligned(V)`` values, zeros past V, and hands on the (N, V) view: AmpLinear's backward GEMMs
    multiply the padded array itself. (Only zeros, or finite values, in the padding keep ``g W`` exact:
    they meet W's zero padding rows; dL/dW's padding rows are cut off.)"""
    base = getattr(a, "base", None)
    if base is None or a.ndim == 0 or base.dtype != a.dtype or not base.flags.c_contiguous:
        return None
    rows = math.prod(a.shape[:-1])
    if base.size != rows * n or _address(base) != _address(a):
        return None
    whole = base.reshape(a.shape[:-1] + (n,))  # (..., n)
    return whole if whole[..., :a.shape[-1]].strides == a.strides else None


def aligned(n: int) -> int:
    """``n`` rounded up to a multiple of 8: cuBLAS's fast float16 tensor-core kernels need
    dimensions divisible by 8 (GPT-2's vocabulary, 50257, is not: on an H100 its LM-head
    products took 32 ms of a 193 ms step at 32 x 512 tokens)."""
    return -(-n // 8) * 8


def to_compute_padded(a, compute_dtype: str, n: int, axis: int = -1):
    """:func:`to_compute` of ``a`` with ``axis`` zero-padded to length ``n`` (cast and copy in one pass).

    A 16-bit ``a`` that is already the leading columns of a padded array (:func:`padded_parent`: the
    16-bit cross-entropy writes its gradient so) is that array, taken as it is: no pass at all."""
    axis = axis % a.ndim
    if a.shape[axis] == n:
        return to_compute(a, compute_dtype)
    if _real_16bit(a, compute_dtype):
        use_float32_accumulation(compute_dtype)
        dt = device_dtype(compute_dtype)
        whole = padded_parent(a, n) if a.dtype == dt and axis == a.ndim - 1 else None
        return whole if whole is not None else cast_16bit(a, dt, n, axis)
    xp = xp_of(a)
    out = xp.zeros(a.shape[:axis] + (n,) + a.shape[axis + 1:], np.float32)
    out[(slice(None),) * axis + (slice(0, a.shape[axis]),)] = round_to_compute(a, compute_dtype)
    return out


def gemm(a, b, rows: int | None = None, cols: int | None = None, bias=None, out_dtype: str = "float32"):
    """``a @ b`` of two :func:`to_compute` operands with float32 accumulation, returned as the
    float32 sums (not rounded to ``compute_dtype``: see the module docstring); ``rows``/``cols``
    keep only the leading rows/columns (of a product of padded operands). ``bias`` (float32, one
    value per column of the whole product, padding included: :func:`padded_bias`) is added to
    every row before the columns are cut. ``out_dtype`` ``"float16"``/``"bfloat16"`` rounds the
    sums (plus bias) once to it, for a consumer that reads 16 bits (:class:`AmpLinearOut16`): on the
    GPU cuBLAS writes them in it, on the CPU they are :func:`round_to_compute`'d float32 values.

    Real 16-bit operands must be 2-D (:func:`gemm_2d`); they run as one cuBLAS ``gemmEx``
    (16-bit in, float32 compute and out), or with a bias as one cuBLASLt GEMM that adds it in its
    epilogue (:func:`matmul_16bit_bias`). A transposed view (``w.T``) is passed to cuBLAS as
    its buffer with the transpose flag, not copied. On the CPU the operands hold rounded
    values (the emulation) and this is a float32 ``@`` (then ``+ bias``)."""
    if a.dtype.itemsize == 2 and fast.on_gpu(a):
        if bias is None:
            y = matmul_16bit(a, b, out_dtype=np.float32 if out_dtype == "float32" else device_dtype(out_dtype))
        else:  # the bias is added to the float32 sums, then rounded (a 16-bit out_dtype)
            y = to_compute(matmul_16bit_bias(a, b, bias), out_dtype)
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # inf operands (an overflow) give inf/nan, as on the GPU
            y = a @ b if bias is None else a @ b + bias
        y = round_to_compute(y, out_dtype)  # the emulation's one rounding of the sums (float32: y itself)
    if rows is not None or cols is not None:
        y = y[..., slice(rows), slice(cols)]
        if not y.flags.c_contiguous:  # the columns of a padded product: the next ops want rows contiguous
            y = xp_of(y).ascontiguousarray(y)
    return y


@fast.dispatch
def matmul_16bit(a, b, out_dtype=np.float32):
    """``a @ b`` of two 2-D 16-bit arrays as float32 sums, returned in ``out_dtype`` (float32, or a
    16-bit dtype: the sums rounded once, to nearest even).

    This reference multiplies float32 copies (exact: a 16-bit value is a float32 value); on the
    GPU :func:`minipeft.kernels.gemm16.matmul_16bit_cuda` runs it as one cuBLAS ``gemmEx`` on the
    tensor cores (16-bit in, float32 compute, ``out_dtype`` out), the same numbers up to the order of the sums."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"a 16-bit product takes 2-D operands (use gemm_2d), got {a.shape} and {b.shape}")
    xp = xp_of(a)
    return (a.astype(xp.float32) @ b.astype(xp.float32)).astype(out_dtype, copy=False)


@fast.dispatch
def matmul_16bit_bias(a, b, bias):
    """``a @ b + bias`` of two 2-D 16-bit arrays and a float32 ``bias`` (one value per column), in float32.

    This reference adds the bias in a second pass over the product (:func:`matmul_16bit`, then
    ``+``); on the GPU :func:`minipeft.kernels.gemm16.matmul_16bit_bias_cuda` runs both as one
    cuBLASLt GEMM whose epilogue adds the bias to the float32 sums before writing them
    (``CUBLASLT_EPILOGUE_BIAS``): the same numbers up to the order of the sums, and no second
    read and write of the whole (m, n) float32 result."""
    return matmul_16bit(a, b) + bias


def padded_bias(b, n: int):
    """A bias ``b`` (out,) as the bias of a product zero-padded to ``n >= out`` columns (:func:`aligned`):
    ``b`` itself where ``out == n``, else a zero-padded copy, made at every call (n values, against
    the product's m x n; a copy kept between calls would miss the optimizer's in-place updates)."""
    if b.shape[-1] == n:
        return b
    out = xp_of(b).zeros(n, b.dtype)
    out[:b.shape[-1]] = b
    return out


def gemm_2d(a, b, cols: int | None = None, bias=None, out_dtype: str = "float32"):
    """:func:`gemm` of ``a`` (..., k) with a 2-D ``b`` (k, n) (and a ``bias`` (n,)), as one 2-D product on the GPU."""
    if a.ndim > 2 and fast.on_gpu(a):  # one GEMM, not a batch over the leading axes
        y = gemm(a.reshape(-1, a.shape[-1]), b, cols=cols, bias=bias, out_dtype=out_dtype)
        return y.reshape(a.shape[:-1] + (y.shape[-1],))
    return gemm(a, b, cols=cols, bias=bias, out_dtype=out_dtype)


# ------------------------------------------------------------ 16-bit Functions


class AmpMatMul(MatMul):
    """2-D ``a @ b`` in ``compute_dtype``: 16-bit operands, float32 sums.

    The dtype active at the forward is kept in ``ctx``, so the backward's two products run
    in it too. Batched products stay float32 (CuPy's batched ``@`` has no 16-bit path; attention
    has its own, :class:`minipeft.kernels.amp_attention.AmpAttention`).
    """

    @staticmethod
    def forward(ctx, a, b):
        na, nb = ctx.needs_input_grad
        dt = ctx.compute_dtype = autocast_dtype(a, b)
        a, b = to_compute(a, dt), to_compute(b, dt)
        ctx.save_for_backward(b if na else None, a if nb else None)  # the 16-bit operands
        return gemm(a, b)

    @staticmethod
    def backward(ctx, g):
        b, a = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        dt = ctx.compute_dtype
        g = to_compute(g, dt)
        return (gemm(g, b.T) if na else None, gemm(a.T, g) if nb else None)


class AmpLinear(Linear):
    """``y = x W^T + b`` with its three products (forward, dL/dx, dL/dW) in ``compute_dtype``.

    The 16-bit ``x`` and ``W`` are what is saved (half the bytes of float32); the bias is
    added in float32, on the GPU by the forward GEMM itself (:func:`matmul_16bit_bias`). ``W``,
    the bias and the gradient are zero-padded to a multiple of 8 output rows (tensor-core GEMMs,
    see :func:`aligned`) and the padding is cut off the results.
    """

    output_16bit = False  # AmpLinearOut16: the product written in compute_dtype, padding kept

    @classmethod
    def forward(cls, ctx, x, w, b=None):
        nx, nw = ctx.needs_input_grad[:2]
        dt = ctx.compute_dtype = autocast_dtype(x, w)
        out = ctx.out_features = w.shape[0]
        x, w = to_compute(x, dt), to_compute_padded(w, dt, aligned(out), axis=0)  # (..., in), (out8, in)
        ctx.save_for_backward(x if nw else None, w if nx else None)
        bias = None if b is None else padded_bias(b, w.shape[0])  # (out8,)
        if cls.output_16bit:  # (..., out8) in dt, x W^T + b rounded once; its (..., out) view, rows out8 apart
            return gemm_2d(x, w.T, bias=bias, out_dtype=dt)[..., :out]
        return gemm_2d(x, w.T, cols=out, bias=bias)  # (..., out) float32: x W^T + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dt, out = ctx.compute_dtype, ctx.out_features
        # the 16-bit gradient (loss scaling keeps it from underflowing), padded like W: (..., out8); the 16-bit
        # loss writes the LM head's so already, and it is taken as it is
        gc = to_compute_padded(g, dt, aligned(out))
        gx = gemm_2d(gc, w) if needs[0] else None  # (..., in) float32
        gw = gb = None
        if needs[1]:
            g2, x2 = gc.reshape(-1, gc.shape[-1]), x.reshape(-1, x.shape[-1])
            gw = gemm(g2.T, x2, rows=out)  # (out, in)
        if len(needs) > 2 and needs[2]:
            gb = sum_rows(g.reshape(-1, g.shape[-1]).astype(np.float32, copy=False))  # (out,) float32
        return (gx, gw, gb) if len(needs) > 2 else (gx, gw)


class AmpLinearOut16(AmpLinear):
    """:class:`AmpLinear` whose product is written in ``compute_dtype``: the float32 sums (plus the
    bias) rounded once, for a consumer that reads 16 bits (the LM head's logits, read by the loss).

    The result is the (..., out) view of the (..., aligned(out)) product, not a copy without the
    padding: its rows are ``aligned(out)`` values apart (the 16-bit cross-entropy reads them so). The
    backward is AmpLinear's: a gradient handed back in that padded layout is multiplied as it is
    (:func:`to_compute_padded`). On the CPU the result holds float32 values on the 16-bit grid.
    """

    output_16bit = True


def linear_output_16bit(x, weight, bias=None):
    """``F.linear`` for a layer whose output is read in 16 bits: under a 16-bit :func:`autocast`
    (float32 operands) it runs as :class:`AmpLinearOut16` and returns float16/bfloat16 values
    (rounded float32 values on the CPU); otherwise it is ``F.linear`` itself (float32 out)."""
    if autocast_dtype(*(t.data if isinstance(t, Tensor) else t for t in (x, weight))) is None:
        return linear(x, weight, bias)
    check_linear(x, weight)
    return AmpLinearOut16.apply(x, weight) if bias is None else AmpLinearOut16.apply(x, weight, bias)


def _autocast_2d(a, b) -> bool:
    return a.ndim == b.ndim == 2 and autocast_dtype(a, b) is not None


def _autocast_linear(x, w, b=None) -> bool:
    return autocast_dtype(x, w) is not None


# Other numbers by request, not the same numbers faster: MINIPEFT_KERNELS=0 leaves these on.
fast.register(MatMul, AmpMatMul, when=_autocast_2d, switch=False)
fast.register(Linear, AmpLinear, when=_autocast_linear, switch=False)


class GradScaler:
    """Dynamic loss scaling (Micikevicius et al. 2018, §3.2), with PyTorch's defaults.

    ``loss.backward(scaler.scale)`` (or ``scaler.scale_loss(loss).backward()``) starts the
    backward pass from ``S``; then ``found_inf = scaler.unscale_(params)`` divides the
    gradients by ``S`` and reports an overflow; skip the optimizer step if it did; and
    ``scaler.update(found_inf)`` picks the next ``S``: halved after an overflow, doubled after
    ``growth_interval`` steps in a row without one.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True) -> None:
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        if not growth_factor > 1 or not 0 < backoff_factor < 1:
            raise ValueError(f"need growth_factor > 1 and 0 < backoff_factor < 1, got {growth_factor}, "
                             f"{backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.enabled = enabled
        self.good_steps = 0  # steps since the last overflow (or growth)
        self.skipped_steps = 0  # optimizer steps skipped for an overflow, over the whole run

    def scale_loss(self, loss):
        """``loss * S`` (a Tensor): backpropagating it scales every gradient by ``S``.

        While a step is recorded into a CUDA graph, ``S`` is read from the device, written
        before every replay (:meth:`minipeft.capture.Recording.per_replay`).
        """
        if not self.enabled:
            return loss
        rec = capturing()
        if rec is None:
            return loss * self.scale
        return loss * rec.per_replay(lambda: [self.scale], 1).reshape(())

    def unscale_(self, params):
        """Divide every gradient by ``S`` in place; True if any is inf or nan (one device sync).

        While a step is recorded, ``1/S`` is read from the device and the verdict stays there: it
        returns the 0-d device bool and sets the recording's ``skip`` flag to it.
        """
        grads = [p.grad for p in params if getattr(p, "grad", None) is not None]
        if not self.enabled or not grads:
            return False
        rec = capturing()
        inv = 1.0 / self.scale if rec is None else rec.per_replay(lambda: [1.0 / self.scale], 1).reshape(())
        bad = None
        for g in grads:
            g *= g.dtype.type(inv) if rec is None else inv
            xp = xp_of(g)
            nf = ~xp.isfinite(g).all()
            bad = nf if bad is None else (bad | nf)
        if rec is not None:
            rec.skip = bad
            return bad
        return bool(bad)

    def update(self, found_inf: bool) -> None:
        """The next scale: ``S * backoff_factor`` after an overflow, ``S * growth_factor`` after
        ``growth_interval`` clean steps."""
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped_steps += 1
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
