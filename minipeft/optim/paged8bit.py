"""Paged 8-bit AdamW: AdamW8bit's uint8 states and absmax, paged like PagedAdamW's moments.

bitsandbytes' ``PagedAdamW8bit`` is ``AdamW8bit`` (the same CUDA kernel, the same numbers)
whose states - uint8 codes and float32 absmax - sit in CUDA unified memory when a tensor
has at least 1e5 elements, prefetched to the GPU before each parameter's update and
evicted by the driver only under memory pressure (QLoRA, Dettmers et al. 2023, arXiv
2305.14314, Sec. 3, "Paged Optimizers"; 8-bit states: arXiv 2110.02861).

Here the paging is ``PagedAdamW``'s, explicit and counted (``paged.py`` explains the sweep,
the LRU eviction and the budget): a parameter's state lives on the host as flat arrays and
page j holds its elements ``[j*P, (j+1)*P)``. For an 8-bit parameter a page is four pieces:

    state1[a:b], state2[a:b]                 uint8 codes of m and v     (P bytes each)
    absmax1[a/B : b/B], absmax2[a/B : b/B]   float32, one per block     (4P/B bytes each)

``page_size`` must be a multiple of the block size B (256), so every page holds whole
blocks: dequantize, update (``adamw8bit_update``) and requantize are per block, and the
paged result is bit-identical to :class:`AdamW8bit`. A page therefore takes
``2P + 8P/256`` bytes instead of PagedAdamW's ``8P``. Tensors below ``min_8bit_size``
keep float32 m and v (``state1``/``state2``), paged as PagedAdamW pages them, and updated by
``adamw_update`` as AdamW8bit does. Every tensor is paged, whatever its size.
"""
from __future__ import annotations

import numpy as np

from ..engine import Tensor
from .adamw8bit import AdamW8bit, adamw8bit_update
from .core import adamw_update
from .paged import DEFAULT_PAGE_SIZE, PagedAdamW
from .state8bit import (MIN_8BIT_SIZE, STATE_BLOCKSIZE, Blockwise8bitState, dequantize_state, n_blocks,
                        quantize_state)


class PagedAdamW8bit(Blockwise8bitState, PagedAdamW):
    """AdamW8bit whose states live on the host and are paged to the device for each update.

    Arguments are AdamW8bit's plus PagedAdamW's ``page_size`` (elements per page, a multiple
    of ``blocksize``) and ``device_budget_bytes``. ``state_dict()`` has AdamW8bit's layout,
    so a checkpoint moves between the two.
    """

    _states = AdamW8bit._states
    _array_keys = AdamW8bit._array_keys
    _hparam_names = AdamW8bit._hparam_names

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE,
                 blocksize: int = STATE_BLOCKSIZE, *, page_size: int = DEFAULT_PAGE_SIZE,
                 device_budget_bytes: int | None = None):
        self._init_8bit(min_8bit_size, blocksize)                       # the page layout needs them
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         page_size=page_size, device_budget_bytes=device_budget_bytes)
        if self.page_size % self.blocksize:
            raise ValueError(f"page_size={self.page_size} must be a multiple of blocksize={self.blocksize}, "
                             "so that each page holds whole blocks of the 8-bit state")

    def _host_layout(self, p: Tensor) -> list:
        n = p.data.size
        if not self.is_8bit(p):                                          # float32 m and v
            dt = self._state_dtype(p)
            return [("state1", n, dt, 1), ("state2", n, dt, 1)]
        nb, u8, f4 = n_blocks(n, self.blocksize), np.dtype(np.uint8), np.dtype(np.float32)
        return [("state1", n, u8, 1), ("state2", n, u8, 1),
                ("absmax1", nb, f4, self.blocksize), ("absmax2", nb, f4, self.blocksize)]

    def _update_page(self, name: str, p: Tensor, arrays: list, pf, gf) -> None:
        hp = (self.state[name]["step"], self.lr, self.betas, self.eps, self.weight_decay)
        if len(arrays) == 2:                                             # a small tensor
            adamw_update(pf, gf, arrays[0], arrays[1], *hp)
            return
        c1, c2, a1, a2 = arrays                                          # this page's pieces
        m = dequantize_state(c1, a1, True, self.blocksize)               # (b - a,) float32
        v = dequantize_state(c2, a2, False, self.blocksize)
        fresh_m, fresh_v = adamw8bit_update(pf, gf, m, v, *hp)
        c1[...], a1[...] = quantize_state(fresh_m, True, self.blocksize)
        c2[...], a2[...] = quantize_state(fresh_v, False, self.blocksize)

    def step(self) -> None:
        for name, p in self.named_params:                                # before any page moves
            if p.grad is not None and self.is_8bit(p):
                self._check_finite(name, p.grad)
        super().step()

    def dequantized_state(self, name: str) -> tuple:
        """``(m, v)`` of a parameter as float32 arrays shaped like it (from the host, flushed)."""
        self.flush()
        return self._dequantized(self.state_dict()["state"][name])

    def state_bytes(self) -> int:
        """Bytes of state on the host: uint8 codes + float32 absmax (+ float32 small tensors)."""
        return PagedAdamW.state_bytes(self)
