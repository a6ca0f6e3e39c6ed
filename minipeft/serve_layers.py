"""The layer side of multi-adapter serving: BGMV/SGMV (NumPy twins) and the wrapped Linear.

Punica (Chen et al. 2023, arXiv 2310.18547, Sec. 4): in a batch whose rows use different
LoRA adapters, the base GEMM ``x W0^T`` runs once, and only the LoRA part is gathered per
row, ``y_m += s_i (x_m A_i^T) B_i^T`` with ``i`` the adapter of row m: BGMV for decode (one
token per request), SGMV for the prefill (each adapter's rows contiguous).

**Ranks.** Adapters of different ranks (S-LoRA, Sheng et al. 2023, arXiv 2311.03285, serves
adapters of heterogeneous ranks without padding them to the largest) are kept in *rank classes*: class ``c`` stacks its
adapters at its rank ``r_c``, ``A_c (n_c, r_c, in)``, ``B_c (n_c, out, r_c)``, and an
adapter goes to the smallest class whose rank holds it. Each forward runs BGMV/SGMV once
per class in the batch, on that class's rows only: an adapter of rank 4 costs rank-4
products and rank-4 memory even when another adapter of the batch has rank 64. A rank
padded within its class adds nothing (zero rows of A, zero columns of B). One class of
``r_max`` is Punica's padding of every rank to the largest.
"""
from __future__ import annotations

import numpy as np

from . import fast
from .backend import to_device, xp_of
from .engine import Tensor
from .kernels import bgmv as bgmv_kernels
from .nn import Module
from .peft.layer import is_linear_like, param_dtype_xp

# ------------------------------------------------------------------ the batched LoRA path (NumPy twins)


def bgmv_reference(y, x, lora_A, lora_B, indices, scales):
    """BGMV: ``y[m] += scales[i] * (x[m] A[i]^T) B[i]^T`` with ``i = indices[m]``, in place; i < 0 skips row m.

    ``y`` (M, H2), ``x`` (M, H1), ``lora_A`` (N, R, H1), ``lora_B`` (N, H2, R), ``indices``
    (M,), ``scales`` (N,). Gathers each row's A and B, then two batched matrix products.
    """
    xp = xp_of(y)
    indices = xp.asarray(indices)
    rows = xp.flatnonzero(indices >= 0)  # base-model rows stay exactly the base output
    if rows.size < len(indices):
        return y if rows.size == 0 else _scatter_add(y, rows, bgmv_reference(
            xp.zeros((rows.size, y.shape[1]), y.dtype), x[rows], lora_A, lora_B, indices[rows], scales))
    v = xp.matmul(lora_A[indices], x[:, :, None])  # (M, R, 1): shrink, x A_i^T (A_i gathered per row)
    delta = xp.matmul(lora_B[indices], v)[:, :, 0]  # (M, H2): expand, v B_i^T
    y += scales[indices][:, None] * delta
    return y


def _scatter_add(y, rows, delta):
    y[rows] += delta
    return y


def sgmv_reference(y, x, lora_A, lora_B, indptr, seg_slot, scales):
    """SGMV: for each segment k, ``y[s:e] += scales[i] * (x[s:e] A[i]^T) B[i]^T``, in place.

    Rows ``indptr[k]:indptr[k+1]`` share slot ``i = seg_slot[k]`` (< 0: skipped). One GEMM
    pair per segment: the adapter's weights serve all its rows.
    """
    for k, slot in enumerate(np.asarray(seg_slot).tolist()):
        s, e = int(indptr[k]), int(indptr[k + 1])
        if slot >= 0 and e > s:
            y[s:e] += scales[slot] * ((x[s:e] @ lora_A[slot].T) @ lora_B[slot].T)  # (e - s, H2)
    return y


# On float32 CuPy arrays the CUDA kernels (minipeft/kernels/bgmv.cu) run instead of the twins above.
fast.register(bgmv_reference, bgmv_kernels.bgmv_cuda, when=bgmv_kernels.bgmv_applies)
fast.register(sgmv_reference, bgmv_kernels.sgmv_cuda, when=bgmv_kernels.sgmv_applies)


# ------------------------------------------------------------------ which slot each row uses


class RankClasses:
    """Slots grouped by rank: class c holds ``counts[c]`` slots of rank ``ranks[c]``; slot ids run class by class."""

    def __init__(self, ranks, counts) -> None:
        self.ranks, self.counts = [int(r) for r in ranks], [int(n) for n in counts]
        self.offsets = np.r_[0, np.cumsum(self.counts)].astype(np.int64)  # class c: ids offsets[c]:offsets[c+1]

    @property
    def n_slots(self) -> int:
        return int(self.offsets[-1])

    def class_for_rank(self, r: int) -> int:
        """The smallest class whose rank holds ``r`` (the caller checked r <= the largest)."""
        return next(c for c, rc in enumerate(self.ranks) if rc >= r)

    def class_of(self, slot: int) -> int:
        return int(np.searchsorted(self.offsets, slot, side="right") - 1)

    def slots_of(self, c: int) -> list[int]:
        return list(range(int(self.offsets[c]), int(self.offsets[c + 1])))


