"""Mixed-adapter batches: one forward in which each row of the batch uses its own LoRA adapter.

Hugging Face peft's ``model(input_ids, adapter_names=[...])`` and ``model.generate(...,
adapter_names=[...])`` (``LoraModel._enable_peft_forward_hooks`` and
``LoraLayer._mixed_batch_forward``), with the same semantics and errors:

* ``adapter_names[m]`` names the adapter of row ``m``; ``"__base__"`` runs that row on the
  base model alone. Each LoRA layer runs its base once for the whole batch, then, for each
  adapter, adds ``s_i B_i A_i x`` to the rows of that adapter only (LoRA, Hu et al. 2021,
  arXiv 2106.09685, eq. 3)::

      h_m = W0 x_m + b + s_i B_i A_i x_m        i = adapter_names[m]

  A layer the adapter does not target adds nothing for its rows (as in peft).
* errors (``ValueError``) for: a name no LoRA layer has (peft: "Trying to infer with
  non-existing adapter(s)"), a length other than the batch's, a model in training mode
  (forward only: ``generate`` always decodes in eval mode), merged layers, DoRA adapters;
  minipeft also refuses ``modules_to_save`` adapters and ``disable_adapter()`` (peft would
  silently run them otherwise) and methods other than LoRA.

Where peft registers forward pre-hooks for the call, minipeft sets each ``LoraLayer``'s
``batch_adapters`` for the call (:func:`mixed_batch`) and clears it afterwards. The
multi-adapter server (``minipeft.serve``) computes the same sum with BGMV/SGMV on stacked
weights; ``tests/peft/test_mixed_batch.py`` checks that both give the same logits, and
that they equal peft's own mixed batch.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .. import functional as F

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def check_names(adapter_names, rows: int) -> list[str]:
    """``adapter_names`` as a list of str, one per row of the batch (ValueError/TypeError otherwise)."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of adapter names, one per row (e.g. ['a', '{BASE}']), "
                        f"got {type(adapter_names).__name__}")
    if not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must hold adapter names (str), got {adapter_names!r}")
    if len(adapter_names) != rows:
        raise ValueError(f"Length of adapter_names should be the same as the number of inputs, but got "
                         f"{len(adapter_names)} and {rows} respectively")
    return list(adapter_names)


@contextlib.contextmanager
def mixed_batch(peft_model, adapter_names, rows: int, forward: bool = True, layer_class=None):
    """Within the block, every LoRA layer of ``peft_model`` runs row m with ``adapter_names[m]``.

    ``rows``: the batch size B of the calls; ``forward``: True for a forward call (refused
    in training mode, as peft does), False for ``generate`` (which decodes in eval mode);
    ``layer_class``: the method's layer class (``LoraLayer``, given by ``LoraMethod``).
    """
    names = check_names(adapter_names, rows)
    if peft_model.peft_type != "LORA":
        raise TypeError(f"adapter_names (mixed-adapter batches) works with LoRA adapters only; this model's "
                        f"adapters are {peft_model.peft_type}: run one adapter at a time with set_adapter()")
    if peft_model._disabled:
        raise ValueError("adapter_names inside disable_adapter() would run every row on the base model; use "
                         f"'{BASE}' for the rows that need the base, outside disable_adapter()")
    if forward and peft_model.training:
        raise ValueError("Cannot pass adapter_names when the model is in training mode: mixed batches are for "
                         "inference; call model.eval() first")
    layers = [m for m in peft_model.modules() if isinstance(m, layer_class)]
    known = set().union(*(m.lora_A.keys() for m in layers)) if layers else set()
    wanted = {n for n in names if n != BASE}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; this model has "
                         f"{sorted(known)} (and '{BASE}' for the base model)")
    if any(m.merged for m in layers):
        raise ValueError("Cannot pass adapter_names when there are merged adapters, please call "
                         "unmerge_adapter() first")
    dora = sorted(n for n in wanted if peft_model.peft_config[n].use_dora)
    if dora:
        raise ValueError(f"Cannot pass adapter_names when DoRA is enabled (adapters {dora}): DoRA rescales the "
                         "whole output per adapter; merge it, or run it alone with set_adapter()")
    saved = sorted(n for n in wanted if peft_model.peft_config[n].modules_to_save)
    if saved:
        raise ValueError(f"adapters {saved} train modules_to_save (whole modules per adapter), which minipeft's "
                         "mixed batches do not run; serve them one at a time with set_adapter()")
    plan = RowGroups(names)  # grouped once for every layer and step of the call
    for m in layers:
        m.batch_adapters = plan
    try:
        yield
    finally:
        for m in layers:
            m.batch_adapters = None


class RowGroups:
    """The rows of each adapter name (first appearance order), and the permutation that puts them back."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.groups: dict[str, np.ndarray] = {}
        for name in dict.fromkeys(names):
            self.groups[name] = np.flatnonzero(np.asarray(names, dtype=object) == name)  # (b,)
        self.inverse = np.argsort(np.concatenate(list(self.groups.values())))  # (B,): grouped order -> rows

    def __len__(self) -> int:
        return len(self.names)


def mixed_batch_forward(layer, x, plan: RowGroups, *args, **kwargs):
    """peft's ``_mixed_batch_forward`` for one LoRA layer: base output, plus each adapter on its own rows.

    ``x`` (B, ..., in) with ``len(plan) == B``; returns (B, ..., out). The rows of each
    adapter are gathered, their LoRA part added, and the rows put back in their order
    (differentiable: a gather and a concatenation).
    """
    if x.shape[0] != len(plan):
        raise ValueError(f"Length of adapter_names should be the same as the number of inputs, but got "
                         f"{len(plan)} and {x.shape[0]} respectively (beam search repeats rows: give one name "
                         "per row it runs)")
    if layer.merged:
        raise ValueError("Cannot pass adapter_names when there are merged adapters, please call "
                         "unmerge_adapter() first")
    result = layer.base_layer(x, *args, **kwargs)  # (B, ..., out): the base, once for the whole batch
    if not any(n in layer.lora_A for n in plan.groups if n != BASE):
        return result  # no row's adapter targets this layer
    parts = []
    for name, rows in plan.groups.items():
        part = result[rows]  # (b, ..., out)
        if name != BASE and name in layer.lora_A:
            part = part + layer.adapter_forward(x[rows], name, part)
        parts.append(part)
    return F.concatenate(parts, axis=0)[plan.inverse]  # (B, ..., out), rows back in place


__all__ = ["BASE", "mixed_batch", "mixed_batch_forward", "check_names", "RowGroups"]
