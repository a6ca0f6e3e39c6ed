"""PEFT configs: flat dataclasses that serialize to peft's ``adapter_config.json``.

Every method's config subclasses ``PeftConfig`` and sets the class attribute
``peft_type`` ("LORA", "LOHA", ...). Field names and defaults are Hugging Face peft's
(``src/peft/config.py``, ``src/peft/tuners/<method>/config.py``; see
``shared/reference/peft-format.md`` §3), so ``to_dict()`` is what peft writes and
``PeftConfig.from_dict(json.load(f))`` reads what peft wrote.

Target matching (peft's ``check_target_module_exists``), on the module's dotted name
inside the wrapped model (``transformer.h.0.attn.c_attn``):

* a **list** of names matches a module whose name equals an entry or ends with
  ``"." + entry`` (so ``"c_proj"`` matches ``attn.c_proj`` and ``mlp.c_proj``, while
  ``"mlp.c_proj"`` matches only the MLP's); ``layers_to_transform`` then keeps only the
  listed layer indices;
* a **string** is a regular expression matched with ``re.fullmatch`` against the name;
* ``exclude_modules`` (same two forms) and ``modules_to_save`` are never targets.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from .method import REGISTRY

#: Keys peft writes for bookkeeping that carry no meaning for minipeft; read and dropped.
_IGNORED_KEYS = ("peft_version",)


@dataclass
class PeftConfig:
    """Fields every PEFT method shares (peft's ``PeftConfig``), plus matching fields.

    Subclasses set ``peft_type`` and add their own fields; the method that registers the
    config (``@register``, method.py) is how ``from_dict`` finds it. ``seed`` is minipeft's own
    (runtime only, never written to JSON): adapter weights are drawn from
    ``numpy.random.default_rng([seed, crc32(module name)])`` so a given seed gives the
    same adapter on every run, whatever else is targeted.
    """

    peft_type: ClassVar[str | None] = None
    #: GPT-2's default targets for this method when ``target_modules`` is None (peft's constants.py).
    default_target_modules: ClassVar[list[str] | None] = None
    #: Fields a subclass does not write to JSON (e.g. prompt tuning has no target_modules).
    json_omit: ClassVar[tuple[str, ...]] = ()
    #: Fields peft has but minipeft does not implement: name -> the only value accepted on read.
    unsupported_fields: ClassVar[dict[str, Any]] = {}
    #: minipeft-only fields, never written to adapter_config.json.
    runtime_fields: ClassVar[tuple[str, ...]] = ("seed",)

    task_type: str | None = "CAUSAL_LM"  # GPT-2 language modelling
    base_model_name_or_path: str | None = None  # filled from the model's name when saving, if unset
    revision: str | None = None  # base model revision; peft writes null
    inference_mode: bool = False  # True: adapter weights frozen (peft writes true at save time)
    auto_mapping: dict | None = None  # only used by peft when task_type is None
    target_modules: list[str] | str | None = None  # names/suffixes, a regex, "all-linear", or None (GPT-2 default)
    exclude_modules: list[str] | str | None = None  # names/suffixes or a regex never to target
    modules_to_save: list[str] | None = None  # extra modules trained in full and saved whole (e.g. a new head)
    seed: int = 0  # minipeft only: seeds the adapter initialization (not saved)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NaN or inf in any number (lora_alpha, a dropout, alpha_pattern ...)
            v = getattr(self, f.name)
            if any(isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral) and not math.isfinite(x)
                   for x in (v.values() if isinstance(v, dict) else [v])):
                raise ValueError(f"{type(self).__name__}.{f.name} must be a finite number, got {v!r}")
        for name in ("rank_pattern", "alpha_pattern"):  # module-name pattern -> number (peft's)
            v = getattr(self, name, {})
            if v is None:
                setattr(self, name, {})
            elif not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, numbers.Real)
                                                    and not isinstance(x, bool) for k, x in v.items()):
                raise TypeError(f"{name} must map module-name patterns to numbers, e.g. {{'c_attn': 16}}; got {v!r}")
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if isinstance(v, (set, tuple)):
                v = sorted(v) if isinstance(v, set) else list(v)
                setattr(self, name, v)
            if v is not None and not isinstance(v, str) and not (
                isinstance(v, list) and all(isinstance(s, str) for s in v)
            ):
                raise TypeError(
                    f"{name} must be a list of module names, a regex string, or None; got {v!r}. "
                    f"Example: {name}=['c_attn'] or {name}=r'.*\\.attn\\.c_attn'"
                )
            if isinstance(v, str) and v != "all-linear":
                try:
                    re.compile(v)
                except re.error as e:
                    raise ValueError(f"{name}={v!r} is not a valid regular expression: {e}") from e
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(s, str) for s in self.modules_to_save):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    # ------------------------------------------------------------------ matching
    def is_excluded(self, name: str) -> bool:
        """True when ``name`` is in ``exclude_modules`` or inside a ``modules_to_save`` module."""
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, name):
                    return True
            elif _name_in(name, ex):
                return True
        for m in self.modules_to_save or ():
            if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name):
                return True
        return False

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` is a target (peft's semantics, see module doc).

        ``"all-linear"`` is resolved by ``PeftMethod.find_targets`` (it needs the module's type), not here.
        """
        if self.is_excluded(name):
            return False
        tm = self.target_modules
        if tm is None:
            tm = self.default_target_modules
        if tm is None:
            return False
        if isinstance(tm, str):
            return re.fullmatch(tm, name) is not None
        if name in tm:
            return True
        if not any(name.endswith("." + t) for t in tm):
            return False
        layers = getattr(self, "layers_to_transform", None)
        if layers is None or (isinstance(layers, list) and not layers):
            return True
        idx = layer_index(name, getattr(self, "layers_pattern", None))
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        """peft's ``adapter_config.json`` content: peft's field names, keys sorted.

        minipeft-only fields (``runtime_fields``) and ``json_omit`` fields are left out.
        """
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            if f.name in self.runtime_fields or f.name in self.json_omit:
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "PeftConfig":
        """Build the config ``d`` describes (its ``peft_type`` picks the registered method's config class).

        Unknown keys raise ``ValueError`` (``strict=False``: warn and drop them, as peft
        does). Keys peft has but minipeft does not implement are accepted only with
        their default value.
        """
        if not isinstance(d, dict):
            raise TypeError(f"from_dict needs a dict (the parsed adapter_config.json), got {type(d).__name__}")
        d = dict(d)
        ptype = d.pop("peft_type", None)
        target = cls
        if cls.peft_type is None:
            if ptype is None:
                raise ValueError("config has no 'peft_type'; expected one of " + ", ".join(sorted(REGISTRY)))
            if ptype not in REGISTRY:
                raise ValueError(
                    f"unknown peft_type {ptype!r}: minipeft implements {sorted(REGISTRY)}. "
                    "Is this an adapter for a method minipeft lacks?"
                )
            target = REGISTRY[ptype].config_class
        elif ptype is not None and ptype != cls.peft_type:
            raise ValueError(f"{cls.__name__}.from_dict got a config with peft_type {ptype!r}, "
                             f"expected {cls.peft_type!r}")
        for k in _IGNORED_KEYS:
            d.pop(k, None)
        names = {f.name for f in dataclasses.fields(target)}
        bad_values = []
        for k, default in target.unsupported_fields.items():
            if k in d:
                v = d.pop(k)
                if v != default and not (v in (None, {}, [], False) and default in (None, {}, [], False)):
                    bad_values.append(f"{k}={v!r} (minipeft supports only {default!r})")
        if bad_values:
            raise ValueError(f"{target.__name__}: unsupported settings: " + "; ".join(bad_values))
        unknown = sorted(set(d) - names)
        if unknown:
            msg = f"{target.__name__}: unknown fields {unknown}; known fields are {sorted(names)}"
            if strict:
                raise ValueError(msg + ". Pass strict=False to drop them with a warning (peft's behaviour).")
            warnings.warn(msg + "; dropped", stacklevel=2)
            for k in unknown:
                d.pop(k)
        return target(**d)


def _name_in(name: str, names: list[str]) -> bool:
    return name in names or any(name.endswith("." + t) for t in names)


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The block index in ``name`` (``transformer.h.3.attn.c_attn`` -> 3), as peft finds it."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for p in patterns:
        m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


def pattern_value(name: str, pattern: dict, default):
    """Per-module override from ``rank_pattern``/``alpha_pattern`` (peft: ``(.*\\.)?(key)$`` matches)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _jsonable(v):
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def check_dropout(name: str, p) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")


def check_rank(name: str, r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{name} must be a positive integer (the adapter rank), got {r!r}")


def check_layers(cfg) -> None:
    """Validate ``layers_to_transform``/``layers_pattern`` (shared by the LoRA family)."""
    lt = cfg.layers_to_transform
    if lt is not None and not isinstance(lt, int) and not (
        isinstance(lt, (list, tuple)) and all(isinstance(i, int) for i in lt)
    ):
        raise TypeError(f"layers_to_transform must be an int, a list of ints or None, got {lt!r}")
    if isinstance(lt, tuple):
        cfg.layers_to_transform = list(lt)
    if cfg.layers_pattern and lt is None:
        raise ValueError("layers_pattern only makes sense with layers_to_transform; set both or neither")
    if isinstance(cfg.target_modules, str) and lt is not None:
        raise ValueError("layers_to_transform cannot be used with a regex target_modules; put the index in the regex")


__all__ = ["PeftConfig", "layer_index", "pattern_value"]
