"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (arXiv 2205.05638, §3.3).

The paper rescales three activations per block with learned vectors initialized to ones
(methods.md §9):

    Attention = softmax(Q (l_k ⊙ K)^T / sqrt(d_k)) (l_v ⊙ V)        FFN = (l_ff ⊙ γ(W1 x)) W2

peft (``tuners/ia3/``), which this module follows so files move both ways, expresses it
per wrapped Linear with one ``ia3_l`` vector (peft-format.md §4.5):

* an ordinary target scales its **output**: ``y = (W x + b) ⊙ l``, ``ia3_l`` shape (out, 1);
* a feed-forward target (``feedforward_modules``) scales its **input**:
  ``y = W (x ⊙ l) + b``, ``ia3_l`` shape (1, in). For GPT-2's ``mlp.c_proj`` that input is
  the GELU output, i.e. the paper's l_ff.

GPT-2's peft defaults are ``target_modules=["c_attn", "mlp.c_proj"]`` with
``feedforward_modules=["mlp.c_proj"]``: 12 x (2304 + 3072) = 64,512 parameters on GPT-2
small. **Difference from the paper**: ``c_attn`` is the fused Q|K|V projection, so peft
scales Q too. ``paper_kv_only=True`` (minipeft only) keeps the Q third fixed at 1 and
trains only the K and V scales of ``c_attn``: ``ia3_l`` is then (2C, 1) for ``c_attn``,
which peft cannot load (its config key is written only when True).

**Merging** (exact, multiplicative, peft's ``IA3Layer.merge``): with ``W`` (out, in) as
minipeft stores it, an output scale multiplies the **rows** of W and the bias,
``W' = l ⊙ W`` (l as (out, 1)), ``b' = l ⊙ b``; an input scale multiplies the **columns**
of W and leaves the bias alone (``W (x ⊙ l) = (W ⊙ l^T) x``). Unmerging divides again
(peft adds 1e-8 to l before dividing; minipeft divides by l exactly, so a zero scale
cannot be unmerged: merging one warns). In peft's GPT-2 Conv1D layout (in, out) the same
operation is ``weight * ia3_l.T``; the saved vector is the same either way.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..backend import xp_of
from ..engine import Tensor, no_grad
from ..nn import Parameter, ParameterDict
from .config import PeftConfig
from .layer import BaseTunerLayer, param_dtype_xp
from .method import PeftMethod, Recipe, register


@dataclass
class IA3Config(PeftConfig):
    """peft's ``IA3Config`` (fields and defaults of peft 0.21), plus minipeft's ``paper_kv_only``."""

    peft_type = "IA3"
    default_target_modules = ["c_attn", "mlp.c_proj"]
    default_feedforward_modules = ["mlp.c_proj"]  # peft's GPT-2 default

    feedforward_modules: list[str] | str | None = None  # targets whose INPUT is scaled; None: GPT-2 default
    fan_in_fan_out: bool = False  # True only for (in, out) weights; minipeft's Linear is (out, in)
    init_ia3_weights: bool = True  # True: all ones (identity); False: N(0, 1) (debugging only, as peft)
    paper_kv_only: bool = False  # minipeft only: on c_attn scale K and V but not Q (the paper's placement)

    def __post_init__(self) -> None:
        super().__post_init__()
        ff = self.feedforward_modules
        if isinstance(ff, (set, tuple)):
            ff = self.feedforward_modules = sorted(ff) if isinstance(ff, set) else list(ff)
        if ff is not None and not isinstance(ff, str) and not (
                isinstance(ff, list) and all(isinstance(s, str) for s in ff)):
            raise TypeError(f"feedforward_modules must be a list of module names, a regex or None, got {ff!r}")
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as e:
                raise ValueError(f"feedforward_modules={ff!r} is not a valid regular expression: {e}") from e
        tm = self.target_modules
        if isinstance(ff, list) and isinstance(tm, list) and not set(ff) <= set(tm):
            raise ValueError(f"feedforward_modules {ff} must be a subset of target_modules {tm} (as peft requires): "
                             "a feed-forward module is a target whose input is scaled")
        for k in ("fan_in_fan_out", "init_ia3_weights", "paper_kv_only"):
            if not isinstance(getattr(self, k), bool):
                raise TypeError(f"{k} must be True or False, got {getattr(self, k)!r}")

    def is_feedforward(self, name: str) -> bool:
        """peft's ``_check_target_module_feedforward``: regex fullmatch, or a plain suffix match."""
        ff = self.feedforward_modules
        if ff is None:
            ff = self.default_feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, name) is not None
        return any(name.endswith(k) for k in ff)

    def to_dict(self) -> dict:
        d = super().to_dict()
        if not self.paper_kv_only:  # peft warns about unknown keys: write it only when it matters
            d.pop("paper_kv_only")
        return d


