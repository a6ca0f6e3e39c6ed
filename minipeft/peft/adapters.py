"""Bottleneck adapters: Houlsby (arXiv 1902.00751) and Pfeiffer (arXiv 2005.00247).

Houlsby et al. §2.1 insert a small bottleneck module with its own skip connection
(methods.md §7)::

    h <- h + f(h W_down + b_down) W_up + b_up        W_down (d, m), W_up (m, d), m << d

so near-zero weights make it a near-identity; 2md + m + d parameters per adapter.
minipeft attaches it by wrapping the sub-layer projection whose output it reads, before
the residual add (the pre-LN GPT-2 mapping of methods.md §7-8)::

    y = c_proj(x);   y <- y + adapter_up(f(adapter_down(y)))

* **Houlsby**: two adapters per block, on ``attn.c_proj`` and ``mlp.c_proj``, GELU (as
  adapter-bert), and the LayerNorms ``ln_1``, ``ln_2``, ``ln_f`` trained too (the paper
  trains them; ``train_layer_norms``). The LayerNorms become per-adapter copies
  (``modules_to_save``), so several adapters and ``disable_adapter()`` still work.
* **Pfeiffer** (adapter-hub ``SeqBnConfig``): one adapter per block, on ``mlp.c_proj``
  only, ReLU, reduction factor 16, no LayerNorm training.

In GPT-2 the residual dropout comes after ``c_proj``, hence after the adapter (BERT
applies the adapter after its dropout; with dropout 0 the two agree).

Initialization (``init_weights``): ``"houlsby"`` draws both projections from
N(0, init_std²) truncated at 2 std (the paper: std 1e-2; adapter-bert used 1e-3), biases
0: a near-identity. ``"mam_adapter"`` (adapter-hub): W_down Kaiming-uniform, W_up = 0 and
b_up = 0: the exact identity at step 0.

Not mergeable: the bottleneck is non-linear, so no weight change reproduces it; merging
raises ``TypeError`` (adapters add latency at inference, unlike merged LoRA).

File format (peft has no bottleneck adapters, peft issues #244/#2654; the keys are
minipeft's, named as adapter-hub names its projections). ``adapter_config.json`` has
``"peft_type": "BOTTLENECK"`` and the fields of ``BottleneckConfig``; the safetensors file::

    base_model.model.transformer.h.{i}.{attn|mlp}.c_proj.adapter_down.weight  [m, d]
    base_model.model.transformer.h.{i}.{attn|mlp}.c_proj.adapter_down.bias    [m]
    base_model.model.transformer.h.{i}.{attn|mlp}.c_proj.adapter_up.weight    [d, m]
    base_model.model.transformer.h.{i}.{attn|mlp}.c_proj.adapter_up.bias      [d]
    base_model.model.transformer.h.{i}.ln_{1,2}.{weight,bias}, base_model.model.transformer.ln_f.{weight,bias}
                                                     (Houlsby with train_layer_norms only)

Weights are (out, in) like ``nn.Linear`` (no transpose: there is no Conv1D original).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..engine import Tensor
from ..init import kaiming_uniform, trunc_normal
from ..nn import Linear, ModuleDict, Parameter
from .config import PeftConfig
from .layer import BaseTunerLayer, param_dtype_xp
from .method import PeftMethod, Recipe, register

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # tanh form, as GPT-2 and adapter-bert
    "tanh": F.tanh,
    "swish": lambda x: x * F.sigmoid(x),  # adapter-hub's Houlsby default
}
LAYER_NORMS = ["ln_1", "ln_2", "ln_f"]  # GPT-2's LayerNorm names, trained by Houlsby


@dataclass
class BottleneckConfig(PeftConfig):
    """A bottleneck adapter after each target module's output (minipeft only; peft has none).

    ``HoulsbyConfig`` and ``PfeifferConfig`` are this with the papers' defaults; a file of
    either reads back as a ``BottleneckConfig`` with the same field values.
    """

    peft_type = "BOTTLENECK"
    default_target_modules = ["attn.c_proj", "mlp.c_proj"]  # Houlsby's two places

    adapter_size: int | None = None  # bottleneck width m; None: d // reduction_factor
    reduction_factor: int = 16  # m = d / reduction_factor when adapter_size is None (adapter-hub's default)
    non_linearity: str = "gelu"  # f: "relu" | "gelu" | "tanh" | "swish"
    init_weights: str = "houlsby"  # "houlsby": trunc-N(0, init_std^2) both; "mam_adapter": W_up = 0 (exact identity)
    init_std: float = 1e-2  # std of the "houlsby" init (the paper's 1e-2; adapter-bert 1e-3)
    train_layer_norms: bool = False  # also train ln_1, ln_2, ln_f (Houlsby), as per-adapter copies

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is None:  # explicit, so a file of a Pfeiffer config reads back as one
            self.target_modules = list(self.default_target_modules)
        m = self.adapter_size
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m <= 0):
            raise ValueError(f"adapter_size must be a positive int (the bottleneck width m) or None, got {m!r}")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 0:
            raise ValueError(f"reduction_factor must be a positive number (m = d / reduction_factor), got {rf!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.init_weights not in ("houlsby", "mam_adapter"):
            raise ValueError(f"init_weights must be 'houlsby' (near-identity, trunc-normal) or 'mam_adapter' "
                             f"(W_up = 0, exact identity), got {self.init_weights!r}")
        if not isinstance(self.init_std, (int, float)) or not self.init_std > 0:
            raise ValueError(f"init_std must be a positive number, got {self.init_std!r}")
        if not isinstance(self.train_layer_norms, bool):
            raise TypeError(f"train_layer_norms must be True or False, got {self.train_layer_norms!r}")

    def bottleneck(self, d: int) -> int:
        """m for a layer of width d."""
        if self.adapter_size is not None:
            return self.adapter_size
        m = int(d // self.reduction_factor)
        if m < 1:
            raise ValueError(f"reduction_factor {self.reduction_factor} leaves no bottleneck for width {d}; "
                             "use a smaller reduction_factor or set adapter_size")
        return m


@dataclass
class HoulsbyConfig(BottleneckConfig):
    """Houlsby et al.: after attention and after the MLP, GELU, LayerNorms trained too."""

    non_linearity: str = "gelu"  # adapter-bert's activation
    train_layer_norms: bool = True  # the paper trains the LayerNorms with the adapters


@dataclass
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer et al. (adapter-hub ``seq_bn``): after the MLP only, ReLU, reduction 16."""

    default_target_modules = ["mlp.c_proj"]
    non_linearity: str = "relu"  # adapter-hub's SeqBnConfig default


