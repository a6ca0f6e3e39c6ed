"""8-bit AdamW: both moments stored block-wise quantized, as bitsandbytes' ``AdamW8bit``.

8-bit Optimizers via Block-wise Quantization (Dettmers et al. 2022, arXiv 2110.02861,
Sec. 2): the optimizer state is the largest part of full fine-tuning's memory (8 bytes
per parameter for Adam's m and v in float32), so keep it in 8 bits. Each moment tensor
is flattened and cut into blocks of B = 256 values (bitsandbytes since v0.44; the paper
used 2048); a block stores one float32 absmax and one uint8 index per value into a
*dynamic* (tree) map, whose values span seven decades so that small moments keep their
relative precision (arXiv 1511.04561):

    m: signed dynamic map  (m has either sign)      state1 = q(m / absmax1[b])
    v: unsigned dynamic map (v >= 0: twice the       state2 = q(v / absmax2[b])
       resolution on one side)

One step per parameter (bitsandbytes' ``kOptimizerStatic8bit2StateBlockwise``):

    1. dequantize    m = DYN_S[state1] * absmax1[b],  v = DYN_U[state2] * absmax2[b]  (float32)
    2. update        AdamW on the float32 states (``adamw_update``, the very function
                     AdamW uses), the parameter from the *fresh* float32 m and v
    3. requantize    absmax = max|state| per block, nearest code (ties to the even index),
                     and for m a sign fix: if the code's sign bit differs from m's, step
                     one index towards m's sign (a tiny negative m that rounded to +0.0
                     becomes -5.5e-7, so it is not lost)

State: 2 bytes per parameter plus 2 x 4 bytes per 256 (0.03125 bytes per parameter),
against 8 for 32-bit AdamW - the "75% less memory" of bitsandbytes' docs. Tensors with
fewer than ``min_8bit_size = 4096`` elements (biases, LayerNorm gains) keep float32 state:
their memory is negligible and quantizing them costs accuracy for nothing.

Where this differs from bitsandbytes' CUDA kernel (it is algorithmically the same, not
bit-exact; bitsandbytes' own tests compare against torch's Adam with tolerances):
* weight decay ``p *= 1 - lr*wd`` is applied before the Adam step, as ``torch.optim.AdamW``
  and bitsandbytes' torch backend do; the CUDA kernel applies it after (a difference of
  order lr^2*wd per step);
* the step is ``lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`` as in AdamW; CUDA writes
  the algebraically equal ``lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + sqrt(1-b2^t)*eps)``
  with approximate ``__powf``/``__fdividef``;
* a gradient holding NaN/inf raises ``ValueError`` (an 8-bit state cannot hold NaN);
  the CUDA kernel zeroes m and v of those elements and skips their update.
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of
from ..engine import Tensor
from ..quant.blockwise import dequantize_blockwise, quantize_blockwise
from ..quant.codes import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED
from .core import AdamW, adamw_update

STATE_BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizer block size since v0.44 (2048 before)
MIN_8BIT_SIZE = 4096  # bitsandbytes: tensors with fewer elements keep 32-bit state


def _n_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _sign_fix(q, m):
    """bitsandbytes' sign fix for state1: keep the sign of m through quantization.

    Where the sign bit of ``DYN_S[q]`` differs from that of ``m``, move the index one
    step towards m's sign (+1 when m > 0, else -1), with uint8 wrap-around as in CUDA's
    ``unsigned char`` arithmetic. In practice it is a tiny negative m rounded to index 127
    (+0.0) that becomes 126 (-5.5e-7). An all-zero block (absmax 0, index 0 = -0.99 * 0)
    wraps to index 255; both dequantize to zero.
    """
    xp = xp_of(q)
    table = xp.asarray(DYNAMIC_SIGNED)
    wrong = xp.signbit(table[q]) != xp.signbit(m)
    step = xp.where(m > 0, 1, -1).astype(xp.int16)
    fixed = (q.astype(xp.int16) + step) % 256
    return xp.where(wrong, fixed, q).astype(xp.uint8)


class AdamW8bit(AdamW):
    """AdamW with 8-bit block-wise quantized moments (bitsandbytes' ``AdamW8bit``).

    Defaults are bitsandbytes' (and ``torch.optim.AdamW``'s). Per-parameter state, with
    bitsandbytes' names: ``state1``/``state2`` (uint8 indices shaped like the parameter)
    and ``absmax1``/``absmax2`` (float32, one per block); a tensor with fewer than
    ``min_8bit_size`` elements keeps float32 ``state1``/``state2`` and no absmax.
    """

    _array_keys = ("state1", "state2", "absmax1", "absmax2")
    _hparam_names = ("lr", "betas", "eps", "weight_decay", "min_8bit_size", "blocksize")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE,
                 blocksize: int = STATE_BLOCKSIZE):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, (int, np.integer)) \
                or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0 (elements), got {min_8bit_size!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) \
                or not (32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
            raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r} "
                             f"(bitsandbytes uses {STATE_BLOCKSIZE})")
        self.min_8bit_size, self.blocksize = int(min_8bit_size), int(blocksize)

    def is_8bit(self, p: Tensor) -> bool:
        """True when ``p`` gets 8-bit state (it has at least ``min_8bit_size`` elements)."""
        return p.data.size >= self.min_8bit_size

    def _init_state(self, p: Tensor) -> dict:
        xp = xp_of(p.data)
        if not self.is_8bit(p):
            st = super()._init_state(p)
            return {"step": 0, "state1": st["exp_avg"], "state2": st["exp_avg_sq"]}
        nb = _n_blocks(p.data.size, self.blocksize)
        # all zeros: index 0 times absmax 0 dequantizes to (-)0, as bitsandbytes starts
        return {"step": 0,
                "state1": xp.zeros(p.shape, dtype=xp.uint8), "state2": xp.zeros(p.shape, dtype=xp.uint8),
                "absmax1": xp.zeros(nb, dtype=xp.float32), "absmax2": xp.zeros(nb, dtype=xp.float32)}

    def dequantized_state(self, name: str) -> tuple:
        """``(m, v)`` of a parameter as float32 arrays shaped like it (copies)."""
        st = self.state[name]
        if "absmax1" not in st:
            return st["state1"].copy(), st["state2"].copy()
        m = dequantize_blockwise(st["state1"], absmax=st["absmax1"], code=DYNAMIC_SIGNED,
                                 blocksize=self.blocksize, dtype=np.float32)
        v = dequantize_blockwise(st["state2"], absmax=st["absmax2"], code=DYNAMIC_UNSIGNED,
                                 blocksize=self.blocksize, dtype=np.float32)
        return m, v

    def _update(self, name: str, p: Tensor) -> None:
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = self._init_state(p)
        st["step"] += 1
        hp = (st["step"], self.lr, self.betas, self.eps, self.weight_decay)
        if "absmax1" not in st:  # a small tensor: plain 32-bit AdamW
            adamw_update(p.data, p.grad, st["state1"], st["state2"], *hp)
            return
        xp = xp_of(p.grad)
        if not bool(xp.isfinite(p.grad).all()):
            st["step"] -= 1
            raise ValueError(f"gradient of {name} holds NaN/inf: 8-bit optimizer state cannot store it "
                             "(bitsandbytes would zero those moments and skip the update); find where it "
                             "comes from, or clip/skip the step before calling AdamW8bit.step()")
        m, v = self.dequantized_state(name)                              # 1. float32, p's shape
        adamw_update(p.data, p.grad, m, v, *hp)                          # 2. fresh float32 states
        q1, s1 = quantize_blockwise(m, DYNAMIC_SIGNED, blocksize=self.blocksize)   # 3. requantize
        q2, s2 = quantize_blockwise(v, DYNAMIC_UNSIGNED, blocksize=self.blocksize)
        st["state1"][...] = _sign_fix(q1, m)
        st["state2"][...] = q2
        st["absmax1"][...] = s1.absmax
        st["absmax2"][...] = s2.absmax

    def state_bytes(self) -> int:
        """Bytes of state actually held: uint8 indices + float32 absmax (+ 32-bit small tensors).

        For a tensor of n >= ``min_8bit_size`` elements that is ``2n + 8*ceil(n/256)``.
        """
        return super().state_bytes()

    # ---- saving
    def _state_shape(self, key: str, p: Tensor, hparams: dict) -> tuple:
        if key.startswith("absmax"):
            return (_n_blocks(p.data.size, int(hparams.get("blocksize", self.blocksize))),)
        return tuple(p.shape)

    def check_state_dict(self, sd: dict) -> None:
        """As :meth:`Optimizer.check_state_dict`, plus each entry's 8-bit/32-bit layout."""
        super().check_state_dict(sd)
        problems = []
        for name, st in sd.get("state", {}).items():
            missing = [k for k in ("state1", "state2") if k not in st]
            if missing:
                problems.append(f"{name}: no {missing}")
                continue
            eight = "absmax1" in st or "absmax2" in st
            if eight and not ("absmax1" in st and "absmax2" in st):
                problems.append(f"{name}: 8-bit state needs both absmax1 and absmax2")
            for k in ("state1", "state2"):
                dt = np.dtype(st[k].dtype)
                if eight and dt != np.uint8:
                    problems.append(f"{name}.{k}: 8-bit state must be uint8 indices, got {dt}")
                if not eight and dt.kind != "f":
                    problems.append(f"{name}.{k}: 32-bit state (no absmax saved) must be float, got {dt}")
        if problems:
            raise ValueError("optimizer load_state_dict failed (optimizer unchanged):\n  " + "\n  ".join(problems))