class BatchContext:
    """The adapter slot of every row of the batch being run (set by the server, read by the layers).

    For each rank class with rows in the batch: the class's local slot of each row (-1:
    another class, or the base), on the device for BGMV, and its segments (runs of rows
    with one slot) for SGMV.
    """

    def __init__(self, classes: RankClasses) -> None:
        self.classes, self.version = classes, 0
        self.clear()

    def clear(self) -> None:
        self.slots = self.used = None
        self.per_class = []  # (class c, local slots (R,) on the device, req_ptr (S + 1,), seg_slot (S,))

    def set(self, slots: np.ndarray, xp) -> None:
        """``slots`` (R,): each row's global slot (-1: base); any order (sorted slots make fewer segments)."""
        self.version += 1
        slots = np.asarray(slots, np.int64)
        self.slots, self.used = slots, np.unique(slots[slots >= 0])
        self.per_class = []
        off = self.classes.offsets
        for c in np.unique(np.searchsorted(off, self.used, side="right") - 1).tolist():  # classes with rows
            inside = (slots >= off[c]) & (slots < off[c + 1])
            local = np.where(inside, slots - off[c], -1)  # (R,)
            starts = np.r_[0, np.flatnonzero(np.diff(local)) + 1]
            self.per_class.append((c, xp.asarray(local.astype(np.int32)), np.r_[starts, len(local)], local[starts]))


# ------------------------------------------------------------------ the wrapped layer


class MultiLoraLinear(Module):
    """A Linear-like base layer plus the stacked LoRA weights of every resident adapter, by rank class.

    ``forward(x)``: ``y = base(x)``, then, for each rank class with rows in the running
    batch, that class's LoRA part per row: BGMV when each row has one token (decode), SGMV
    over each adapter's rows otherwise (prefill). The stacks are plain arrays, not Parameters.
    """

    def __init__(self, base_layer: Module, classes: RankClasses, ctx: BatchContext, use_kernels: bool = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        dtype, xp = param_dtype_xp(base_layer)
        self.classes = classes
        self.lora_A = [xp.zeros((n, r, self.in_features), dtype) for r, n in zip(classes.ranks, classes.counts)]
        self.lora_B = [xp.zeros((n, self.out_features, r), dtype) for r, n in zip(classes.ranks, classes.counts)]
        self.scales = [xp.zeros(n, dtype) for n in classes.counts]  # per class (n_c,)
        self.present = np.zeros(classes.n_slots, bool)  # slot holds weights for this layer
        self.ctx, self.use_kernels = ctx, use_kernels
        self._active = (-1, False)

    def set_slot(self, slot: int, A=None, B=None, scale: float = 0.0) -> None:
        """Write one adapter's A (r, in), B (out, r) into ``slot`` (zero-padded to its class); None clears it."""
        c = self.classes.class_of(slot)
        j = slot - int(self.classes.offsets[c])
        lora_A, lora_B = self.lora_A[c], self.lora_B[c]
        xp = xp_of(lora_A)
        lora_A[j] = 0
        lora_B[j] = 0
        if A is not None:
            r = A.shape[0]
            lora_A[j, :r] = xp.asarray(A, dtype=lora_A.dtype)
            lora_B[j, :, :r] = xp.asarray(B, dtype=lora_B.dtype)
        self.scales[c][j] = scale if A is not None else 0.0
        self.present[slot] = A is not None

    def _is_active(self, ctx) -> bool:
        if self._active[0] != ctx.version:
            self._active = (ctx.version, bool(ctx.used.size and self.present[ctx.used].any()))
        return self._active[1]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., out): the base GEMM, once for the whole batch
        ctx = self.ctx
        if ctx.slots is None or not self._is_active(ctx):
            return y
        xd, yd = x.data, y.data
        M = xd.size // self.in_features
        x2, y2 = xd.reshape(M, self.in_features), yd.reshape(M, self.out_features)  # (R*T, in), (R*T, out)
        T = M // len(ctx.slots)
        for c, local, req_ptr, seg_slot in ctx.per_class:  # each rank class at its own rank
            A, B, s = self.lora_A[c], self.lora_B[c], self.scales[c]
            # the twins, or their CUDA kernels where fast.choose finds they apply (use_kernels=False: the twins)
            if T == 1:  # decode: one row per request
                fast.call(bgmv_reference, y2, x2, A, B, local, s, allow_fast=self.use_kernels)
            else:  # prefill: request k's T rows follow request k-1's
                fast.call(sgmv_reference, y2, x2, A, B, req_ptr * T, seg_slot, s, allow_fast=self.use_kernels)
        return Tensor(y2.reshape(yd.shape))

    def _moved_to(self, device: str) -> None:
        self.lora_A, self.lora_B, self.scales = ([to_device(a, device) for a in arrays]
                                                 for arrays in (self.lora_A, self.lora_B, self.scales))

    def nbytes(self) -> int:
        return int(sum(a.nbytes for arrays in (self.lora_A, self.lora_B, self.scales) for a in arrays))

    def extra_repr(self) -> str:
        classes = ", ".join(f"{n} x r{r}" for r, n in zip(self.classes.ranks, self.classes.counts))
        return f"in_features={self.in_features}, out_features={self.out_features}, slots=[{classes}]"


def served_modules(model: Module, target_modules) -> list:
    """(name, module) of the Linear-like modules of ``model`` whose names match ``target_modules``."""
    out = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m) and not n.startswith("lm_head")
           and any(n == t or n.endswith("." + t) for t in target_modules)]
    if not out:
        raise ValueError(f"target_modules {list(target_modules)} match no Linear of the model; GPT-2 names are "
                         "'c_attn', 'c_proj' (attn and mlp), 'c_fc', or dotted suffixes such as 'mlp.c_proj'")
    return out


__all__ = ["bgmv_reference", "sgmv_reference", "RankClasses", "BatchContext", "MultiLoraLinear", "served_modules"]