class BottleneckLayer(BaseTunerLayer):
    """``y = base(x);  y + adapter_up(f(adapter_down(y)))`` per active adapter."""

    adapter_layer_names = ("adapter_down", "adapter_up")
    other_param_names = ("non_linearity",)

    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        self.adapter_down = ModuleDict()
        self.adapter_up = ModuleDict()
        self.non_linearity: dict[str, str] = {}

    def update_layer(self, adapter_name: str, config: BottleneckConfig, rng, name: str = "", **ctx) -> None:
        d = self.out_features
        m = config.bottleneck(d)
        dtype, xp = param_dtype_xp(self.base_layer)
        if config.init_weights == "houlsby":
            w_down = trunc_normal(rng, (m, d), config.init_std)
            w_up = trunc_normal(rng, (d, m), config.init_std)
        else:  # "mam_adapter": Kaiming down (nn.Linear's default), zero up
            w_down, w_up = kaiming_uniform(rng, (m, d)), np.zeros((d, m))
        self.non_linearity[adapter_name] = config.non_linearity
        self.adapter_down[adapter_name] = Linear.from_weight(Parameter.from_numpy(w_down, dtype, xp),  # (m, d)
                                                             Parameter.from_numpy(np.zeros(m), dtype, xp))
        self.adapter_up[adapter_name] = Linear.from_weight(Parameter.from_numpy(w_up, dtype, xp),  # (d, m)
                                                           Parameter.from_numpy(np.zeros(d), dtype, xp))

    def adapter_forward(self, x: Tensor, adapter: str, base_result: Tensor) -> Tensor:
        act = ACTIVATIONS[self.non_linearity[adapter]]
        h = act(self.adapter_down[adapter](base_result))  # (..., m)
        return self.adapter_up[adapter](h)  # (..., d)

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        raise TypeError("bottleneck adapters are non-linear (y + up(f(down(y)))): no weight change reproduces "
                        "them, so they cannot be merged; keep the model unmerged, or use LoRA/(IA)³ to merge")

    def get_delta_weight(self, adapter: str) -> Tensor:
        raise TypeError("bottleneck adapters have no weight delta (they are non-linear); they cannot be merged")


def _bottleneck(n_embd: int) -> int:
    """The course's bottleneck width m = d/8 (Houlsby's 3.6%-of-parameters regime on minipeft's bases)."""
    return max(2, n_embd // 8)


@register
class BottleneckMethod(PeftMethod):
    config_class = BottleneckConfig
    layer_class = BottleneckLayer
    mergeable = False
    recipes = (
        Recipe("houlsby", "Houlsby adapter", "additive: adapters",
               lambda n_layer, n_embd: HoulsbyConfig(adapter_size=_bottleneck(n_embd)), lr=3e-2),
        Recipe("pfeiffer", "Pfeiffer adapter", "additive: adapters",
               lambda n_layer, n_embd: PfeifferConfig(adapter_size=_bottleneck(n_embd)), lr=3e-2),
    )

    @classmethod
    def prepare_config(cls, config: BottleneckConfig) -> BottleneckConfig:
        config = super().prepare_config(config)
        if config.train_layer_norms:  # the LayerNorms become trainable per-adapter copies
            extra = [n for n in LAYER_NORMS if n not in (config.modules_to_save or [])]
            config.modules_to_save = list(config.modules_to_save or []) + extra
        return config


def num_adapter_parameters(d: int, m: int) -> int:
    """2md + m + d: one adapter's parameters (Houlsby et al. §2.1)."""
    return 2 * m * d + m + d


__all__ = ["BottleneckConfig", "HoulsbyConfig", "PfeifferConfig", "BottleneckLayer", "BottleneckMethod",
           "num_adapter_parameters", "ACTIVATIONS"]
