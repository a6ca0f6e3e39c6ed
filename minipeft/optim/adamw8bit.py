"""8-bit AdamW: both moments stored block-wise quantized, as bitsandbytes' ``AdamW8bit``.

8-bit Optimizers via Block-wise Quantization (Dettmers et al. 2022, arXiv 2110.02861):
the optimizer state is the largest part of full fine-tuning's memory (8 bytes per
parameter for Adam's m and v in float32), so keep it in 8 bits (``state8bit.py`` holds the
block-wise machinery shared with Lion8bit):

    m: signed dynamic map   (m has either sign)            state1, absmax1
    v: unsigned dynamic map (v >= 0: twice the resolution)  state2, absmax2

One step per parameter follows bitsandbytes' CUDA kernel
(``kOptimizerStatic8bit2StateBlockwise``) in float32, with float32 hyperparameters:

    1. dequantize   m = DYN_S[state1] * absmax1[b],  v = DYN_U[state2] * absmax2[b]
    2. moments      m = b1*m + (1-b1)*g                 (the (1-b1)*g product fused: one FMA)
                    v = b2*v + ((1-b2)*g)*g             (likewise)
    3. parameter    c1 = 1 - b1^t,  c2 = sqrt(1 - b2^t)
                    p = p + (-lr*c2/c1) * m / (sqrt(v) + c2*eps)   (fresh float32 m and v)
                    p = p * (1 - lr*wd)                 decoupled decay, *after* the Adam step
    4. requantize   absmax = max|state| per block, nearest code, sign fix for m

That is Adam's update (Kingma & Ba 2015, Alg. 1, with the bias corrections folded into
the step size and eps scaled by c2: algebraically lr * m_hat / (sqrt(v_hat) + eps)) with
decoupled weight decay (Loshchilov & Hutter 2019), applied in the kernel's order. Against
bitsandbytes 0.50.2 on an H200 the states (codes and absmax) agree bit for bit; the
parameters agree to one float32 ulp plus 3e-5 of the step, because the kernel computes
b^t with the approximate ``__powf`` (``tests/optim/test_bnb_optim_fixture.py``).

State: 2 bytes per parameter plus 2 x 4 bytes per 256 (0.03125 bytes per parameter),
against 8 for 32-bit AdamW - the "75% less memory" of bitsandbytes' docs. Tensors with
fewer than ``min_8bit_size = 4096`` elements keep float32 state and take AdamW's own update
(``adamw_update``: decay before the step, as ``torch.optim.AdamW``; bitsandbytes' 32-bit
kernel decays after it, a difference of order lr^2*wd).

Where this still differs from bitsandbytes: a gradient holding NaN/inf raises ``ValueError``
(an 8-bit state cannot hold NaN); the CUDA kernel zeroes m and v of those elements and skips
their update.
"""
from __future__ import annotations

import math

from ..backend import xp_of
from ..engine import Tensor
from .core import AdamW, adamw_update
from .state8bit import MIN_8BIT_SIZE, STATE_BLOCKSIZE, Blockwise8bitState, f32, fma32

def adamw8bit_update(p, g, m, v, step: int, lr: float, betas: tuple[float, float], eps: float,
                     wd: float) -> tuple:
    """Steps 2-3 above: returns the fresh float32 ``(m, v)``; updates ``p`` in place.

    ``m`` and ``v`` are the dequantized float32 states (not modified). ``p`` may be float16
    or bfloat16: the math runs in float32 and ``p`` is rounded after the Adam step and again
    after the decay, as the kernel stores it.
    """
    xp = xp_of(p)
    b1, b2 = f32(betas[0]), f32(betas[1])
    g = g.astype(xp.float32)
    m = fma32(f32(1) - b1, g, m * b1)                                   # b1*m + (1-b1)*g
    v = fma32((f32(1) - b2) * g, g, v * b2)                             # b2*v + (1-b2)*g*g
    c1 = f32(1.0 - betas[0] ** step)                                    # bias corrections
    c2 = f32(math.sqrt(1.0 - betas[1] ** step))
    step_size = (-f32(lr) * c2) / c1
    update = m / fma32(c2, f32(eps), xp.sqrt(v))                        # m / (sqrt(v) + c2*eps)
    p[...] = fma32(update, step_size, p.astype(xp.float32)).astype(p.dtype)
    if wd > 0.0:
        p[...] = (p.astype(xp.float32) * (f32(1) - f32(lr) * f32(wd))).astype(p.dtype)
    return m, v


class AdamW8bit(Blockwise8bitState, AdamW):
    """AdamW with 8-bit block-wise quantized moments (bitsandbytes' ``AdamW8bit``).

    Defaults are bitsandbytes' (and ``torch.optim.AdamW``'s). Per-parameter state, with
    bitsandbytes' names: ``state1``/``state2`` (uint8 indices shaped like the parameter)
    and ``absmax1``/``absmax2`` (float32, one per block); a tensor with fewer than
    ``min_8bit_size`` elements keeps float32 ``state1``/``state2`` and no absmax.
    """

    _states = (("state1", True), ("state2", False))                     # m signed, v unsigned
    _array_keys = ("state1", "state2", "absmax1", "absmax2")
    _hparam_names = ("lr", "betas", "eps", "weight_decay", "min_8bit_size", "blocksize")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE,
                 blocksize: int = STATE_BLOCKSIZE):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._init_8bit(min_8bit_size, blocksize)

    def _init_state(self, p: Tensor) -> dict:
        if not self.is_8bit(p):
            st = super()._init_state(p)                                 # AdamW's float32 moments
            return {"step": 0, "state1": st["exp_avg"], "state2": st["exp_avg_sq"]}
        return self._new_8bit_state(p)

    def _update(self, name: str, p: Tensor) -> None:
        st = self._counted_state(name, p)
        hp = (st["step"], self.lr, self.betas, self.eps, self.weight_decay)
        if "absmax1" not in st:  # a small tensor: plain 32-bit AdamW
            adamw_update(p.data, p.grad, st["state1"], st["state2"], *hp)
            return
        m, v = self.dequantized_state(name)                             # 1. float32, p's shape
        fresh = adamw8bit_update(p.data, p.grad, m, v, *hp)             # 2-3. fresh float32 m, v
        self._store_8bit(st, fresh)                                     # 4. requantize
