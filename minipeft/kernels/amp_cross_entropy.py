"""Cross-entropy of 16-bit logits with float32 statistics: the LM head's loss under ``amp.autocast``.

Under a 16-bit autocast the LM head writes its logits in the compute dtype (as torch.autocast's
linear does: :class:`minipeft.amp.AmpLinearOut16`, asked for by ``nn.Linear.output_16bit``), and
this loss widens each value as it reads it and does all of its arithmetic in float32 (Micikevicius
et al. 2018, §3.3: reductions in float32; torch's cross_entropy upcasts 16-bit logits the same way).
Per row of x = float32(logits) (N, V), target t, label smoothing eps (Szegedy et al. 2016, §7)::

    M   = max_j x_j                                          (N,)
    lse = M + log sum_j exp(x_j - M)                         (N,) float32: saved
    nll = lse - x_t        or, smoothed,  (1 - eps)(lse - x_t) - eps (mean_j x_j - lse)
    loss = sum_valid nll / count                             (count: rows whose target is not ignore_index)
  backward, dL/dloss = g:
    p    = exp(x - lse)                                      recomputed from the saved logits
    grad = (p - (1 - eps) onehot(t) - eps / V) * valid * g / max(count, 1)    -> rounded to 16 bits

The same formulas as the float32 loss (:class:`minipeft.ops.loss.CrossEntropy`, with log p = x - lse).
What is saved differs: the 16-bit logits themselves (already in memory: the LM head's output), lse,
the safe targets and the valid mask, 2 N V + 13 N bytes, instead of the float32 loss's probabilities
(4 N V); p is recomputed in the backward. The gradient is written in the layout AmpLinear's backward
multiplies: rows of ``aligned(V)`` values (a multiple of 8: tensor-core GEMMs), zeros past V, handed
on as the (N, V) view (:func:`minipeft.amp.to_compute_padded` takes the padded array as it is), so
nothing passes over (N, V) again before the LM head's two backward GEMMs. The count of valid rows
stays an array (on the GPU: no wait for the host, so a CUDA graph can record the step).

Two ways to run the same arithmetic, chosen per call (as :mod:`minipeft.kernels.amp_attention`):

* **kernels** (float16 / bfloat16 CuPy logits, kernels on): ``cross_entropy.cu``'s 16-bit entry
  points, one pass over the logits forward and one backward;
* **the twin** (NumPy, or CuPy with ``MINIPEFT_KERNELS=0``): the formulas above in array code. On
  NumPy the logits are float32 arrays of values on the 16-bit grid (the emulation,
  :func:`minipeft.amp.round_to_compute`) and the gradient is rounded to that grid; NumPy has no
  16-bit array to tell such logits from float32 ones, so float32 logits under a 16-bit autocast are
  taken to be the emulated LM head's (its gradient is rounded to the grid: AmpLinear's backward
  rounds it so anyway).
"""
from __future__ import annotations

import numpy as np

from ..amp import aligned, autocast_dtype, round_to_compute
from ..backend import xp_of
from ..fast import enabled, on_gpu
from ..ops.loss import CrossEntropy
from . import cross_entropy


def is_16bit(a) -> bool:
    """A float16 or bfloat16 (ml_dtypes') array."""
    return a.dtype == np.float16 or a.dtype.name == "bfloat16"


def uses_kernels(logits) -> bool:
    """True where the loss runs ``cross_entropy.cu``'s 16-bit kernels: 16-bit CuPy logits, kernels on."""
    return on_gpu(logits) and is_16bit(logits) and enabled()


