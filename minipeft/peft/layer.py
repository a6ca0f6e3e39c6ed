"""The layer side of PEFT: ``BaseTunerLayer`` (a module wrapped with named adapters) and friends.

Names follow Hugging Face peft (``tuners/tuners_utils.py``, ``utils/other.py``):

* ``BaseTunerLayer`` wraps one module (at ``.base_layer``) and keeps per-adapter weights
  in ``ModuleDict``/``ParameterDict`` attributes named in ``adapter_layer_names``; it
  knows how to run, merge and unmerge them. A weight method (LoRA and kin) writes
  ``update_layer``, ``adapter_forward`` and ``get_delta_weight``; the rest is here.
* ``ModulesToSaveWrapper`` keeps a fully trainable copy of a module per adapter
  (``modules_to_save``: a new head, Houlsby's LayerNorms).
* ``walk``/``is_linear_like``/``describe_modules`` find the modules a config targets;
  ``derive_rng`` gives each wrapped module its own generator; ``param_dtype_xp`` puts an
  adapter's weights on the base weight's dtype and device.
"""
from __future__ import annotations

import copy
import re
import warnings
import zlib
from typing import ClassVar

import numpy as np

from ..backend import xp_of
from ..engine import Tensor, no_grad
from ..nn import Linear, Module, ModuleDict


