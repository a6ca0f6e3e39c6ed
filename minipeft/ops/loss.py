"""Cross-entropy of logits against class indices, with ``ignore_index`` and label
smoothing (Szegedy et al. 2016, §7), as ``torch.nn.functional.cross_entropy``."""
from __future__ import annotations

from ..backend import xp_of
from ..capture import capturing  # recorded into a CUDA graph: the caller checks the targets
from ..engine import Function, Tensor
from .common import array_module
from .shape import reshape


class CrossEntropy(Function):
    """Mean cross-entropy of ``logits`` (N, V) against ``targets`` (N,).

    Rows whose target is ``ignore_index`` count for nothing. With label smoothing
    ``eps`` the target distribution is (1 - eps) one-hot + eps / V (Szegedy et al. 2016).
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing):
        xp = array_module(logits)
        n, v = logits.shape
        z = logits - logits.max(axis=-1, keepdims=True)
        lse = xp.log(xp.exp(z).sum(axis=-1, keepdims=True))
        logp = z - lse  # (N, V)
        valid = targets != ignore_index  # (N,)
        safe_t = xp.where(valid, targets, 0)
        nll = -logp[xp.arange(n), safe_t]  # (N,)
        if label_smoothing:
            nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
        count = int(valid.sum())
        ctx.count, ctx.eps, ctx.v = count, label_smoothing, v
        ctx.save_for_backward(xp.exp(logp), safe_t, valid)
        if count == 0:
            return xp.asarray(xp.nan, dtype=logits.dtype)
        return (nll * valid).sum() / logits.dtype.type(count)

    @staticmethod
    def backward(ctx, g):
        probs, t, valid = ctx.saved_tensors
        xp = xp_of(probs)
        n = probs.shape[0]
        grad = probs.copy()  # d(-log softmax[t])/dz = softmax - onehot(t)
        grad[xp.arange(n), t] -= 1 - ctx.eps
        if ctx.eps:
            grad -= ctx.eps / ctx.v
        grad *= (valid[:, None] * (g / max(ctx.count, 1))).astype(grad.dtype)
        return grad, None, None, None


def cross_entropy(logits, targets, ignore_index: int = -100, label_smoothing: float = 0.0):
    """Cross-entropy with ``ignore_index`` and label smoothing; logits (..., V), targets (...)."""
    targets = targets.data if isinstance(targets, Tensor) else targets
    xp = xp_of(logits.data)
    targets = xp.asarray(targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class indices, got dtype {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {targets.shape} != logits shape without V {logits.shape[:-1]}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    v = logits.shape[-1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))  # an index outside [0, V) would wrap
    if targets.size and capturing() is None and bool(bad.any()):
        raise ValueError(f"cross_entropy: targets must be class indices in [0, {v}) or ignore_index "
                         f"({ignore_index}); got {int(bad.sum())} outside, e.g. {int(targets[bad].reshape(-1)[0])}. "
                         f"Mark positions to skip with ignore_index, or check the tokenizer's vocabulary size")
    flat = reshape(logits, (-1, v)) if logits.ndim != 2 else logits
    return CrossEntropy.apply(flat, targets.reshape(-1), ignore_index, label_smoothing)
