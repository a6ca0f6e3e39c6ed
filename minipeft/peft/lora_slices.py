"""LoRA on slices of one fused projection (LoRA, arXiv 2106.09685; loralib's ``MergedLinear``).

The LoRA paper adapts only W_q and W_v (§4.2; §7.1, Table 5: under a fixed parameter
budget, {W_q, W_v} at r=4 beats any single matrix at r=8). GPT-2 computes q, k and v with
one layer, ``attn.c_attn`` of weight (3C, C), so LoRA on W_q and W_v is LoRA on two of
its three output slices: loralib's ``MergedLinear(..., enable_lora=[True, False, True])``,
minipeft's ``LoraConfig(target_modules=["c_attn"], enable_lora=[True, False, True])``.

With k = len(enable_lora) slices of q = out/k rows and n of them enabled, each enabled
slice i has its own A_i (r, in) and B_i (q, r) (A_i Kaiming-uniform, B_i = 0: the layer
is the base at step 0); disabled slices get nothing. For [True, False, True]::

    h = W0 x + s · [B_1 A_1 x; 0; B_3 A_3 x]        s = alpha/r (alpha/sqrt(r), rsLoRA)

Storage is loralib's: ``lora_A.<adapter>.weight`` (n·r, in) is [A_1; A_3] stacked and
``lora_B.<adapter>.weight`` (n·q, r) is [B_1; B_3], used group by group, so a layer trains
n·r·(in + q) parameters. The same ΔW is ``s · B' A`` with the block matrix B' (out, n·r)
that holds B_i in slice i's rows and in columns i·r ... (i+1)·r - 1 of its enabled
group, zeros elsewhere: a plain LoRA of rank r' = n·r whose alpha' = alpha·r'/r
(rsLoRA: alpha·sqrt(r'/r)) keeps the scaling. peft's file format has no field for the
slices, so ``save_adapter`` writes that plain LoRA (``plain_lora_config``,
``plain_lora_tensors``); the zero blocks of B' are then ordinary weights. (minipeft loads
such a file only while r' <= in, its rank check for a plain LoRA; peft has no such check.)
"""
from __future__ import annotations

import math

from .. import functional as F
from ..backend import xp_of
from ..engine import Tensor
from .layer import BaseTunerLayer


def check_enable_lora(enable_lora, use_dora: bool = False) -> list[bool] | None:
    """``LoraConfig.enable_lora`` as a list of bools (or None); ValueError/TypeError if it makes no sense."""
    if enable_lora is None:
        return None
    if isinstance(enable_lora, (str, bytes)) or not isinstance(enable_lora, (list, tuple)) or not all(
            isinstance(e, bool) for e in enable_lora):
        raise TypeError(f"enable_lora must be a list of bools, one per output slice (GPT-2's c_attn: "
                        f"[True, False, True] for q and v), or None for the whole layer; got {enable_lora!r}")
    if not any(enable_lora):
        raise ValueError(f"enable_lora={list(enable_lora)} enables no slice, so the adapter would train nothing; "
                         "set at least one entry True (q and v of c_attn: [True, False, True])")
    if use_dora:
        raise ValueError("enable_lora cannot be combined with use_dora: DoRA's magnitude normalizes whole rows of "
                         "W0 + ΔW, not slices; use one or the other")
    return list(enable_lora)


def slice_rows(enable_lora: list[bool], out_features: int, name: str = "") -> int:
    """Rows per slice, q = out_features / len(enable_lora); ValueError if it does not divide."""
    k = len(enable_lora)
    if out_features % k:
        raise ValueError(
            f"enable_lora has {k} slices but {name or 'the layer'} has out_features={out_features}, which is not "
            f"divisible by {k}; target only fused layers whose output splits evenly (e.g. target_modules=['c_attn'] "
            "with 3 slices), or leave enable_lora=None")
    return out_features // k


def _groups(enable_lora: list[bool]):
    """(slice index, enabled-group index or None) for every slice."""
    g = 0
    for i, on in enumerate(enable_lora):
        yield i, (g if on else None)
        g += on


