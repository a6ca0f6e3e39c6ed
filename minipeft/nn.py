"""Modules: parameters and submodules by attribute, like a small ``torch.nn``.

``Module`` registers every ``Parameter``/``Module`` assigned to it, so
``named_parameters()`` and ``state_dict()`` give the dotted names PEFT methods and
Hugging Face checkpoints use (``transformer.h.0.attn.c_attn.weight``).
``get_submodule``/``set_submodule`` are how a PEFT method swaps a layer for its wrapper.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator

import numpy as np

from . import amp
from .amp_layernorm import layer_norm_output_16bit
from . import functional as F
from . import init  # noqa: F401  (nn.init.kaiming_uniform ..., as torch.nn.init)
from .backend import get_xp, resolve_device, to_device
from .engine import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer may train (requires grad by default)."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data.data if isinstance(data, Tensor) else data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter" + super().__repr__()[6:]

    @classmethod
    def from_numpy(cls, array, dtype=np.float32, xp=np) -> "Parameter":
        """A Parameter holding the host ``array`` (e.g. an ``init`` draw) as ``dtype`` on ``xp``'s device."""
        return cls(xp.asarray(np.asarray(array, dtype=dtype)))


class Module:
    """Base class: assign Parameters and Modules as attributes; write ``forward``."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value) -> None:
        params = self.__dict__.get("_parameters")
        if params is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        # replacing keeps the name's position (ModuleList order, state_dict order)
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            self._modules[name] = value
        else:
            params.pop(name, None)
            self._modules.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- traversal
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator["Module"]:
        yield from self._modules.values()

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) pairs; a parameter shared by two modules appears once."""
        seen: set[int] = set()
        mods = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mname, m in mods:
            for pname, p in m._parameters.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def get_submodule(self, target: str) -> "Module":
        """The module at dotted path ``target`` ('' is self); KeyError says what exists."""
        if target == "":
            return self
        mod: Module = self
        for part in target.split("."):
            if part not in mod._modules:
                raise KeyError(
                    f"no submodule {target!r}: {type(mod).__name__} has children {list(mod._modules)}"
                )
            mod = mod._modules[part]
        return mod

    def set_submodule(self, target: str, module: "Module") -> None:
        """Replace the module at dotted path ``target`` (how PEFT layers are swapped in)."""
        if not isinstance(module, Module):
            raise TypeError(f"set_submodule needs a Module, got {type(module).__name__}")
        parent_name, _, name = target.rpartition(".")
        parent = self.get_submodule(parent_name)
        if name not in parent._modules:
            raise KeyError(f"no submodule {target!r} to replace")
        setattr(parent, name, module)

    # ---- modes and devices
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device: str) -> "Module":
        """Move every parameter (in place, keeping tied parameters tied)."""
        device = resolve_device(device)
        for p in self.parameters():
            p.data = to_device(p.data, device)
            if p.grad is not None:
                p.grad = to_device(p.grad, device)
        for m in self.modules():
            m._moved_to(device)
        return self

    def _moved_to(self, device: str) -> None:
        """Hook for modules that hold non-parameter arrays (quantized weights, caches)."""

    @property
    def device(self) -> str:
        p = next(self.parameters(), None)
        return "cpu" if p is None else p.device

    # ---- state
    def state_dict(self) -> "OrderedDict[str, object]":
        """Name -> array for every parameter and extra state (buffers, quantized codes)."""
        out: OrderedDict[str, object] = OrderedDict()
        for name, p in self.named_parameters():
            out[name] = p.data
        for mname, m in self.named_modules():
            for k, arr in m._extra_state().items():
                out[f"{mname}.{k}" if mname else k] = arr
        return out

    def _extra_state(self) -> dict:
        """Non-parameter arrays a module wants saved (e.g. 4-bit codes and absmax)."""
        return {}

    def _load_extra_state(self, state: dict) -> None:
        if state:
            raise KeyError(f"{type(self).__name__} has no extra state but got {sorted(state)}")

    def load_state_dict(self, state: dict, strict: bool = True) -> tuple[list, list]:
        """Copy arrays into parameters by name, checking names and shapes first.

        With ``strict`` any missing or unexpected key or shape mismatch raises one
        ``ValueError`` that lists them all, and nothing is changed.
        """
        own = dict(self.named_parameters())
        extra_owners = {}
        for mname, m in self.named_modules():
            for k in m._extra_state():
                extra_owners[f"{mname}.{k}" if mname else k] = (m, k)
        expected = set(own) | set(extra_owners)
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        mismatched = []
        for name, p in own.items():
            if name in state and tuple(np.shape(state[name])) != p.shape:
                mismatched.append(f"{name}: checkpoint {tuple(np.shape(state[name]))} vs model {p.shape}")
        if mismatched or (strict and (missing or unexpected)):
            lines = []
            if missing:
                lines.append(f"missing keys ({len(missing)}): {missing[:20]}")
            if unexpected:
                lines.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
            if mismatched:
                lines.append(f"shape mismatches ({len(mismatched)}): {mismatched[:20]}")
            raise ValueError("load_state_dict failed (model unchanged):\n  " + "\n  ".join(lines))
        for name, p in own.items():
            if name in state:
                arr = to_device(state[name], p.device)
                p.data = arr.astype(p.dtype, copy=True) if arr.dtype != p.dtype else arr.copy()
        per_module: dict[int, tuple[Module, dict]] = {}
        for name, (m, k) in extra_owners.items():
            if name in state:
                per_module.setdefault(id(m), (m, {}))[1][k] = state[name]
        for m, sub in per_module.values():
            m._load_extra_state(sub)
        return missing, unexpected

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class ModuleList(Module):
    """A list of modules registered under '0', '1', ... (GPT-2's ``transformer.h.{i}``)."""

    def __init__(self, modules=()) -> None:
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, m: Module) -> None:
        setattr(self, str(len(self._modules)), m)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(list(self._modules.values()))


