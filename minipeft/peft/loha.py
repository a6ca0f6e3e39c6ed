"""LoHa: low-rank Hadamard product (FedPara, arXiv 2108.06098; peft ``tuners/loha/layer.py``).

``ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha/r`` with W1a, W2a (out, r) and W1b, W2b (r, in):
rank(ΔW) <= r² for 2r(out + in) parameters. Init: W1a, W1b, W2a Kaiming-uniform(a=sqrt(5)),
**W2b = 0**, so ΔW = 0 at step 0. The forward builds ΔW and adds ``x ΔW^T`` to the base
output. ``HadaWeight`` is the fused op with peft's hand-written backward (G = dL/dΔW·scale):
dW1a = (G ⊙ W2) W1b^T, dW1b = W1a^T (G ⊙ W2), and symmetrically for W2a, W2b.

peft rejects GPT-2's ``Conv1D`` for LoHa, so these keys (``hada_w1_a`` ...) for GPT-2
have no peft counterpart; minipeft uses peft's names for its (out, in) Linear.
``LycorisLayer`` (shared with LoKr) adds peft's rank dropout (drop rows of ΔW, rescaled
by the kept fraction) and module dropout (skip the adapter for a whole step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import functional as F
from ..engine import Function, Tensor
from ..nn import ParameterDict
from ..random import generator
from .config import PeftConfig, check_dropout, check_layers, check_rank, pattern_value
from .lora import kaiming_uniform, new_param, param_dtype_xp
from .tuner import BaseTunerLayer, PeftMethod, register


@dataclass
class LoHaConfig(PeftConfig):
    """peft's ``LoHaConfig`` fields and defaults."""

    peft_type = "LOHA"
    default_target_modules = ["c_attn"]

    r: int = 8  # rank of each of the two factors
    alpha: float = 8  # scaling = alpha / r
    rank_dropout: float = 0.0  # probability of dropping a row of ΔW while training
    module_dropout: float = 0.0  # probability of skipping the adapter for a step while training
    use_effective_conv2d: bool = False  # conv-only option in peft; must stay False
    init_weights: bool = True  # True: W2b = 0 (identity at init); False: all random
    layers_to_transform: list[int] | int | None = None  # only these block indices
    layers_pattern: list[str] | str | None = None  # name of the block list (GPT-2: "h")
    rank_pattern: dict = field(default_factory=dict)  # module-name pattern -> r
    alpha_pattern: dict = field(default_factory=dict)  # module-name pattern -> alpha

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lycoris(self)


def check_lycoris(cfg) -> None:
    check_rank("r", cfg.r)
    for k, v in cfg.rank_pattern.items():
        check_rank(f"rank_pattern[{k!r}]", v)
    check_dropout("rank_dropout", cfg.rank_dropout)
    check_dropout("module_dropout", cfg.module_dropout)
    if cfg.use_effective_conv2d:
        raise ValueError("use_effective_conv2d applies to Conv2d only; minipeft has no convolutions (leave False)")
    check_layers(cfg)


class HadaWeight(Function):
    """``((w1a @ w1b) * (w2a @ w2b)) * scale`` with peft's memory-saving backward."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return ((w1a @ w1b) * (w2a @ w2b)) * scale  # (out, in)

    @staticmethod
    def backward(ctx, g):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g = g * g.dtype.type(ctx.scale)
        t = g * (w2a @ w2b)  # G ⊙ W2, (out, in)
        g1a = t @ w1b.T if needs[0] else None  # (out, r)
        g1b = w1a.T @ t if needs[1] else None  # (r, in)
        t = g * (w1a @ w1b)  # G ⊙ W1
        g2a = t @ w2b.T if needs[2] else None
        g2b = w2a.T @ t if needs[3] else None
        return g1a, g1b, g2a, g2b, None


class LycorisLayer(BaseTunerLayer):
    """Shared by LoHa and LoKr: the forward adds ``x ΔW^T``, with rank and module dropout."""

    rank_dropout_scale_default = True

    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}

    def _set_hparams(self, adapter_name, config, name) -> int:
        r = pattern_value(name, config.rank_pattern, config.r)
        alpha = pattern_value(name, config.alpha_pattern, config.alpha)
        check_rank("r", r)
        self.r[adapter_name], self.alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.rank_dropout_scale[adapter_name] = getattr(config, "rank_dropout_scale", self.rank_dropout_scale_default)
        return r

    def adapter_forward(self, x: Tensor, adapter: str, base_result: Tensor):
        rng = generator(x.device)
        if self.training and self.module_dropout[adapter] and float(rng.random()) < self.module_dropout[adapter]:
            return None  # module dropout: skip the adapter this step
        delta = self.get_delta_weight(adapter)  # (out, in)
        p = self.rank_dropout[adapter]
        if self.training and p:
            keep = (rng.random(self.out_features) > p).astype(delta.dtype)  # (out,) rows kept
            if self.rank_dropout_scale[adapter]:
                keep = keep / max(float(keep.mean()), 1e-12)
            delta = delta * keep[:, None]
        return F.linear(x, delta)


class LoHaLayer(LycorisLayer):
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout", "rank_dropout_scale")

    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_layer_names:
            setattr(self, attr, ParameterDict())

    def update_layer(self, adapter_name: str, config: LoHaConfig, rng, name: str = "", **ctx) -> None:
        r = self._set_hparams(adapter_name, config, name)
        dtype, xp = param_dtype_xp(self.base_layer)
        out, inp = self.out_features, self.in_features
        w1a, w1b = kaiming_uniform(rng, (out, r)), kaiming_uniform(rng, (r, inp))
        w2a = kaiming_uniform(rng, (out, r))
        w2b = np.zeros((r, inp)) if config.init_weights else kaiming_uniform(rng, (r, inp))
        for attr, w in zip(self.adapter_layer_names, (w1a, w1b, w2a, w2b)):
            getattr(self, attr)[adapter_name] = new_param(w, dtype, xp)

    def get_delta_weight(self, adapter: str) -> Tensor:
        return HadaWeight.apply(self.hada_w1_a[adapter], self.hada_w1_b[adapter], self.hada_w2_a[adapter],
                                self.hada_w2_b[adapter], self.scaling[adapter])


@register
class LoHaMethod(PeftMethod):
    peft_type = "LOHA"
    config_class = LoHaConfig
    layer_class = LoHaLayer


__all__ = ["LoHaConfig", "LoHaLayer", "LoHaMethod", "HadaWeight", "LycorisLayer", "check_lycoris"]
