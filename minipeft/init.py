"""Weight initializations, as ``torch.nn.init`` names them: NumPy draws from an explicit Generator.

Used through ``minipeft.nn.init`` (``from minipeft.nn import init``). Every function
returns a float64 NumPy array; the caller casts it to the weight's dtype and device
(``nn.Parameter.from_numpy``), so the same seed gives the same weights on CPU and GPU.
"""
from __future__ import annotations

import math

import numpy as np


def kaiming_uniform(rng: np.random.Generator, shape: tuple[int, int], a: float = math.sqrt(5)) -> np.ndarray:
    """torch's ``kaiming_uniform_(w, a)`` for a 2-D weight (He et al., arXiv 1502.01852, eq. 16).

    U(-bound, bound) with bound = gain·sqrt(3/fan_in), gain = sqrt(2/(1 + a²)) and
    fan_in = shape[1]. With a = sqrt(5) (``nn.Linear``'s default, LoRA's A) the bound is
    1/sqrt(fan_in); with a = 0 (ReLU gain, VeRA's shared projections) it is sqrt(6/fan_in).
    """
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = gain * math.sqrt(3.0 / shape[1])
    return rng.uniform(-bound, bound, shape)


def trunc_normal(rng: np.random.Generator, shape, std: float, cut: float = 2.0) -> np.ndarray:
    """N(0, std²) truncated at ±cut·std, by redrawing the values outside (Houlsby et al., arXiv 1902.00751, §3.6)."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > cut
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > cut
    return out * std


__all__ = ["kaiming_uniform", "trunc_normal"]
