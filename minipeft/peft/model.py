"""The model side of PEFT: ``get_peft_model(model, config) -> PeftModel``.

Structure and names follow Hugging Face peft (``peft_model.py``, ``tuners/tuners_utils.py``)
so in-memory parameter names match peft's: ``PeftModel.base_model`` is a ``TunerModel``
whose ``.model`` is the wrapped GPT, giving
``base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight``.

``PeftModel`` does what every method shares -- freezing the base, adding, choosing and
deleting named adapters (rolling back on error), merging, counting, listing the tensors
an adapter saves -- and asks the method (``PeftMethod`` hooks, method.py) for the rest.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import OrderedDict

import numpy as np

from ..backend import to_device
from ..engine import Tensor
from ..nn import Module
from .config import PeftConfig
from .layer import BaseTunerLayer, ModulesToSaveWrapper, derive_rng, describe_modules, walk
from .method import REGISTRY, PeftMethod, trained_biases


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


def method_for(config: PeftConfig) -> type[PeftMethod]:
    if not isinstance(config, PeftConfig):
        raise TypeError(f"expected a PeftConfig (e.g. LoraConfig(r=8)), got {type(config).__name__}")
    if config.peft_type not in REGISTRY:
        raise ValueError(f"no PEFT method registered for peft_type {config.peft_type!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[config.peft_type]


class PeftModel(Module):
    """A base model with named adapters; calls go to the wrapped model (peft's ``PeftModel``).

    Only one adapter is active at a time (``set_adapter``); ``disable_adapter()`` runs the
    base alone. Attributes the PeftModel lacks (``config``, ``num_parameters``...) are
    looked up on the wrapped model.
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

    def forward(self, *args, adapter_names=None, **kwargs):
        """The wrapped model's forward with the active adapter; ``adapter_names``: one adapter per row.

        ``adapter_names`` (peft's mixed batch, LoRA only): a list of B names, ``"__base__"``
        for rows on the base model alone (``peft/mixed_batch.py``).
        """
        if adapter_names is not None:
            with self._mixed_batch(adapter_names, args, kwargs, forward=True):
                return self._method.forward(self, *args, **kwargs)
        if self._disabled:
            return self.base_model.model(*args, **kwargs)
        return self._method.forward(self, *args, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        """Continue token ids with the active adapter (``GPT.generate``'s arguments; the method's ``generate``).

        ``adapter_names``: one adapter per row of ``idx`` (``"__base__"``: the base), as in peft.
        """
        if adapter_names is not None:
            with self._mixed_batch(adapter_names, args, kwargs, forward=False):
                return self._method.generate(self, *args, **kwargs)
        return self._method.generate(self, *args, **kwargs)

    def _mixed_batch(self, adapter_names, args, kwargs, forward: bool):
        """The method's mixed-batch context for the rows of ``idx`` (the first argument)."""
        hook = getattr(self._method, "mixed_batch", None)
        if hook is None:
            raise TypeError(f"adapter_names (mixed-adapter batches) works with LoRA adapters only; this model's "
                            f"adapters are {self.peft_type}: run one adapter at a time with set_adapter()")
        idx = args[0] if args else kwargs.get("idx")
        if idx is None or len(getattr(idx, "shape", ())) < 1:
            raise ValueError("adapter_names needs the token ids idx (B, T) as the first argument")
        return hook(self, adapter_names, int(idx.shape[0]), forward=forward)

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

    def disable_adapter(self):
        """``with model.disable_adapter(): ...`` runs the base model alone (forward and ``generate``).

        ``TypeError`` at once for methods that train the base in place (``PeftMethod.check_disable``).
        """
        self._method.check_disable(self)
        return self._adapters_disabled()

    @contextlib.contextmanager
    def _adapters_disabled(self):
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
        """New adapter ``adapter_name`` combining ``adapters`` with ``weights`` (peft's; LoRA and (IA)³).

        LoRA takes every peft ``combination_type`` -- "svd", "linear", "cat", "ties", "ties_svd",
        "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
        "magnitude_prune_svd" -- with ``density``, ``majority_sign_method``, ``svd_rank``,
        ``svd_clamp``, and ``seed`` / ``dare_masks`` for DARE's random masks (merge.py).
        """
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
        if with_bias:  # the base biases the adapter trains, under their own names
            biases = trained_biases(self, self.peft_config[a], a)
            out += [(n, n, biases[n]) for n in sorted(biases)]
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


__all__ = ["TunerModel", "PeftModel", "get_peft_model", "check_not_wrapped", "method_for"]
