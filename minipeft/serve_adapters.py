"""Reading a peft-format LoRA adapter for a ``LoraServer``, checked against the served base.

An adapter can share a mixed batch (``minipeft.serve``) only if it adds ``s B A x`` to
layers the server wraps: LoRA (rsLoRA scaling included), no DoRA, no bias or
``modules_to_save`` tensors, ranks within the server's ``max_rank``, and shapes that fit
this base. Each refusal is an :class:`AdapterError` that names the adapter, what is wrong
and what to do; the server turns it into that request's error.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from .peft.config import pattern_value
from .peft.io import read_adapter


class AdapterError(ValueError):
    """An adapter this server cannot serve (unknown, unreadable, another base, another method)."""


@dataclass
class HostAdapter:
    """An adapter read from its peft-format directory and checked against the base (host NumPy)."""

    name: str
    path: str
    r: int  # largest rank over its modules
    weights: dict  # module name -> (A (r, in) float32, B (out, r) float32, scale)
    nbytes: int  # bytes of its A and B arrays


def read_lora_adapter(name: str, path: str, model, layers: dict, config) -> HostAdapter:
    """Read and check one adapter: LoRA only, every tensor fits a served layer of ``model``.

    ``layers``: the server's wrapped layers by module name; ``config``: its ``ServeConfig``
    (``max_rank``, ``target_modules``, ``base_model_name``).
    """
    where = f"adapter {name!r} ({path})"
    try:
        adapter_config, tensors, *_ = read_adapter(path)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{where} cannot be read: {e}") from e
    if adapter_config.peft_type != "LORA":
        raise AdapterError(f"{where} is a {adapter_config.peft_type} adapter; only LoRA adapters share a batch "
                           "(BGMV/SGMV add x A^T B^T per row): serve it on its own PeftModel")
    if adapter_config.use_dora:
        raise AdapterError(f"{where} uses DoRA, whose magnitude rescales the base output per adapter; the batched "
                           "path adds only s B A x: merge it (merge_and_unload) and serve the merged model")
    want, got = config.base_model_name, adapter_config.base_model_name_or_path
    if want and got and os.path.normpath(str(got)) != os.path.normpath(want):
        raise AdapterError(f"{where} is for another base: it was trained on {got!r}, this server's base is "
                           f"{want!r}")
    pairs: dict[str, dict] = {}
    for key, arr in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise AdapterError(f"{where} holds {key!r}, which is not a LoRA A/B weight "
                               f"(bias={adapter_config.bias!r} or modules_to_save tensors change the base for every "
                               "request); save it with bias='none' and no modules_to_save to serve it in a mixed batch")
        pairs.setdefault(m.group(1), {})[m.group(2)] = arr
    weights = {}
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: module {mod} has lora_{''.join(ab)} but not both lora_A and lora_B")
        weights[mod] = _check_module(where, adapter_config, mod, ab["A"], ab["B"], model, layers, config)
    return HostAdapter(name, path, max(w[0].shape[0] for w in weights.values()), weights,
                       sum(w[0].nbytes + w[1].nbytes for w in weights.values()))


def _check_module(where: str, config, mod: str, A, B, model, layers: dict, serve) -> tuple:
    """One module's (A, B, scale), checked against the served layer of that name (``config``: the adapter's)."""
    layer = layers.get(mod)
    if layer is None:
        try:
            model.get_submodule(mod)
        except KeyError:
            raise AdapterError(f"{where} is for another base: it has weights for {mod!r}, a module this model "
                               "does not have") from None
        raise AdapterError(f"{where} has weights for {mod}, which this server does not serve (target_modules="
                           f"{list(serve.target_modules)}); build the server with a ServeConfig whose "
                           "target_modules include it")
    n_in, n_out = layer.in_features, layer.out_features
    r = A.shape[0] if A.ndim == 2 else -1
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != n_in or B.shape != (n_out, r):
        raise AdapterError(f"{where} is for another base: at {mod} lora_A is {tuple(A.shape)} and lora_B "
                           f"{tuple(B.shape)}, but this model's layer needs (r, {n_in}) and ({n_out}, r)")
    if r > serve.max_rank:
        raise AdapterError(f"{where} has rank {r} at {mod}, above this server's max_rank "
                           f"{serve.max_rank}; build the server with ServeConfig(max_rank={r}) or more")
    r_cfg = pattern_value(mod, config.rank_pattern, config.r)
    if r != r_cfg:
        raise AdapterError(f"{where}: {mod} has rank {r} in adapter_model.safetensors but {r_cfg} in "
                           "adapter_config.json; the two files do not belong together")
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        raise AdapterError(f"{where}: {mod} has NaN or inf weights; the adapter is broken")
    alpha = pattern_value(mod, config.alpha_pattern, config.lora_alpha)
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r  # LoRA / rsLoRA scaling
    return np.ascontiguousarray(A, np.float32), np.ascontiguousarray(B, np.float32), float(scale)


__all__ = ["AdapterError", "HostAdapter", "read_lora_adapter"]
