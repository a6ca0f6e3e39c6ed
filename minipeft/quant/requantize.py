"""Storing a new float weight in a quantized layer: what merging an adapter into it does.

QLoRA's base is frozen in NF4 (Dettmers et al. 2023, arXiv 2305.14314); an adapter cannot
be added to 4-bit codes. peft's bitsandbytes layers (``peft/tuners/lora/bnb.py``) merge by

    W = dequantize(codes);  W' = W + s·B·A;  codes' = quantize(W')     (unmerge: W' = W - s·B·A)

with the layer's own quantization settings. The stored weight is then ``W'`` rounded to the
code book, not ``W'``: this module measures that rounding. A layer says how it quantizes
(``_quantize(weight) -> state``), dequantizes (``_dequantize_from(*state)``) and stores
(``_store(*state)``); ``Linear4bit`` and ``Linear8bitLt`` of ``quant/modules.py`` do.
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of


def checked_weight(layer, weight):
    """``weight`` as an array of the layer's device, checked: shape (out, in), float, finite."""
    xp = xp_of(layer.weight.data)
    w = xp.asarray(weight)
    layer._check_shape(w.shape)
    if not xp.issubdtype(w.dtype, xp.floating):
        raise TypeError(f"{type(layer).__name__}: a weight to quantize must be a float array, got {w.dtype}")
    if not bool(xp.isfinite(w).all()):
        raise ValueError(f"{type(layer).__name__}: the weight to quantize holds NaN or inf; nothing was stored "
                         "(merging a broken adapter? merge(safe_merge=True) checks before quantizing)")
    return w


def _max_abs_change(stored, weight) -> float:
    """max |stored - weight| in float32 (0 for an empty weight)."""
    return float(abs(stored - weight.astype(np.float32)).max()) if weight.size else 0.0


def requantize(layer, weight) -> float:
    """Quantize ``weight`` (out, in) with ``layer``'s settings and store it there.

    Returns max |dequantize(stored) - weight|: the rounding the store cost (what a merge
    into a 4-bit or 8-bit base loses against the exact sum ``W + s·B·A``).
    """
    state = layer._quantize(weight)
    layer._store(*state)
    return _max_abs_change(layer.dequantize(np.float32), weight)


def requantization_error(layer, weight) -> float:
    """max |dequantize(quantize(weight)) - weight| with ``layer``'s settings; stores nothing."""
    state = layer._quantize(weight)
    return _max_abs_change(layer._dequantize_from(*state), weight)


__all__ = ["checked_weight", "requantize", "requantization_error"]