def cross_entropy16_forward(logits, targets, ignore_index: int, label_smoothing: float):
    """The twin of the forward kernel: ``(loss, lse, safe_t, valid, count)`` for logits (N, V)."""
    xp = xp_of(logits)
    n, v = logits.shape
    eps = label_smoothing
    x = logits.astype(xp.float32, copy=False)  # (N, V): 16-bit values widened (exact)
    m = x.max(axis=-1)  # (N,)
    lse = m + xp.log(xp.exp(x - m[:, None]).sum(axis=-1))  # (N,) float32
    valid = targets != ignore_index  # (N,)
    safe_t = xp.where(valid, targets, 0)
    nll = lse - x[xp.arange(n), safe_t]  # (N,) -log p_t
    if eps:
        nll = (1 - eps) * nll - eps * (x.mean(axis=-1) - lse)  # - eps mean_j log p_j
    count = valid.sum()  # stays an array (0-d): no wait for the host
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 = NaN when no row counts, as the reference
        loss = (nll * valid).sum() / count.astype(xp.float32)
    return loss, lse, safe_t, valid, count


def cross_entropy16_backward(g, logits, lse, safe_t, valid, count, label_smoothing: float, compute_dtype: str):
    """The twin of the backward kernel: dL/dlogits (N, V) rounded to ``compute_dtype``, the view of an
    (N, aligned(V)) array of the logits' dtype whose columns past V hold zeros."""
    xp = xp_of(logits)
    n, v = logits.shape
    eps = label_smoothing
    grad = xp.exp(logits.astype(xp.float32) - lse[:, None])  # (N, V) p = softmax(x), recomputed
    grad[xp.arange(n), safe_t] -= 1 - eps  # d(-log p_t)/dx = p - onehot(t)
    if eps:
        grad -= eps / v
    scale = xp.asarray(g, xp.float32) / xp.maximum(count, 1).astype(xp.float32)  # g / max(count, 1), 0-d
    grad *= valid[:, None] * scale
    out = xp.zeros((n, aligned(v)), logits.dtype)  # (N, V8): the layout of AmpLinear's backward GEMMs
    out[:, :v] = round_to_compute(grad, compute_dtype)  # one rounding to the 16-bit grid
    return out[:, :v]  # (N, V)


class AmpCrossEntropy(CrossEntropy):
    """:class:`~minipeft.ops.loss.CrossEntropy` of 16-bit logits, float32 statistics (module docstring).

    Saves the logits, lse (N,) float32, the safe targets and the valid mask; the float32 loss is a 0-d
    array; the gradient comes back in the logits' dtype (on NumPy: float32 on the 16-bit grid).
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing):
        # the grid of the gradient: the logits' own 16-bit dtype, or (NumPy) the active autocast's
        ctx.compute_dtype = logits.dtype.name if is_16bit(logits) else autocast_dtype()
        ctx.kernel, ctx.eps = uses_kernels(logits), label_smoothing
        if ctx.kernel:
            loss, logits, lse, safe_t, valid, count = cross_entropy.cross_entropy16_forward(
                logits, targets, ignore_index, label_smoothing)
        else:
            loss, lse, safe_t, valid, count = cross_entropy16_forward(logits, targets, ignore_index, label_smoothing)
        ctx.count = count
        ctx.save_for_backward(logits, lse, safe_t, valid)
        return loss

    @staticmethod
    def backward(ctx, g):
        logits, lse, safe_t, valid = ctx.saved_tensors
        if ctx.kernel:
            grad = cross_entropy.cross_entropy16_backward(g, logits, lse, safe_t, valid, ctx.count, ctx.eps,
                                                          aligned(logits.shape[1]))
        else:
            grad = cross_entropy16_backward(g, logits, lse, safe_t, valid, ctx.count, ctx.eps, ctx.compute_dtype)
        return grad, None, None, None


def amp_cross_entropy_applies(logits, targets, ignore_index, label_smoothing) -> bool:
    """16-bit CuPy logits (the LM head's under autocast, also when the loss is taken after the block), or
    float32 NumPy logits under a 16-bit autocast (the emulation's: see the module docstring)."""
    if on_gpu(logits):
        return logits.ndim == 2 and is_16bit(logits)
    return logits.dtype == np.float32 and autocast_dtype() is not None  # no arrays: the active 16-bit dtype
