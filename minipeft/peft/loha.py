"""LoHa: low-rank Hadamard product (FedPara, arXiv 2108.06098; peft ``tuners/loha/layer.py``).

``ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha/r`` with W1a, W2a (out, r) and W1b, W2b (r, in):
rank(ΔW) <= r² for 2r(out + in) parameters. Init: W1a, W1b, W2a Kaiming-uniform(a=sqrt(5)),
**W2b = 0**, so ΔW = 0 at step 0. The forward builds ΔW and adds ``x ΔW^T`` to the base
output. ``HadaWeight`` is the fused op with peft's hand-written backward (G = dL/dΔW·scale):
dW1a = (G ⊙ W2) W1b^T, dW1b = W1a^T (G ⊙ W2), and symmetrically for W2a, W2b.

peft rejects GPT-2's ``Conv1D`` for LoHa, so these keys (``hada_w1_a`` ...) for GPT-2
have no peft counterpart; minipeft uses peft's names for its (out, in) Linear.
``LycorisLayer`` (lycoris.py, shared with LoKr) adds peft's rank dropout and module dropout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..engine import Function, Tensor
from ..init import kaiming_uniform
from ..nn import Parameter, ParameterDict
from .config import PeftConfig
from .layer import param_dtype_xp
from .lycoris import LycorisLayer, check_lycoris
from .method import BLOCK_LINEARS, PeftMethod, Recipe, register


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
            getattr(self, attr)[adapter_name] = Parameter.from_numpy(w, dtype, xp)

    def get_delta_weight(self, adapter: str) -> Tensor:
        return HadaWeight.apply(self.hada_w1_a[adapter], self.hada_w1_b[adapter], self.hada_w2_a[adapter],
                                self.hada_w2_b[adapter], self.scaling[adapter])


@register
class LoHaMethod(PeftMethod):
    config_class = LoHaConfig
    layer_class = LoHaLayer
    recipes = (Recipe("loha", "LoHa r=4", "reparameterization",  # r=4: LoRA r=8's parameter count
                      lambda n_layer, n_embd: LoHaConfig(r=4, alpha=8, target_modules=list(BLOCK_LINEARS)), lr=3e-2),)


__all__ = ["LoHaConfig", "LoHaLayer", "LoHaMethod", "HadaWeight"]