class IA3Layer(BaseTunerLayer):
    """A Linear whose output (or, for a feed-forward target, input) is rescaled by ``ia3_l``.

    ``is_feedforward`` is a property of the layer (shared by its adapters, as in peft).
    ``kv_only[adapter]``: the adapter's vector covers only the last two thirds of the
    output (K and V of a fused Q|K|V projection); the Q third is scaled by a constant 1.
    """

    adapter_layer_names = ("ia3_l",)
    other_param_names = ("kv_only",)

    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        self.ia3_l = ParameterDict()
        self.kv_only: dict[str, bool] = {}
        self.is_feedforward: bool | None = None  # fixed by the first adapter

    def update_layer(self, adapter_name: str, config: IA3Config, rng, name: str = "", **ctx) -> None:
        ff = config.is_feedforward(name)
        if self.is_feedforward is not None and ff != self.is_feedforward:
            kind = "feed-forward" if self.is_feedforward else "output-scaling"
            raise ValueError(f"{name or 'this layer'} is already an (IA)³ {kind} target; every adapter must "
                             "treat it the same way (use the same feedforward_modules)")
        kv_only = bool(config.paper_kv_only and not ff and name.endswith("c_attn"))
        if kv_only and self.out_features % 3:
            raise ValueError(f"paper_kv_only needs a fused Q|K|V projection (out = 3C), but {name} has "
                             f"out_features={self.out_features}")
        n = self.in_features if ff else (2 * self.out_features // 3 if kv_only else self.out_features)
        shape = (1, n) if ff else (n, 1)  # peft's shapes: (1, in) scales the input, (out, 1) the output
        dtype, xp = param_dtype_xp(self.base_layer)
        init = np.ones(shape) if config.init_ia3_weights else rng.standard_normal(shape)
        self.is_feedforward = ff
        self.kv_only[adapter_name] = kv_only
        self.ia3_l[adapter_name] = Parameter.from_numpy(init, dtype, xp)

    # ---- maths
    def scale(self, adapter: str) -> Tensor:
        """The full scale vector of ``adapter``: (out, 1), or (1, in) for a feed-forward layer."""
        lvec = self.ia3_l[adapter]
        if not self.kv_only[adapter]:
            return lvec
        xp = xp_of(lvec.data)
        q_ones = Tensor(xp.ones((self.out_features // 3, 1), dtype=lvec.dtype))  # Q's scale, fixed
        return F.concatenate([q_ones, lvec], axis=0)  # (3C, 1)

    def forward(self, x, *args, **kwargs):
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.ia3_l]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        s = self.scale(active[0]).reshape(-1)  # (in,) or (out,)
        for a in active[1:]:  # several active adapters multiply, as in peft
            s = s * self.scale(a).reshape(-1)
        if self.is_feedforward:
            return self.base_layer(x * s, *args, **kwargs)  # (..., in) -> (..., out)
        return self.base_layer(x, *args, **kwargs) * s  # (..., out)

    def get_delta_weight(self, adapter: str) -> Tensor:
        raise TypeError("(IA)³ is a multiplicative rescaling, not an additive weight delta; "
                        "use merge() (W * l) instead")

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Fold the scales into the base: rows of W and b (output scale) or columns of W (input scale)."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        bias = getattr(self.get_base_layer(), "bias", None)
        with no_grad():
            for a in names:
                if a not in self.ia3_l or a in self.merged_adapters:
                    continue
                s = self.scale(a).data  # (out, 1) or (1, in)
                xp = xp_of(s)
                w0 = self.base_weight()
                w = w0 * s.astype(w0.dtype)  # rows (output scale) or columns (input scale) of W
                new_bias = None if self.is_feedforward or bias is None else bias.data * s.reshape(-1)
                if safe_merge and not (bool(xp.isfinite(w).all()) and (
                        new_bias is None or bool(xp.isfinite(new_bias).all()))):
                    raise ValueError(f"merging adapter {a!r} gives non-finite weights; the adapter is broken")
                if bool((s == 0).any()):
                    warnings.warn(f"(IA)³ adapter {a!r} has zero scales: merging it cannot be undone by unmerge()",
                                  stacklevel=2)
                self.set_base_weight(w)
                if new_bias is not None:
                    bias.data = new_bias.astype(bias.dtype)
                self.merged_adapters.append(a)

    def unmerge(self) -> None:
        """Divide every merged adapter out again, last merged first."""
        bias = getattr(self.get_base_layer(), "bias", None)
        with no_grad():
            while self.merged_adapters:
                a = self.merged_adapters.pop()
                s = self.scale(a).data
                w = self.base_weight()
                self.set_base_weight(w / s.astype(w.dtype))
                if not self.is_feedforward and bias is not None:
                    bias.data = (bias.data / s.reshape(-1)).astype(bias.dtype)

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}, " + super().extra_repr()


@register
class IA3Method(PeftMethod):
    config_class = IA3Config
    layer_class = IA3Layer
    recipes = (Recipe("ia3", "(IA)^3", "additive: adapters",  # K, V and the MLP's hidden units, as the paper
                      lambda n_layer, n_embd: IA3Config(paper_kv_only=True), lr=1e-1),)

    @classmethod
    def prepare_config(cls, config: IA3Config) -> IA3Config:
        config = super().prepare_config(config)
        if config.feedforward_modules is None:  # peft fills it from its per-architecture table
            config.feedforward_modules = list(config.default_feedforward_modules)
        return config

    @classmethod
    def find_targets(cls, model, config):
        found = super().find_targets(model, config)
        if config.paper_kv_only and not any(n.endswith("c_attn") and not config.is_feedforward(n) for n, _ in found):
            raise ValueError("paper_kv_only=True restricts the scale of the fused 'c_attn' projection, but no "
                             f"c_attn is an output-scaling target (targets: {[n for n, _ in found][:6]}...)")
        return found

    @classmethod
    def add_weighted_adapter(cls, peft_model, adapters, weights, adapter_name, combination_type="linear", **kw):
        """peft's ``IA3Model.add_weighted_adapter``: the new vector is ``Σ w_i l_i`` per layer."""
        if kw or combination_type not in ("linear", "svd"):  # peft's IA3 has no combination types
            raise TypeError(f"(IA)³ combines adapters only as a weighted sum; unexpected {combination_type!r} {kw}")
        cfgs = peft_model.peft_config
        if adapter_name in cfgs:
            raise ValueError(f"adapter {adapter_name!r} already exists; choose a new name")
        missing = [a for a in adapters if a not in cfgs]
        if missing or not adapters or len(weights) != len(adapters):
            raise ValueError(f"need known adapters and one weight each; unknown {missing}, "
                             f"{len(adapters)} adapters, {len(weights)} weights")
        if len({cfgs[a].paper_kv_only for a in adapters}) > 1:
            raise ValueError("cannot combine adapters with different paper_kv_only settings")
        tms, ffs = [cfgs[a].target_modules for a in adapters], [cfgs[a].feedforward_modules for a in adapters]
        if all(isinstance(t, list) for t in tms + ffs):
            targets, ff = sorted({t for tm in tms for t in tm}), sorted({t for f in ffs for t in f})
        elif all(isinstance(t, str) for t in tms + ffs):
            targets, ff = "|".join(f"({t})" for t in tms), "|".join(f"({f})" for f in ffs)
        else:
            raise ValueError("all adapters must give target_modules and feedforward_modules the same way "
                             "(all lists or all regexes)")
        new_cfg = dataclasses.replace(cfgs[adapters[0]], target_modules=targets, feedforward_modules=ff,
                                      init_ia3_weights=True)
        with no_grad():
            for name, layer in peft_model.get_base_model().named_modules():
                here = [(a, w) for a, w in zip(adapters, weights)
                        if isinstance(layer, IA3Layer) and a in layer.ia3_l]
                if not here:
                    continue
                layer.update_layer(adapter_name, new_cfg, np.random.default_rng(0), name=name)
                new = layer.ia3_l[adapter_name]
                new.data = sum(w * layer.ia3_l[a].data for a, w in here).astype(new.dtype)
        peft_model.peft_config[adapter_name] = new_cfg
        peft_model._refresh_trainable()


__all__ = ["IA3Config", "IA3Layer", "IA3Method"]
