"""DoRA: weight-decomposed low-rank adaptation (Liu et al., arXiv 2402.09353; peft ``tuners/lora/dora.py``).

DoRA splits the adapted weight into a magnitude and a direction (eq. 5)::

    W' = m · (W0 + s B A) / ||W0 + s B A||        norms per output row, m (out,) trainable

with LoRA's B A for the direction and ``m`` initialized to ``||W0||`` per row (B = 0 at
init, so W' = W0). As in §4.3 and peft, the norm n = ||W0 + s B A|| is treated as a
constant in backward (no gradient flows through it), which saves memory. Computed
without forming W' (peft's ``DoraLinearLayer.forward``)::

    y = W0 x + b + (m/n - 1) * (W0 x) + (m/n) * s * B A x

It is a LoRA option (``LoraConfig(use_dora=True)``): ``LoraLayer`` holds the magnitude
at ``lora_magnitude_vector.<adapter>`` (peft's on-disk key once the adapter name is
stripped) and calls these functions for its forward, merge and unmerge.
"""
from __future__ import annotations

from .. import functional as F
from ..backend import xp_of
from ..engine import Tensor


def weight_norm(weight, lora_weight, scaling: float):
    """``||W0 + s·B·A||`` per output row, shape (out,), from arrays W0 (out, in) and B A (out, in)."""
    xp = xp_of(weight)
    return xp.sqrt(((weight + scaling * lora_weight) ** 2).sum(axis=1))


def forward(layer, adapter: str, x_dropped: Tensor, lora: Tensor, base_result: Tensor) -> Tensor:
    """What DoRA adds to the base output: ``(m/n - 1) * W0 x + (m/n) * s * B A x``, shape (..., out).

    ``lora`` is ``B A dropout(x)`` (unscaled). With dropout active, W0 x is recomputed on
    the dropped-out input, as peft does; otherwise it is the base output minus its bias.
    """
    norm = layer.dora_weight_norm(adapter)  # (out,) constant
    scale = layer.lora_magnitude_vector[adapter] / norm  # (out,) m / n, gradient to m only
    if layer.lora_dropout[adapter].p > 0.0 and layer.training:
        base = F.linear(x_dropped, Tensor(layer.base_weight()))  # W0 dropout(x)
    else:
        bias = getattr(layer.base_layer, "bias", None)
        base = base_result - bias if bias is not None else base_result  # W0 x
    return (scale - 1.0) * base + scale * lora * layer.scaling[adapter]


def merged_weight(weight, delta, magnitude):
    """``(m / n) · (W0 + ΔW)`` and the norm n it used (keep it to unmerge), from arrays."""
    xp = xp_of(weight)
    norm = xp.sqrt(((weight + delta) ** 2).sum(axis=1))  # (out,)
    factor = magnitude / norm
    return factor[:, None] * (weight + delta), norm


def unmerged_weight(weight, delta, magnitude, norm):
    """Inverse of ``merged_weight`` given the norm it returned: W0 = W' · n / m - ΔW."""
    factor = magnitude / norm
    return weight / factor[:, None] - delta


__all__ = ["weight_norm", "forward", "merged_weight", "unmerged_weight"]
