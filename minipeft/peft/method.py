"""The method registry: ``PeftMethod`` (one method's hooks), ``@register``, and the method table.

A method is a ``PeftMethod`` subclass naming its config class (and, for methods that
wrap layers, its ``BaseTunerLayer`` class). ``@register`` files it under its config's
``peft_type``: that one dict, ``REGISTRY``, is what ``get_peft_model`` dispatches on and
what ``PeftConfig.from_dict`` reads an ``adapter_config.json`` with.

Every hook has a default that suits layer-wrapping methods (LoRA and kin); a method
overrides only what it changes. See ``minipeft/peft/README.md`` for the walk-through
of adding a method (its own file plus one import line).

A method may declare ``recipes``: the rows it adds to the **method table**
(``method_table()``), i.e. how the course runs it (label, family, config for a GPT of a
given shape, peak learning rate, and the memory calculator's model of it). The lessons'
comparison, the memory predictions next to it and the tests' list of methods all read
that table, so a new method with a recipe joins them with no edit elsewhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

from ..engine import Tensor
from ..nn import Module
from .layer import BaseTunerLayer, describe_modules, is_linear_like, walk

#: peft_type -> method class; filled by ``@register``. The only registry of methods and configs.
REGISTRY: dict[str, type["PeftMethod"]] = {}

#: Every linear layer of a GPT-2 block (the course's recipes adapt them all).
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
#: The course's taxonomy (Lialin et al., arXiv 2303.15647), in the order the method table lists it.
FAMILIES = ("full", "selective", "reparameterization", "additive: adapters", "additive: soft prompts")


@dataclass(frozen=True)
class Recipe:
    """One row of the method table: how the course runs a method.

    ``config(n_layer, n_embd)`` builds the ``PeftConfig`` for a GPT of that shape;
    ``memory(n_layer, n_embd)`` gives the fields of the memory calculator's
    ``minipeft.memory.MethodConfig`` that model it (its ``method`` is one of
    ``minipeft.memory.METHODS``), or is None where the calculator has no model of it.
    """

    name: str  # the key lessons and tests use ("lora", "rslora")
    label: str  # how reports print it ("LoRA r=8")
    family: str  # one of FAMILIES
    config: Callable  # (n_layer, n_embd) -> PeftConfig
    lr: float  # peak learning rate: the peft_methods lesson's sweep (tiny base, 300 steps, see that lesson)
    memory: Callable | None = None  # (n_layer, n_embd) -> dict of memory.MethodConfig fields, or None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"recipe {self.name!r}: family {self.family!r} is not one of {FAMILIES}")


def register(method: type["PeftMethod"]) -> type["PeftMethod"]:
    """Class decorator: file ``method`` under its config's ``peft_type`` (``get_peft_model``, ``from_dict``)."""
    ptype = getattr(method.config_class, "peft_type", None)
    if not ptype:
        raise TypeError(f"{method.__name__}.config_class must be a PeftConfig subclass with a peft_type, "
                        f"got {method.config_class!r}")
    if REGISTRY.get(ptype, method) is not method:
        raise ValueError(f"peft_type {ptype!r} is registered already (by {REGISTRY[ptype].__name__}); "
                         "give the new config another peft_type")
    names = [r.name for m in REGISTRY.values() if m is not method for r in m.recipes]
    clash = [r.name for r in method.recipes if r.name in names]
    if clash:
        raise ValueError(f"{method.__name__}: recipe names {clash} are in the method table already")
    method.peft_type = ptype
    REGISTRY[ptype] = method
    return method


def method_table() -> dict[str, Recipe]:
    """Every registered method's recipes by name, ordered by ``FAMILIES`` and then registration."""
    rows = [r for m in REGISTRY.values() for r in m.recipes]
    return {r.name: r for r in sorted(rows, key=lambda r: FAMILIES.index(r.family))}


def trained_biases(peft_model, config, adapter_name: str) -> dict[str, Tensor]:
    """The base biases an adapter trains and saves (peft's ``bias``), by in-memory name.

    ``"none"``: none; ``"all"``: every base parameter named ``*.bias``; ``"<method>_only"``
    (``lora_only``, ``vera_only``): the biases of the layers the adapter wraps.
    """
    bias = getattr(config, "bias", "none")
    if bias == "none":
        return {}
    if bias == "all":
        return {n: p for n, p in peft_model.base_named_parameters().items() if n.rsplit(".", 1)[-1] == "bias"}
    return {f"{n}.base_layer.bias": m.get_base_layer().bias for n, m in peft_model.named_modules()
            if isinstance(m, BaseTunerLayer) and adapter_name in m.adapter_names
            and getattr(m.get_base_layer(), "bias", None) is not None}


