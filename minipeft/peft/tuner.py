"""The one PEFT API: ``get_peft_model(model, config) -> PeftModel``, and the layer protocol.

Structure and names follow Hugging Face peft (``peft_model.py``, ``tuners/tuners_utils.py``)
so in-memory parameter names match peft's:
``PeftModel.base_model`` is a ``TunerModel`` whose ``.model`` is the wrapped GPT, giving
``base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight``.

* ``REGISTRY`` maps a ``peft_type`` ("LORA") to a ``PeftMethod`` subclass; a method
  module registers itself with ``@register``.
* ``BaseTunerLayer`` wraps one module (at ``.base_layer``) and keeps per-adapter weights
  in ``ModuleDict``/``ParameterDict`` attributes named in ``adapter_layer_names``; it
  knows how to run, merge and unmerge them.
* ``ModulesToSaveWrapper`` keeps a fully trainable copy of a module per adapter.
See ``minipeft/peft/__init__.py`` for how a new method plugs in.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import warnings
import weakref
import zlib
from collections import OrderedDict
from typing import ClassVar

import numpy as np

from ..backend import to_device, xp_of
from ..engine import Tensor, no_grad
from ..nn import Linear, Module, ModuleDict
from .config import PeftConfig

REGISTRY: dict[str, type["PeftMethod"]] = {}


def register(method: type["PeftMethod"]) -> type["PeftMethod"]:
    """Class decorator: make ``get_peft_model`` dispatch ``method.peft_type`` to ``method``."""
    REGISTRY[method.peft_type] = method
    return method


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


# ------------------------------------------------------------------ tuner layer


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


class TunerModel(Module):
    """Holds the wrapped model at ``.model`` plus method-wide state (peft's ``LoraModel`` etc.)."""

    def __init__(self, model: Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        model = self.__dict__.get("model")
        if model is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(model, name)


# ------------------------------------------------------------------ methods


class PeftMethod:
    """One PEFT method's hooks; subclass, set the class attributes, decorate with ``@register``.

    Every hook has a default that suits layer-wrapping methods (LoRA and kin); methods
    that add model-level state (VeRA's shared projections, prompt/prefix tuning)
    override ``prepare``/``find_targets``/``forward``/``extra_adapter_state``/
    ``set_adapter``/``delete_adapter``.
    """

    peft_type: ClassVar[str] = ""
    config_class: ClassVar[type[PeftConfig]] = PeftConfig
    layer_class: ClassVar[type[BaseTunerLayer] | None] = None
    #: False for methods whose change is not a weight delta (prompt/prefix tuning, bottleneck adapters)
    mergeable: ClassVar[bool] = True

    @classmethod
    def prepare_config(cls, config: PeftConfig) -> PeftConfig:
        """A copy of ``config`` with defaults filled in (GPT-2's target modules)."""
        if config.target_modules is None and config.default_target_modules is not None:
            return dataclasses.replace(config, target_modules=list(config.default_target_modules))
        return dataclasses.replace(config)

    @classmethod
    def check_new_adapter(cls, peft_model: "PeftModel", config: PeftConfig, adapter_name: str) -> None:
        """Raise if ``config`` conflicts with the adapters already there."""

    @classmethod
    def can_wrap(cls, module: Module) -> bool:
        return (cls.layer_class is not None and isinstance(module, cls.layer_class)) or is_linear_like(module)

    @classmethod
    def find_targets(cls, model: Module, config: PeftConfig) -> list[tuple[str, Module]]:
        """(name, module) pairs to wrap; ValueError listing the model's modules if none."""
        if config.target_modules == "all-linear":
            found = [(n, m) for n, m in walk(model) if n and is_linear_like(m)
                     and n.rsplit(".", 1)[-1] != "lm_head" and not config.is_excluded(n)]
        else:
            found = [(n, m) for n, m in walk(model) if n and config.matches(n)]
        bad = [f"{n} ({type(m).__name__})" for n, m in found if not cls.can_wrap(m)]
        if bad:
            raise ValueError(
                f"{cls.peft_type}: target_modules={config.target_modules!r} matched modules it cannot wrap: "
                f"{bad[:10]}; it wraps Linear layers. Name the Linear layers instead (e.g. 'c_attn')."
            )
        if not found:
            raise ValueError(
                f"{cls.peft_type}: target_modules={config.target_modules!r} matches no module of "
                f"{type(model).__name__}. Its modules are: {describe_modules(model)}"
            )
        return found

    @classmethod
    def prepare(cls, peft_model: "PeftModel", config, adapter_name: str, targets) -> None:
        """Model-level setup before the targets are wrapped (VeRA's shared A, B; a prompt encoder)."""

    @classmethod
    def wrap(cls, module: Module, name: str, config, adapter_name: str, rng, tuner_model: TunerModel) -> Module:
        """Add ``adapter_name`` to ``module``: wrap a plain module, or extend an existing wrapper."""
        layer = module if isinstance(module, cls.layer_class) else cls.layer_class(module)
        layer.update_layer(adapter_name, config, rng, name=name, tuner_model=tuner_model)
        return layer

    @classmethod
    def mark_trainable(cls, peft_model: "PeftModel", config, adapter_name: str) -> None:
        """Extra trainability rules after the adapter weights (default: ``bias`` = none/all/<prefix>_only)."""
        bias = getattr(config, "bias", "none")
        base = peft_model.base_named_parameters()
        biases = {n: p for n, p in base.items() if n.rsplit(".", 1)[-1] == "bias"}
        for p in biases.values():
            p.requires_grad = False
        if bias == "all":
            chosen = biases.values()
        elif bias.endswith("_only"):
            chosen = [m.get_base_layer().bias for m in peft_model.modules()
                      if isinstance(m, BaseTunerLayer) and adapter_name in m.adapter_names
                      and getattr(m.get_base_layer(), "bias", None) is not None]
        else:
            chosen = []
        for p in chosen:
            p.requires_grad = not config.inference_mode

    @classmethod
    def forward(cls, peft_model: "PeftModel", *args, **kwargs):
        return peft_model.base_model(*args, **kwargs)

    @classmethod
    def extra_adapter_state(cls, peft_model: "PeftModel", adapter_name: str) -> list[tuple[str, str, Tensor]]:
        """Model-level tensors of an adapter: (in-memory key, peft on-disk key, Tensor)."""
        return []

    @classmethod
    def set_adapter(cls, peft_model: "PeftModel", adapter_name: str, inference_mode: bool) -> None:
        """Trainability of model-level state when ``adapter_name`` becomes active."""

    @classmethod
    def delete_adapter(cls, peft_model: "PeftModel", adapter_name: str) -> None:
        """Remove model-level state of ``adapter_name``."""

    @classmethod
    def add_weighted_adapter(cls, peft_model, adapters, weights, adapter_name, combination_type, **kw) -> None:
        raise TypeError(f"add_weighted_adapter is not supported for {cls.peft_type} (only LORA)")


def method_for(config: PeftConfig) -> type[PeftMethod]:
    if not isinstance(config, PeftConfig):
        raise TypeError(f"expected a PeftConfig (e.g. LoraConfig(r=8)), got {type(config).__name__}")
    if config.peft_type not in REGISTRY:
        raise ValueError(f"no PEFT method registered for peft_type {config.peft_type!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[config.peft_type]


# ------------------------------------------------------------------ PeftModel


class PeftModel(Module):
    """A base model with named adapters; calls go to the wrapped model (peft's ``PeftModel``).

    Only one adapter is active at a time (``set_adapter``); ``disable_adapter()`` runs the
    base alone. Attributes the PeftModel lacks (``config``, ``generate``...) are looked up
    on the wrapped model.
    """

    def __init__(self, model: Module, config: PeftConfig, adapter_name: str = "default", rng=None) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("model is already a PeftModel; use model.add_adapter(name, config) to add another adapter")
        if not isinstance(model, Module):
            raise TypeError(f"get_peft_model needs a minipeft Module, got {type(model).__name__}")
        check_not_wrapped(model)
        method = method_for(config)
        self.base_model = TunerModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self._active_adapter = adapter_name
        self._disabled = False
        self._method = method
        flags = [(p, p.requires_grad) for p in model.parameters()]
        model.requires_grad_(False)  # freeze every base parameter
        object.__setattr__(self, "training", model.training)
        try:
            self._inject(config, adapter_name, rng)
        except Exception:
            for p, flag in flags:  # leave the model as it was
                p.requires_grad = flag
            raise
        _WRAPPED[model] = weakref.ref(self)  # a second get_peft_model on this model is refused

    def __getattr__(self, name: str):
        base = self.__dict__.get("base_model")
        if base is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(base.model, name)

    # ---- properties
    @property
    def active_adapter(self) -> str:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter]

    @property
    def peft_type(self) -> str:
        return self._method.peft_type

    @property
    def method(self) -> type[PeftMethod]:
        return self._method

    def get_base_model(self) -> Module:
        return self.base_model.model

    def forward(self, *args, **kwargs):
        if self._disabled:
            return self.base_model.model(*args, **kwargs)
        return self._method.forward(self, *args, **kwargs)

    # ---- adding, choosing, removing adapters
    def _inject(self, config: PeftConfig, adapter_name: str, rng) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete_adapter it first")
        method = method_for(config)
        if method is not self._method:
            raise ValueError(
                f"cannot add a {config.peft_type} adapter to a {self._method.peft_type} model: "
                "all adapters of one PeftModel use the same method"
            )
        config = method.prepare_config(config)
        method.check_new_adapter(self, config, adapter_name)
        model, tuner = self.base_model.model, self.base_model
        targets = method.find_targets(model, config)
        done: list[tuple[str, Module, Module]] = []
        try:
            method.prepare(self, config, adapter_name, targets)
            for name, module in targets:
                layer_rng = rng if rng is not None else derive_rng(config.seed, name)
                training = module.training
                new = method.wrap(module, name, config, adapter_name, layer_rng, tuner)
                new.train(training)  # new adapter parts follow the mode of the module they join
                done.append((name, module, new))
                if new is not module:
                    model.set_submodule(name, new)
            for name in self._save_targets(config):
                module = model.get_submodule(name)
                if isinstance(module, ModulesToSaveWrapper):
                    module.update(adapter_name)
                    module.train(module.training)
                    done.append((name, module, module))
                else:
                    new = ModulesToSaveWrapper(module, adapter_name).train(module.training)
                    done.append((name, module, new))
                    model.set_submodule(name, new)
        except Exception:
            for name, old, new in reversed(done):  # leave the model as it was
                if new is old:
                    old.delete_adapter(adapter_name)
                else:
                    model.set_submodule(name, old)
            method.delete_adapter(self, adapter_name)
            raise
        self.peft_config[adapter_name] = config
        self._refresh_trainable()

    def _save_targets(self, config: PeftConfig) -> list[str]:
        names = []
        for entry in config.modules_to_save or ():
            hits = [n for n, _ in walk(self.base_model.model) if n and (n == entry or n.endswith("." + entry))]
            if not hits:
                raise ValueError(f"modules_to_save entry {entry!r} matches no module; modules are: "
                                 f"{describe_modules(self.base_model.model)}")
            names += [h for h in hits if h not in names]
        return names

    def add_adapter(self, adapter_name: str, config: PeftConfig, rng=None) -> None:
        """Add another adapter of the same method; it starts inactive (not trainable)."""
        self._inject(config, adapter_name, rng)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (the only trainable one)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        for m in self.modules():
            if isinstance(m, BaseTunerLayer) and m.merged:
                warnings.warn("set_adapter on a merged model: unmerging first", stacklevel=2)
                m.unmerge()
        self._active_adapter = adapter_name
        self._refresh_trainable()

    def _refresh_trainable(self) -> None:
        a = self._active_adapter
        cfg = self.peft_config[a]
        for m in self.modules():
            if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)):
                m.set_adapter(a, inference_mode=cfg.inference_mode)
        self._method.set_adapter(self, a, cfg.inference_mode)
        self._method.mark_trainable(self, cfg, a)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ValueError(f"cannot delete {adapter_name!r}, the only adapter; use unload() to get the base model")
        for m in self.modules():
            if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)):
                m.delete_adapter(adapter_name)
        self._method.delete_adapter(self, adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name == self._active_adapter:
            self._active_adapter = next(iter(self.peft_config))
            warnings.warn(f"deleted the active adapter; {self._active_adapter!r} is active now", stacklevel=2)
        self._refresh_trainable()

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter(): ...`` runs the base model alone."""
        prev = self._disabled
        self._set_enabled(False)
        self._disabled = True
        try:
            yield
        finally:
            self._set_enabled(True)
            self._disabled = prev

    def _set_enabled(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)):
                m.enable_adapters(enabled)

    # ---- merging
    def _tuner_layers(self) -> list[BaseTunerLayer]:
        return [m for m in self.modules() if isinstance(m, BaseTunerLayer)]

    def _check_mergeable(self) -> None:
        if not self._method.mergeable:
            raise TypeError(f"{self.peft_type} adapters are not a weight change and cannot be merged")

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        self._check_mergeable()
        for layer in self._tuner_layers():
            layer.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for layer in self._tuner_layers():
            layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names=None) -> Module:
        if merge:
            self._check_mergeable()
        model = self.base_model.model
        for name, m in list(walk(model)):
            if isinstance(m, BaseTunerLayer):
                if merge:
                    m.merge(adapter_names, safe_merge=safe_merge)
                model.set_submodule(name, m.get_base_layer())
            elif isinstance(m, ModulesToSaveWrapper):
                keep = m.modules_to_save[m.active_adapter] if m.active_adapter in m.modules_to_save else None
                model.set_submodule(name, keep if keep is not None else m.original_module)
        self._release()
        return model

    def _release(self) -> None:
        """The base model is no longer wrapped by this PeftModel (unloaded, or a failed load)."""
        model = self.base_model.model
        ref = _WRAPPED.get(model)
        if ref is not None and ref() is self:
            del _WRAPPED[model]

    def merge_and_unload(self, safe_merge: bool = False, adapter_names=None) -> Module:
        """Merge the active adapter into the weights and return the plain base model."""
        return self._unload(True, safe_merge, adapter_names)

    def unload(self) -> Module:
        """Remove every adapter without merging; return the original base model."""
        return self._unload(False)

    def add_weighted_adapter(self, adapters, weights, adapter_name: str, combination_type: str = "svd", **kw):
        """New adapter ``adapter_name`` combining ``adapters`` (method-specific; LoRA only)."""
        return self._method.add_weighted_adapter(self, list(adapters), list(weights), adapter_name,
                                                 combination_type, **kw)

    # ---- counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; tied weights once; quantized weights at full count."""
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.size
            trainable += p.size if p.requires_grad else 0
        for m in self.modules():
            if hasattr(m, "quantized_numel"):
                total += int(m.quantized_numel())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    # ---- adapter tensors (what io.py saves and loads)
    def _adapter_entries(self, adapter_name: str, with_bias: bool = True) -> list[tuple[str, str, Tensor]]:
        a = adapter_name
        out: list[tuple[str, str, Tensor]] = []
        for mname, m in self.named_modules():
            if isinstance(m, BaseTunerLayer):
                for attr in m.adapter_layer_names:
                    d = getattr(m, attr)
                    if a not in d:
                        continue
                    item = d[a]
                    if isinstance(item, Tensor):
                        out.append((f"{mname}.{attr}.{a}", f"{mname}.{attr}", item))
                    else:
                        for pn, p in item.named_parameters():
                            out.append((f"{mname}.{attr}.{a}.{pn}", f"{mname}.{attr}.{pn}", p))
            elif isinstance(m, ModulesToSaveWrapper) and a in m.modules_to_save:
                for pn, p in m.modules_to_save[a].named_parameters():
                    out.append((f"{mname}.modules_to_save.{a}.{pn}", f"{mname}.{pn}", p))
        out += self._method.extra_adapter_state(self, a)
        bias = getattr(self.peft_config[a], "bias", "none") if with_bias else "none"
        if bias != "none":
            if bias == "all":
                chosen = {n for n in self.base_named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
            else:
                chosen = {f"{n}.base_layer.bias" for n, m in self.named_modules()
                          if isinstance(m, BaseTunerLayer) and a in m.adapter_names
                          and getattr(m.get_base_layer(), "bias", None) is not None}
            params = dict(self.named_parameters())
            out += [(n, n, params[n]) for n in sorted(chosen)]
        return out

    def adapter_state_dict(self, adapter_name: str | None = None) -> "OrderedDict[str, Tensor]":
        """In-memory key -> Tensor for every tensor of one adapter (peft's naming with the adapter name)."""
        a = self._check_name(adapter_name)
        return OrderedDict((k, t) for k, _, t in self._adapter_entries(a))

    def peft_state_dict(self, adapter_name: str | None = None) -> "OrderedDict[str, object]":
        """peft's on-disk key -> array (the adapter name stripped), ready for safetensors."""
        a = self._check_name(adapter_name)
        return OrderedDict((pk, t.data) for _, pk, t in self._adapter_entries(a))

    def load_peft_state_dict(self, state: dict, adapter_name: str | None = None) -> None:
        """Copy arrays keyed as on disk into the adapter; checks everything first, else changes nothing."""
        a = self._check_name(adapter_name)
        entries = {pk: t for _, pk, t in self._adapter_entries(a)}
        missing, unexpected = sorted(set(entries) - set(state)), sorted(set(state) - set(entries))
        shapes = [f"{k}: file {tuple(np.shape(state[k]))} vs model {entries[k].shape}"
                  for k in entries if k in state and tuple(np.shape(state[k])) != entries[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f"adapter tensors do not fit adapter {a!r} of this model (model unchanged): "
                f"missing {missing[:10]}, unexpected {unexpected[:10]}, shape mismatches {shapes[:10]}"
            )
        for k, t in entries.items():
            arr = state[k] if hasattr(state[k], "shape") else np.asarray(state[k])
            t.data = to_device(arr, t.device).astype(t.dtype, copy=True)

    def _check_name(self, adapter_name):
        a = self._active_adapter if adapter_name is None else adapter_name
        if a not in self.peft_config:
            raise ValueError(f"unknown adapter {a!r}; adapters: {list(self.peft_config)}")
        return a

    def base_named_parameters(self) -> dict[str, Tensor]:
        """Parameters of the base model (not of any adapter), by in-memory name."""
        owned = {id(t) for a in self.peft_config for _, _, t in self._adapter_entries(a, with_bias=False)}
        return {n: p for n, p in self.named_parameters() if id(p) not in owned}


def get_peft_model(model: Module, config: PeftConfig, adapter_name: str = "default", rng=None) -> PeftModel:
    """Freeze ``model``, add the adapter ``config`` describes, return the ``PeftModel``.

    ``rng`` (a ``numpy.random.Generator``) overrides ``config.seed`` for the adapter init.
    The adapter is injected into ``model`` itself (as peft does), so a model can be wrapped
    once: a second call on it raises ``ValueError`` (``check_not_wrapped``).
    """
    return PeftModel(model, config, adapter_name, rng=rng)


#: model -> weak reference to the PeftModel that wraps it (identity-keyed; a deepcopy is not in it)
_WRAPPED: "weakref.WeakKeyDictionary[Module, weakref.ref]" = weakref.WeakKeyDictionary()


def check_not_wrapped(model: Module) -> None:
    """Refuse a model that a PeftModel wraps already, or that holds adapter layers.

    Wrapping it again would silently change the first PeftModel: the new adapter would
    replace or wrap the first one's layers, and the first model's config and saved files
    would no longer describe its weights. ``ValueError`` says what to do instead.
    """
    layer = next(((n, m) for n, m in walk(model) if n and isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))),
                 None)
    ref = _WRAPPED.get(model)
    owner = ref() if ref is not None else None
    if layer is None and owner is None:
        return
    if layer is not None:
        what = f"its module {layer[0]!r} is a {type(layer[1]).__name__} from an earlier get_peft_model"
    else:
        what = f"a {owner.peft_type} PeftModel made by an earlier get_peft_model wraps it"
    raise ValueError(
        f"get_peft_model: this {type(model).__name__} is already wrapped ({what}); wrapping it again would "
        "silently change that PeftModel's adapter. To add another adapter: peft_model.add_adapter(name, config). "
        "For a second, independent PeftModel: wrap a copy taken before the first wrap "
        "(base2 = copy.deepcopy(base)), or peft_model.unload() first to get the plain base back")


__all__ = [
    "REGISTRY", "register", "BaseTunerLayer", "ModulesToSaveWrapper", "TunerModel", "PeftMethod", "PeftModel",
    "get_peft_model", "check_not_wrapped", "derive_rng", "walk", "describe_modules", "is_linear_like", "method_for",
]