def _rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


class Linear(Module):
    """y = x W^T + b with W of shape (out_features, in_features), like ``torch.nn.Linear``.

    Default init is PyTorch's: U(-1/sqrt(in), 1/sqrt(in)) for W and b.

    ``output_16bit``: under a 16-bit ``amp.autocast``, write the product in the compute dtype (its
    float32 sums rounded once, :func:`minipeft.amp.linear_output_16bit`) rather than float32. Only for a
    layer whose consumer reads 16 bits: GPT's ``lm_head``, whose loss widens its logits itself. The
    other layers feed float32 ops (bias, GELU, layer norm, the residual stream) and keep False.
    """

    output_16bit = False  # see the class docstring; set per layer (GPT sets it on lm_head)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None, dtype=np.float32,
                 device: str | None = None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear needs positive sizes, got in={in_features}, out={out_features}")
        self.in_features, self.out_features = in_features, out_features
        r = _rng(rng)
        bound = 1.0 / math.sqrt(in_features)
        xp = get_xp(device or "cpu")
        self.weight = Parameter(xp.asarray(r.uniform(-bound, bound, (out_features, in_features)).astype(dtype)))
        self.bias = Parameter(xp.asarray(r.uniform(-bound, bound, out_features).astype(dtype))) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.output_16bit:
            return amp.linear_output_16bit(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    @classmethod
    def from_weight(cls, weight, bias=None) -> "Linear":
        """A Linear holding ``weight`` (out, in) and ``bias`` (out,) as given, with no random init.

        PEFT methods build their layers this way (LoRA's A and B, an adapter's projections):
        they draw the weights themselves from the adapter's seed.
        """
        weight = weight if isinstance(weight, Parameter) else Parameter(weight)
        lin = cls(1, 1, bias=bias is not None, rng=0)  # a cheap shell; the tensors are set below
        lin.out_features, lin.in_features = weight.shape
        lin.weight = weight
        if bias is not None:
            lin.bias = bias if isinstance(bias, Parameter) else Parameter(bias)
        return lin


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, rng=None, dtype=np.float32, std: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter((_rng(rng).standard_normal((num_embeddings, embedding_dim)) * std).astype(dtype))

    def forward(self, idx) -> Tensor:
        return F.embedding(idx, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    @classmethod
    def from_weight(cls, weight) -> "Embedding":
        """An Embedding whose table is ``weight`` (num_embeddings, embedding_dim), with no random init."""
        weight = weight if isinstance(weight, Parameter) else Parameter(weight)
        emb = cls(1, 1, rng=0)  # a cheap shell; the table is set below
        emb.num_embeddings, emb.embedding_dim = weight.shape
        emb.weight = weight
        return emb


class LayerNorm(Module):
    def __init__(self, n: int, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(np.ones(n, dtype=dtype))
        self.bias = Parameter(np.zeros(n, dtype=dtype))

    def forward(self, x: Tensor, output_16bit: bool = False) -> Tensor:
        """``output_16bit``: under a 16-bit ``amp.autocast``, write the result in the compute dtype, for a
        consumer that reads 16 bits anyway (:mod:`minipeft.amp_layernorm`; GPT asks for it so)."""
        if output_16bit:
            return layer_norm_output_16bit(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Dropout(Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ModuleDict(Module):
    """Modules by string key (peft keeps one LoRA A/B per adapter name: ``lora_A.default``)."""

    def __init__(self, modules: dict | None = None) -> None:
        super().__init__()
        for k, m in (modules or {}).items():
            self[k] = m

    def __setitem__(self, key: str, m: Module) -> None:
        setattr(self, key, m)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __delitem__(self, key: str) -> None:
        delattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self):
        return list(self._modules.keys())

    def items(self):
        return list(self._modules.items())

    def values(self):
        return list(self._modules.values())

    def __iter__(self):
        return iter(list(self._modules.keys()))


class ParameterDict(Module):
    """Parameters by string key ((IA)³ keeps ``ia3_l.<adapter>``)."""

    def __setitem__(self, key: str, p: Parameter) -> None:
        if not isinstance(p, Parameter):
            raise TypeError(f"ParameterDict holds Parameters, got {type(p).__name__}")
        setattr(self, key, p)

    def __getitem__(self, key: str) -> Parameter:
        return self._parameters[key]

    def __delitem__(self, key: str) -> None:
        delattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self._parameters

    def __len__(self) -> int:
        return len(self._parameters)

    def keys(self):
        return list(self._parameters.keys())

    def items(self):
        return list(self._parameters.items())

    def __iter__(self):
        return iter(list(self._parameters.keys()))