def derive_rng(seed: int, name: str) -> np.random.Generator:
    """The generator for the adapter on module ``name``: depends on (seed, name) only."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def is_linear_like(m: Module) -> bool:
    """A Linear, or any module that says its ``in_features``/``out_features`` (e.g. a 4-bit Linear)."""
    if isinstance(m, BaseTunerLayer):
        return False
    return isinstance(m, Linear) or (
        isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)
    )


def walk(model: Module, prefix: str = ""):
    """(name, module) over ``model``, not descending into tuner layers or save-wrappers."""
    yield prefix, model
    if isinstance(model, (BaseTunerLayer, ModulesToSaveWrapper)):
        return
    for name, child in model._modules.items():
        yield from walk(child, f"{prefix}.{name}" if prefix else name)


def describe_modules(model: Module) -> str:
    """Module names with layer indices folded (``transformer.h.{i}.attn.c_attn``), for error messages."""
    seen: dict[str, str] = {}
    for name, m in walk(model):
        if name:
            seen.setdefault(re.sub(r"\.\d+(?=\.|$)", ".{i}", name), type(m).__name__)
    return ", ".join(f"{n} ({t})" for n, t in seen.items())


class BaseTunerLayer(Module):
    """A module wrapped with one or more named adapters (peft's ``BaseTunerLayer``).

    Subclasses set ``adapter_layer_names`` (dict attributes that hold each adapter's
    trainable weights, keyed by adapter name: they define the saved keys) and
    ``other_param_names`` (per-adapter hyper-parameter dicts), and implement
    ``update_layer`` (create an adapter), ``adapter_forward`` (what the adapter adds
    to the base output) and ``get_delta_weight`` (the (out, in) weight change, for
    merging). Weight methods get ``forward``/``merge``/``unmerge`` from here.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    other_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: Module) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                f"{type(self).__name__} wraps Linear-like layers (with in_features/out_features), "
                f"got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._caches: dict = {}

    # ---- bookkeeping
    def get_base_layer(self) -> Module:
        return self.base_layer

    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for k in getattr(self, attr).keys():
                if k not in names:
                    names.append(k)
        return names

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(self, adapter_name: str, config, rng: np.random.Generator, **ctx) -> None:
        raise NotImplementedError

    def set_adapter(self, names, inference_mode: bool = False) -> None:
        """Make ``names`` the active adapters: only their weights require grad."""
        names = [names] if isinstance(names, str) else list(names)
        for attr in self.adapter_layer_names:
            d = getattr(self, attr)
            for key in d.keys():
                train = key in names and not inference_mode
                item = d[key]
                if isinstance(item, Module):
                    item.requires_grad_(train)
                else:
                    item.requires_grad = train
        self.active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if self.merged:
            warnings.warn(f"deleting adapter {adapter_name!r} from a merged layer: unmerging first", stacklevel=2)
            self.unmerge()
        for attr in self.adapter_layer_names + self.other_param_names:
            d = getattr(self, attr)
            if adapter_name in d:
                del d[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    # ---- compute
    def adapter_forward(self, x: Tensor, adapter: str, base_result: Tensor) -> Tensor | None:
        """What ``adapter`` adds to ``base_result`` for input ``x`` (None: nothing this time)."""
        raise NotImplementedError

    def forward(self, x, *args, **kwargs):
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        present = self.adapter_names
        for a in self.active_adapters:
            if a in present:
                delta = self.adapter_forward(x, a, result)
                if delta is not None:
                    result = result + delta
        return result

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The adapter's weight change, shape (out, in) like ``Linear.weight``."""
        raise NotImplementedError

    # ---- base weight access (Linear, or a quantized layer offering dequantize())
    def base_weight(self):
        """The base weight as a float array (out, in); quantized bases are dequantized."""
        base = self.get_base_layer()
        w = getattr(base, "weight", None)
        if isinstance(w, Tensor) and xp_of(w.data).issubdtype(w.dtype, np.floating):
            return w.data
        if hasattr(base, "dequantize"):
            return base.dequantize()
        raise TypeError(f"cannot read a float weight from {type(base).__name__} (no float .weight, no dequantize())")

    def set_base_weight(self, array) -> None:
        base = self.get_base_layer()
        w = getattr(base, "weight", None)
        if isinstance(w, Tensor) and xp_of(w.data).issubdtype(w.dtype, np.floating):
            w.data = array.astype(w.dtype, copy=False)
            return
        raise TypeError(
            f"cannot merge into a {type(base).__name__} base layer (its weight is not a float Parameter, e.g. "
            "quantized); keep the adapter unmerged, or dequantize the model before merging"
        )

    def merged_weight(self, weight, adapter: str):
        """Base weight with ``adapter`` merged in (additive methods: W + ΔW)."""
        return weight + self.get_delta_weight(adapter).data.astype(weight.dtype)

    def unmerged_weight(self, weight, adapter: str):
        """Inverse of ``merged_weight`` (to float rounding)."""
        return weight - self.get_delta_weight(adapter).data.astype(weight.dtype)

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fold the active (or given) adapters into the base weight: no extra latency after."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        present = self.adapter_names
        with no_grad():
            for a in names:
                if a not in present or a in self.merged_adapters:
                    continue
                new = self.merged_weight(self.base_weight(), a)
                if safe_merge and not bool(xp_of(new).isfinite(new).all()):
                    raise ValueError(f"merging adapter {a!r} gives non-finite weights; the adapter is broken")
                self.set_base_weight(new)
                self.merged_adapters.append(a)

    def unmerge(self) -> None:
        """Subtract every merged adapter again, last merged first."""
        with no_grad():
            while self.merged_adapters:
                a = self.merged_adapters.pop()
                self.set_base_weight(self.unmerged_weight(self.base_weight(), a))

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


class ModulesToSaveWrapper(Module):
    """A module trained in full: one trainable copy per adapter (peft's ``ModulesToSaveWrapper``).

    In memory: ``lm_head.modules_to_save.default.weight``; on disk: ``lm_head.weight``.
    """

    def __init__(self, module: Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = ModuleDict()
        self.active_adapter: str | None = adapter_name
        self.disable_adapters = False
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module).requires_grad_(True)

    def forward(self, *args, **kwargs):
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def set_adapter(self, names, inference_mode: bool = False) -> None:
        names = [names] if isinstance(names, str) else list(names)
        for key, m in self.modules_to_save.items():
            m.requires_grad_(key in names and not inference_mode)
        self.active_adapter = names[0] if names else None

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]


def param_dtype_xp(base_layer):
    """Adapter weights take the base weight's float dtype and device (float32 for quantized bases)."""
    w = getattr(base_layer, "weight", None)
    arr = w.data if isinstance(w, Tensor) else None
    if arr is None:
        return np.float32, np
    xp = xp_of(arr)
    return (arr.dtype if xp.issubdtype(arr.dtype, np.floating) else np.float32), xp


__all__ = ["BaseTunerLayer", "ModulesToSaveWrapper", "derive_rng", "walk", "describe_modules", "is_linear_like",
           "param_dtype_xp"]
