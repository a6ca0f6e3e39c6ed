"""LoKr: low-rank Kronecker product (LyCORIS, arXiv 2309.14859; peft ``tuners/lokr/layer.py``).

``ΔW = (alpha/r) · (W1 ⊗ W2)``. ``factorization(dim)`` splits out = out_l·out_k and
in = in_m·in_n into the divisor pair (m <= n) closest to sqrt(dim) (256 -> (16, 16),
128 -> (8, 16)); W1 is (out_l, in_m) and W2 is (out_k, in_n), so the Kronecker product
is (out, in). W2 is full when r >= max(out_k, in_n)/2, else ``w2_a @ w2_b`` of rank r;
W1 is full unless ``decompose_both`` and r < max(out_l, in_m)/2. rank(ΔW) = rank(W1)·rank(W2).

Init (peft ``init_weights=True``): **W1 (or w1_a) = 0**, the others Kaiming-uniform(a=sqrt(5)),
so ΔW = 0 at step 0. ``"lycoris"``: W2 (or w2_b) = 0 instead. peft rejects GPT-2's
``Conv1D`` for LoKr, so minipeft's GPT-2 LoKr keys (``lokr_w1`` ...) have no peft counterpart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import functional as F
from ..engine import Tensor
from ..init import kaiming_uniform
from ..nn import Parameter, ParameterDict
from .config import PeftConfig
from .layer import param_dtype_xp
from .lycoris import LycorisLayer, check_lycoris
from .method import BLOCK_LINEARS, PeftMethod, Recipe, register


@dataclass
class LoKrConfig(PeftConfig):
    """peft's ``LoKrConfig`` fields and defaults."""

    peft_type = "LOKR"
    default_target_modules = ["c_attn"]

    r: int = 8  # rank of the low-rank factors (when a factor is decomposed)
    alpha: float = 8  # scaling = alpha / r
    rank_dropout: float = 0.0  # probability of dropping a row of ΔW while training
    module_dropout: float = 0.0  # probability of skipping the adapter for a step while training
    use_effective_conv2d: bool = False  # conv-only option in peft; must stay False
    decompose_both: bool = False  # also factor W1 as w1_a @ w1_b
    decompose_factor: int = -1  # -1: factors near sqrt(dim); f > 0: f and dim/f when f divides dim
    rank_dropout_scale: bool = False  # rescale kept rows by 1/(kept fraction)
    init_weights: bool | str = True  # True: W1 = 0; "lycoris": W2 = 0; False: all random
    layers_to_transform: list[int] | int | None = None  # only these block indices
    layers_pattern: list[str] | str | None = None  # name of the block list (GPT-2: "h")
    rank_pattern: dict = field(default_factory=dict)  # module-name pattern -> r
    alpha_pattern: dict = field(default_factory=dict)  # module-name pattern -> alpha

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lycoris(self)
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if not isinstance(self.decompose_factor, int) or self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"decompose_factor must be -1 or a positive int, got {self.decompose_factor!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension, m <= n: m = factor if it divides, else the pair nearest sqrt."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def kron(a: Tensor, b: Tensor) -> Tensor:
    """Kronecker product of 2-D tensors through broadcasting (differentiable)."""
    (p, q), (s, t) = a.shape, b.shape
    out = F.reshape(a, (p, 1, q, 1)) * F.reshape(b, (1, s, 1, t))  # (p, s, q, t)
    return F.reshape(out, (p * s, q * t))


class LoKrLayer(LycorisLayer):
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout", "rank_dropout_scale")
    rank_dropout_scale_default = False

    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_layer_names:
            setattr(self, attr, ParameterDict())

    def update_layer(self, adapter_name: str, config: LoKrConfig, rng, name: str = "", **ctx) -> None:
        r = self._set_hparams(adapter_name, config, name)
        dtype, xp = param_dtype_xp(self.base_layer)
        in_m, in_n = factorization(self.in_features, config.decompose_factor)
        out_l, out_k = factorization(self.out_features, config.decompose_factor)
        use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        use_w2 = not (r < max(out_k, in_n) / 2)
        init = config.init_weights

        def draw(shape, zero: bool):
            return np.zeros(shape) if zero else kaiming_uniform(rng, shape)

        if use_w1:
            w1 = {"lokr_w1": draw((out_l, in_m), init is True)}
        else:
            w1 = {"lokr_w1_a": draw((out_l, r), init is True), "lokr_w1_b": draw((r, in_m), False)}
        if use_w2:
            w2 = {"lokr_w2": draw((out_k, in_n), init == "lycoris")}
        else:
            w2 = {"lokr_w2_a": draw((out_k, r), False), "lokr_w2_b": draw((r, in_n), init == "lycoris")}
        for attr, w in {**w1, **w2}.items():
            getattr(self, attr)[adapter_name] = Parameter.from_numpy(w, dtype, xp)

    def factors(self, adapter: str) -> tuple[Tensor, Tensor]:
        """(W1, W2) of ``adapter``, multiplied out where they are low-rank."""
        w1 = self.lokr_w1[adapter] if adapter in self.lokr_w1 else (
            F.matmul(self.lokr_w1_a[adapter], self.lokr_w1_b[adapter]))
        w2 = self.lokr_w2[adapter] if adapter in self.lokr_w2 else (
            F.matmul(self.lokr_w2_a[adapter], self.lokr_w2_b[adapter]))
        return w1, w2

    def get_delta_weight(self, adapter: str) -> Tensor:
        w1, w2 = self.factors(adapter)
        return kron(w1, w2) * self.scaling[adapter]  # (out, in)


@register
class LoKrMethod(PeftMethod):
    config_class = LoKrConfig
    layer_class = LoKrLayer
    recipes = (Recipe("lokr", "LoKr r=8", "reparameterization",
                      lambda n_layer, n_embd: LoKrConfig(r=8, alpha=8, target_modules=list(BLOCK_LINEARS)), lr=3e-2),)


__all__ = ["LoKrConfig", "LoKrLayer", "LoKrMethod", "factorization", "kron"]