class PeftMethod:
    """One PEFT method's hooks; subclass, set the class attributes, decorate with ``@register``.

    Every hook has a default that suits layer-wrapping methods (LoRA and kin); methods
    that add model-level state (VeRA's shared projections, prompt/prefix tuning, side
    tuning) override ``prepare``/``find_targets``/``forward``/``extra_adapter_state``/
    ``set_adapter``/``delete_adapter``, and ``generation_kwargs`` or ``generate``.
    """

    peft_type: ClassVar[str] = ""  # set by @register from config_class.peft_type
    config_class: ClassVar[type | None] = None  # the PeftConfig subclass of this method
    layer_class: ClassVar[type[BaseTunerLayer] | None] = None  # the wrapper of each target (None: wraps nothing)
    #: False for methods whose change is not a weight delta (prompt/prefix tuning, bottleneck adapters)
    mergeable: ClassVar[bool] = True
    #: the rows this method adds to the method table (method_table())
    recipes: ClassVar[tuple[Recipe, ...]] = ()
    #: None, or a classmethod (peft_model) -> extra GPT.generate/forward arguments (prompt, prefix)
    generation_kwargs: ClassVar[Callable | None] = None

    # ---- adding an adapter (get_peft_model / add_adapter call these in this order)
    @classmethod
    def prepare_config(cls, config):
        """A copy of ``config`` with defaults filled in (GPT-2's target modules)."""
        if config.target_modules is None and config.default_target_modules is not None:
            return dataclasses.replace(config, target_modules=list(config.default_target_modules))
        return dataclasses.replace(config)

    @classmethod
    def check_new_adapter(cls, peft_model, config, adapter_name: str) -> None:
        """Raise if ``config`` conflicts with the adapters already there."""

    @classmethod
    def can_wrap(cls, module: Module) -> bool:
        return (cls.layer_class is not None and isinstance(module, cls.layer_class)) or is_linear_like(module)

    @classmethod
    def find_targets(cls, model: Module, config) -> list[tuple[str, Module]]:
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
    def prepare(cls, peft_model, config, adapter_name: str, targets) -> None:
        """Model-level setup before the targets are wrapped (VeRA's shared A, B; a prompt encoder)."""

    @classmethod
    def wrap(cls, module: Module, name: str, config, adapter_name: str, rng, tuner_model) -> Module:
        """Add ``adapter_name`` to ``module``: wrap a plain module, or extend an existing wrapper."""
        layer = module if isinstance(module, cls.layer_class) else cls.layer_class(module)
        layer.update_layer(adapter_name, config, rng, name=name, tuner_model=tuner_model)
        return layer

    @classmethod
    def mark_trainable(cls, peft_model, config, adapter_name: str) -> None:
        """Extra trainability after the adapter weights: the base biases ``trained_biases`` chooses."""
        for n, p in peft_model.base_named_parameters().items():
            if n.rsplit(".", 1)[-1] == "bias":
                p.requires_grad = False
        for p in trained_biases(peft_model, config, adapter_name).values():
            p.requires_grad = not config.inference_mode

    # ---- running
    @classmethod
    def forward(cls, peft_model, *args, **kwargs):
        return peft_model.base_model(*args, **kwargs)

    @classmethod
    def generate(cls, peft_model, *args, **kwargs):
        """``PeftModel.generate``: the base model's ``generate`` plus ``generation_kwargs`` (none when disabled).

        Methods inside the model's layers need nothing more; prompt and prefix tuning
        supply their prompt through ``generation_kwargs``; a method whose forward cannot
        run with a key/value cache (side tuning) overrides this hook.
        """
        if cls.generation_kwargs is not None and not peft_model._disabled:
            extra = cls.generation_kwargs(peft_model)
            clash = [k for k in extra if kwargs.get(k) is not None]
            if clash:
                raise ValueError(f"{cls.peft_type} supplies {clash} itself; do not pass them to generate()")
            kwargs.update(extra)
        return peft_model.get_base_model().generate(*args, **kwargs)

    @classmethod
    def check_disable(cls, peft_model) -> None:
        """Raise if ``disable_adapter()`` cannot give the base model back (methods that train it in place)."""

    # ---- model-level state
    @classmethod
    def extra_adapter_state(cls, peft_model, adapter_name: str) -> list[tuple[str, str, Tensor]]:
        """Model-level tensors of an adapter: (in-memory key, peft on-disk key, Tensor)."""
        return []

    @classmethod
    def set_adapter(cls, peft_model, adapter_name: str, inference_mode: bool) -> None:
        """Trainability of model-level state when ``adapter_name`` becomes active."""

    @classmethod
    def delete_adapter(cls, peft_model, adapter_name: str) -> None:
        """Remove model-level state of ``adapter_name``."""

    @classmethod
    def add_weighted_adapter(cls, peft_model, adapters, weights, adapter_name, combination_type, **kw) -> None:
        raise TypeError(f"add_weighted_adapter is not supported for {cls.peft_type} (only LORA and IA3)")


__all__ = ["REGISTRY", "register", "PeftMethod", "Recipe", "method_table", "trained_biases", "BLOCK_LINEARS",
           "FAMILIES"]