def sliced_lora_forward(h: Tensor, lora_B: Tensor, enable_lora: list[bool], r: int) -> Tensor:
    """``[B_1 h_1; 0; B_3 h_3]`` for h = A x: (..., n·r) and lora_B (n·q, r) -> (..., out), unscaled."""
    n = sum(enable_lora)
    q = lora_B.shape[0] // n
    hs = F.split(h, r, axis=-1)  # n x (..., r): h_g = A_g x
    bs = F.split(lora_B, q, axis=0)  # n x (q, r): B_g
    parts = []
    for _, g in _groups(enable_lora):
        if g is not None:
            parts.append(F.linear(hs[g], bs[g]))  # (..., q)
    zeros = xp_of(h.data).zeros(h.shape[:-1] + (q,), dtype=parts[0].dtype)  # (..., q): disabled slice
    it = iter(parts)
    return F.concatenate([next(it) if g is not None else zeros for _, g in _groups(enable_lora)], axis=-1)


def sliced_delta_weight(lora_A: Tensor, lora_B: Tensor, enable_lora: list[bool], r: int) -> Tensor:
    """``[B_1 A_1; 0; B_3 A_3]``, shape (out, in), unscaled; rows of disabled slices are exact zeros."""
    n = sum(enable_lora)
    q = lora_B.shape[0] // n
    a_s = F.split(lora_A, r, axis=0)  # n x (r, in)
    bs = F.split(lora_B, q, axis=0)  # n x (q, r)
    zeros = xp_of(lora_A.data).zeros((q, lora_A.shape[1]), dtype=lora_A.dtype)  # (q, in)
    return F.concatenate([F.matmul(bs[g], a_s[g]) if g is not None else zeros
                          for _, g in _groups(enable_lora)], axis=0)  # (out, in)


def block_lora_B(lora_B, enable_lora: list[bool], r: int):
    """The plain-LoRA B' (out, n·r) of an array lora_B (n·q, r): B_g in its slice's rows, group g's columns."""
    n = sum(enable_lora)
    q = lora_B.shape[0] // n
    xp = xp_of(lora_B)
    out = xp.zeros((len(enable_lora) * q, n * r), dtype=lora_B.dtype)  # (out, n·r)
    for i, g in _groups(enable_lora):
        if g is not None:
            out[i * q:(i + 1) * q, g * r:(g + 1) * r] = lora_B[g * q:(g + 1) * q]
    return out


# ------------------------------------------------------------------ the file form (a plain LoRA)


def plain_lora_config(d: dict, enable_lora: list[bool], use_rslora: bool) -> dict:
    """The adapter_config.json dict of the equivalent plain LoRA: every rank times n, alpha to match.

    r' = n·r for ``r`` and every ``rank_pattern`` value; every alpha (``lora_alpha`` and
    ``alpha_pattern``) times n (rsLoRA: sqrt(n)), so each module keeps its scaling
    alpha/r (alpha/sqrt(r)) whichever pattern entry gives its rank or alpha.
    """
    n = sum(enable_lora)
    f = math.sqrt(n) if use_rslora else n
    d = dict(d)
    d["r"] = d["r"] * n
    d["lora_alpha"] = d["lora_alpha"] * f
    d["rank_pattern"] = {k: v * n for k, v in (d.get("rank_pattern") or {}).items()}
    d["alpha_pattern"] = {k: v * f for k, v in (d.get("alpha_pattern") or {}).items()}
    return d


def plain_lora_tensors(model, adapter_name: str, tensors: dict) -> dict:
    """``tensors`` (on-disk key -> array) with every sliced layer's lora_B replaced by its block B' (out, n·r).

    lora_A (n·r, in) is already the stacked A of the plain LoRA and stays as it is.
    """
    out = dict(tensors)
    for mname, m in model.named_modules():
        mask = getattr(m, "enable_lora", {}).get(adapter_name) if isinstance(m, BaseTunerLayer) else None
        if mask:
            key = f"{mname}.lora_B.weight"
            out[key] = block_lora_B(out[key], mask, m.r[adapter_name])
    return out


__all__ = ["check_enable_lora", "slice_rows", "sliced_lora_forward", "sliced_delta_weight", "block_lora_B",
           "plain_lora_config", "plain_lora_tensors"]
