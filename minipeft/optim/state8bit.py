"""8-bit block-wise optimizer state, shared by AdamW8bit and Lion8bit (bitsandbytes' layout).

8-bit Optimizers via Block-wise Quantization (Dettmers et al. 2022, arXiv 2110.02861,
Sec. 2): each state tensor is flattened and cut into blocks of B = 256 values
(bitsandbytes since v0.44; the paper used 2048); a block stores one float32 absmax and
one uint8 index per value into a *dynamic* (tree) map, whose values span seven decades so
that small states keep their relative precision (arXiv 1511.04561):

    a signed state (a momentum m)      state<i> = q_S(x / absmax<i>[b])   DYN_S: index 127 = 0.0
    a non-negative state (Adam's v)    state<i> = q_U(x / absmax<i>[b])   DYN_U: twice the resolution

One step of bitsandbytes' ``kOptimizerStatic8bit{1,2}StateBlockwise`` kernels:

    1. dequantize   x = DYN[state<i>] * absmax<i>[b]            (float32)
    2. update       the optimizer's rule on those float32 values; the parameter is
                    updated from the *fresh* float32 states, not the requantized ones
    3. requantize   absmax<i>[b] = max|x| over the block, then the nearest code to
                    x * (1/absmax) (ties to the even index); for a signed state a sign fix:
                    if the code's sign bit differs from x's, step one index towards x's sign

Tensors with fewer than ``min_8bit_size = 4096`` elements keep float32 state (biases,
LayerNorm gains: negligible memory, and quantizing them costs accuracy for nothing).

``fma32`` is here because bitsandbytes' CUDA kernels are compiled with ``--use_fast_math``,
which contracts ``a*b + c`` into one fused multiply-add (one rounding instead of two). The
state updates use it where the kernel does, which makes minipeft's states equal
bitsandbytes' bit for bit (``tests/optim/test_bnb_optim_fixture.py``). Two kernel details are
not reproduced, and neither changed a code or absmax in the fixture: the kernel scales by
``__fdividef(x, absmax)`` (x times an approximate reciprocal; here the exactly rounded
reciprocal of ``quantize_blockwise``), and in a partial last block it counts the padding
elements (loaded as code 128 = 5.5e-7) in the new absmax, which matters only if every real
value of that block is below 5.5e-7 of the block's previous absmax.
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of
from ..engine import Tensor
from ..quant.blockwise import dequantize_blockwise, quantize_blockwise
from ..quant.codes import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED

STATE_BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizer block size since v0.44 (2048 before)
MIN_8BIT_SIZE = 4096  # bitsandbytes: tensors with fewer elements keep 32-bit state


def n_blocks(n: int, blocksize: int) -> int:
    """Blocks of ``blocksize`` that hold ``n`` values (the last one may be partial)."""
    return -(-n // blocksize)


def f32(x) -> np.float32:
    """A hyperparameter as the float32 the CUDA kernel receives (``1 - b1`` is then float32 too)."""
    return np.float32(x)


def fma32(a, b, c):
    """float32 ``a*b + c`` with one rounding, as a CUDA fused multiply-add.

    The product of two float32 numbers is exact in float64 (24 + 24 significant bits <= 53);
    the float64 sum is then rounded once more to float32. That double rounding differs from a
    true FMA only when the float64 sum sits exactly on a float32 halfway point, about 1 in
    2^28 operations.
    """
    xp = next(xp_of(x) for x in (a, b, c) if getattr(x, "ndim", 0) > 0)  # at least one is an array
    return (xp.asarray(a, dtype=xp.float64) * xp.asarray(b, dtype=xp.float64)
            + xp.asarray(c, dtype=xp.float64)).astype(xp.float32)


def sign_fix(q, x):
    """bitsandbytes' sign fix for a signed state: keep the sign of ``x`` through quantization.

    Where the sign bit of ``DYN_S[q]`` differs from that of ``x``, move the index one step
    towards x's sign (+1 when x > 0, else -1), with uint8 wrap-around as in CUDA's ``unsigned
    char`` arithmetic. In practice a tiny negative x rounded to index 127 (+0.0) becomes 126
    (-5.5e-7). An all-zero block (absmax 0, index 0 = -0.99 * 0) wraps to index 255; both
    dequantize to zero.
    """
    xp = xp_of(q)
    table = xp.asarray(DYNAMIC_SIGNED)
    wrong = xp.signbit(table[q]) != xp.signbit(x)
    step = xp.where(x > 0, 1, -1).astype(xp.int16)
    fixed = (q.astype(xp.int16) + step) % 256
    return xp.where(wrong, fixed, q).astype(xp.uint8)


def quantize_state(x, signed: bool, blocksize: int):
    """float32 state -> ``(uint8 codes shaped like x, float32 absmax (n_blocks,))``, step 3 above."""
    code = DYNAMIC_SIGNED if signed else DYNAMIC_UNSIGNED
    q, qs = quantize_blockwise(x, code, blocksize=blocksize)
    return (sign_fix(q, x) if signed else q), qs.absmax


def dequantize_state(codes, absmax, signed: bool, blocksize: int):
    """uint8 codes and absmax -> float32 state shaped like the codes, step 1 above."""
    code = DYNAMIC_SIGNED if signed else DYNAMIC_UNSIGNED
    return dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=blocksize, dtype=np.float32)


class Blockwise8bitState:
    """Mixin: an optimizer's states ``state1``(, ``state2``) kept 8-bit block-wise, as bitsandbytes.

    The optimizer class lists its states in ``_states`` as ``(name, signed)`` pairs; its
    32-bit parent provides the float32 update. Per parameter, with bitsandbytes' names:
    ``state<i>`` (uint8 indices shaped like the parameter) and ``absmax<i>`` (float32, one per
    block); a tensor with fewer than ``min_8bit_size`` elements keeps float32 ``state<i>`` and
    no absmax.
    """

    _states: tuple[tuple[str, bool], ...] = ()  # (state name, signed map?) per state

    def _init_8bit(self, min_8bit_size, blocksize) -> None:
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, (int, np.integer)) \
                or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0 (elements), got {min_8bit_size!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) \
                or not (32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
            raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r} "
                             f"(bitsandbytes uses {STATE_BLOCKSIZE})")
        self.min_8bit_size, self.blocksize = int(min_8bit_size), int(blocksize)

    @staticmethod
    def _absmax_key(name: str) -> str:
        return "absmax" + name[len("state"):]                           # state1 -> absmax1

    def is_8bit(self, p: Tensor) -> bool:
        """True when ``p`` gets 8-bit state (it has at least ``min_8bit_size`` elements)."""
        return p.data.size >= self.min_8bit_size

    def _new_8bit_state(self, p: Tensor) -> dict:
        """All zeros: index 0 times absmax 0 dequantizes to (-)0, as bitsandbytes starts."""
        xp = xp_of(p.data)
        nb = n_blocks(p.data.size, self.blocksize)
        st = {"step": 0}
        for name, _ in self._states:
            st[name] = xp.zeros(p.shape, dtype=xp.uint8)
            st[self._absmax_key(name)] = xp.zeros(nb, dtype=xp.float32)
        return st

    def dequantized_state(self, name: str) -> tuple:
        """The states of parameter ``name`` as float32 arrays shaped like it (copies)."""
        return self._dequantized(self.state[name])

    def _dequantized(self, st: dict) -> tuple:
        """The float32 states of one parameter's state entry ``st`` (8-bit or 32-bit), as copies."""
        if self._absmax_key(self._states[0][0]) not in st:
            return tuple(st[k].copy() for k, _ in self._states)
        return tuple(dequantize_state(st[k], st[self._absmax_key(k)], signed, self.blocksize)
                     for k, signed in self._states)

    def _store_8bit(self, st: dict, fresh) -> None:
        """Requantize the fresh float32 states into ``st`` in place (step 3)."""
        for (k, signed), x in zip(self._states, fresh):
            st[k][...], st[self._absmax_key(k)][...] = quantize_state(x, signed, self.blocksize)

    def _counted_state(self, name: str, p: Tensor) -> dict:
        """Parameter ``name``'s state (made on first use), its gradient checked if the state is 8-bit,
        then its step counted: the start of every 8-bit optimizer's ``_update``."""
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = self._init_state(p)
        if self._absmax_key(self._states[0][0]) in st:
            self._check_finite(name, p.grad)
        st["step"] += 1
        return st

    def _check_finite(self, name: str, g) -> None:
        """Refuse a gradient of an 8-bit state holding NaN/inf (before the step counts or anything moves)."""
        xp = xp_of(g)
        if not bool(xp.isfinite(g).all()):
            raise ValueError(f"gradient of {name} holds NaN/inf: 8-bit optimizer state cannot store it "
                             "(bitsandbytes would zero those states and skip the update); find where it "
                             f"comes from, or clip/skip the step before calling {type(self).__name__}.step()")

    def state_bytes(self) -> int:
        """Bytes of state actually held: uint8 indices + float32 absmax (+ 32-bit small tensors).

        For a tensor of n >= ``min_8bit_size`` elements that is ``k*(n + 4*ceil(n/256))`` for
        k states (k = 2 for Adam: ``2n + 8*ceil(n/256)``).
        """
        return sum(int(a.nbytes) for st in self.state.values() for a in st.values() if hasattr(a, "nbytes"))

    # ---- saving
    def _state_shape(self, key: str, p: Tensor, hparams: dict) -> tuple:
        if key.startswith("absmax"):
            return (n_blocks(p.data.size, int(hparams.get("blocksize", self.blocksize))),)
        return tuple(p.shape)

    def check_state_dict(self, sd: dict) -> None:
        """As :meth:`Optimizer.check_state_dict`, plus each entry's 8-bit/32-bit layout."""
        super().check_state_dict(sd)
        problems = []
        names = [k for k, _ in self._states]
        absmaxes = [self._absmax_key(k) for k in names]
        for name, st in sd.get("state", {}).items():
            missing = [k for k in names if k not in st]
            if missing:
                problems.append(f"{name}: no {missing}")
                continue
            eight = any(k in st for k in absmaxes)
            if eight and not all(k in st for k in absmaxes):
                problems.append(f"{name}: 8-bit state needs all of {absmaxes}")
            for k in names:
                dt = np.dtype(st[k].dtype)
                if eight and dt != np.uint8:
                    problems.append(f"{name}.{k}: 8-bit state must be uint8 indices, got {dt}")
                if not eight and dt.kind != "f":
                    problems.append(f"{name}.{k}: 32-bit state (no absmax saved) must be float, got {dt}")
        if problems:
            raise ValueError("optimizer load_state_dict failed (optimizer unchanged):\n  " + "\n  ".join(problems))
