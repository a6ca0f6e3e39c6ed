"""Lion and Lion8bit: the sign of an interpolated momentum, as bitsandbytes' ``Lion``/``Lion8bit``.

Symbolic Discovery of Optimization Algorithms (Chen et al. 2023, arXiv 2302.06675,
Alg. 2, "EvoLved Sign Momentum"): one state, the momentum m, and an update of fixed size
lr in every coordinate::

    c = b1*m + (1-b1)*g                 interpolate momentum and gradient
    p <- p*(1 - lr*wd) - lr*sign(c)      decoupled weight decay, then the sign step
    m <- b2*m + (1-b2)*g                 the momentum tracks g with the slower b2

sign(0) = 0 (``torch.sign``, bitsandbytes' ``sgn``): a coordinate whose c is exactly zero
does not move. Defaults are bitsandbytes': lr 1e-4, betas (0.9, 0.99), weight decay 0 (the
paper advises an lr 3-10x smaller than AdamW's and a weight decay 3-10x larger).

Memory: one state instead of Adam's two, 4 bytes per parameter; Lion8bit keeps m 8-bit
block-wise in the signed dynamic map (``state8bit.py``, as AdamW8bit's m): 1 byte plus 4
per 256, tensors below ``min_8bit_size = 4096`` elements keeping float32 m.

Both follow bitsandbytes' CUDA kernels in float32 with float32 hyperparameters, including
where ``--use_fast_math`` fuses a multiply into the add (``fma32``); the two kernels fuse
different products, so the two update functions differ in that detail. Against
bitsandbytes 0.50.2 on an H200, parameters and states agree bit for bit
(``tests/optim/test_bnb_optim_fixture.py``). A gradient holding NaN/inf raises
``ValueError`` in Lion8bit (an 8-bit state cannot hold it).
"""
from __future__ import annotations

import math

from ..backend import xp_of
from ..engine import Tensor
from .core import Optimizer
from .state8bit import MIN_8BIT_SIZE, STATE_BLOCKSIZE, Blockwise8bitState, f32, fma32


def lion_update(p, g, m, lr: float, betas: tuple[float, float], wd: float) -> None:
    """One Lion step in place on ``p`` and the float32 momentum ``m`` (``kOptimizer32bit1State``).

    The kernel keeps the decayed parameter in a register, so decay and sign step are one
    FMA: ``p = fma(p, 1 - lr*wd, -lr*sign(c))``.
    """
    xp = xp_of(p)
    b1, b2 = f32(betas[0]), f32(betas[1])
    g = g.astype(xp.float32)
    c = fma32(m, b1, (f32(1) - b1) * g)                                 # b1*m + (1-b1)*g
    decay = f32(1) - f32(lr) * f32(wd) if wd > 0.0 else f32(1)
    p[...] = fma32(p.astype(xp.float32), decay, -f32(lr) * xp.sign(c)).astype(p.dtype)
    m[...] = fma32(m, b2, (f32(1) - b2) * g)                            # b2*m + (1-b2)*g


def lion8bit_update(p, g, m, lr: float, betas: tuple[float, float], wd: float):
    """One Lion step on the dequantized float32 ``m`` (``kOptimizerStatic8bit1StateBlockwise``).

    Updates ``p`` in place and returns the fresh float32 momentum (``m`` is not modified).
    Here the decayed parameter is stored (rounded to p's dtype) before the sign step.
    """
    xp = xp_of(p)
    b1, b2 = f32(betas[0]), f32(betas[1])
    g = g.astype(xp.float32)
    if wd > 0.0:
        p[...] = (p.astype(xp.float32) * (f32(1) - f32(lr) * f32(wd))).astype(p.dtype)
    c = fma32(f32(1) - b1, g, m * b1)                                   # b1*m + (1-b1)*g
    fresh = fma32(f32(1) - b2, g, m * b2)                               # b2*m + (1-b2)*g
    p[...] = (p.astype(xp.float32) - f32(lr) * xp.sign(c)).astype(p.dtype)
    return fresh


class Lion(Optimizer):
    """Lion with a float32 momentum ``state1`` (bitsandbytes' name) per parameter."""

    _array_keys = ("state1",)
    _hparam_names = ("lr", "betas", "weight_decay")

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.weight_decay = float(weight_decay)

    def _init_state(self, p: Tensor) -> dict:
        xp = xp_of(p.data)
        return {"step": 0, "state1": xp.zeros(p.shape, dtype=xp.float32)}

    def _update(self, name: str, p: Tensor) -> None:
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = self._init_state(p)
        st["step"] += 1
        lion_update(p.data, p.grad, st["state1"], self.lr, self.betas, self.weight_decay)


class Lion8bit(Blockwise8bitState, Lion):
    """Lion with its momentum 8-bit block-wise quantized (bitsandbytes' ``Lion8bit``).

    Per parameter: ``state1`` (uint8 indices into the signed dynamic map, shaped like the
    parameter) and ``absmax1`` (float32, one per block); a tensor with fewer than
    ``min_8bit_size`` elements keeps a float32 ``state1`` and takes :func:`lion_update`, as
    bitsandbytes sends it to its 32-bit kernel.
    """

    _states = (("state1", True),)                                       # m: signed map
    _array_keys = ("state1", "absmax1")
    _hparam_names = ("lr", "betas", "weight_decay", "min_8bit_size", "blocksize")

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, min_8bit_size: int = MIN_8BIT_SIZE,
                 blocksize: int = STATE_BLOCKSIZE):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)
        self._init_8bit(min_8bit_size, blocksize)

    def _init_state(self, p: Tensor) -> dict:
        return self._new_8bit_state(p) if self.is_8bit(p) else super()._init_state(p)

    def _update(self, name: str, p: Tensor) -> None:
        st = self._counted_state(name, p)
        if "absmax1" not in st:  # a small tensor: 32-bit Lion
            lion_update(p.data, p.grad, st["state1"], self.lr, self.betas, self.weight_decay)
            return
        (m,) = self.dequantized_state(name)                             # float32, p's shape
        fresh = lion8bit_update(p.data, p.grad, m, self.lr, self.betas, self.weight_decay)
        self._store_8bit(st, (fresh,))                                  # requantize
