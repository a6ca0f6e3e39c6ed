"""LoRA (arXiv 2106.09685) and rsLoRA (arXiv 2312.03732); DoRA (arXiv 2402.09353) as an option.

LoRA, eq. (3) of the paper: ``h = W0 x + (alpha/r) B A x`` with W0 (out, in) frozen,
A (r, in) Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B (out, r) = 0, so
the wrapped layer equals the base at step 0. rsLoRA scales by ``alpha/sqrt(r)``.
``use_dora=True`` adds DoRA's trainable magnitude (dora.py holds its equations).

Weights live in per-adapter dicts so in-memory keys read like peft's:
``c_attn.lora_A.default.weight`` [r, in], ``c_attn.lora_B.default.weight`` [out, r];
the DoRA magnitude is ``c_attn.lora_magnitude_vector.default`` [out] (a ParameterDict
entry, which is peft's on-disk key once the adapter name is stripped).

``enable_lora`` (loralib's name) puts LoRA on slices of a fused layer, e.g. W_q and W_v
of GPT-2's ``c_attn`` as the paper does: ``LoraConfig(r=4, lora_alpha=32,
target_modules=["c_attn"], enable_lora=[True, False, True])``; see lora_slices.py.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from .. import fast
from .. import functional as F
from ..engine import Tensor
from ..init import kaiming_uniform
from ..nn import Dropout, Linear, ModuleDict, Parameter, ParameterDict
from . import dora, lora_fused, lora_init, merge
from .config import PeftConfig, check_dropout, check_layers, check_rank, pattern_value
from .layer import BaseTunerLayer, param_dtype_xp
from .lora_slices import check_enable_lora, slice_rows, sliced_delta_weight, sliced_lora_forward
from .mixed_batch import mixed_batch, mixed_batch_forward
from .method import BLOCK_LINEARS, PeftMethod, Recipe, register


@dataclass
class LoraConfig(PeftConfig):
    """peft's ``LoraConfig`` (field names and defaults as in peft 0.20)."""

    peft_type = "LORA"
    default_target_modules = ["c_attn"]
    unsupported_fields = {
        "lora_bias": False, "use_qalora": False, "qalora_group_size": 16, "target_parameters": None,
        "trainable_token_indices": None, "eva_config": None, "corda_config": None, "runtime_config": None,
        "alora_invocation_tokens": None, "arrow_config": None, "ensure_weight_tying": False, "kasa_config": None,
        "lora_ga_config": None, "monteclora_config": None, "use_bdlora": None, "velora_config": None,
    }

    r: int = 8  # rank
    lora_alpha: float = 8  # scaling = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the LoRA branch input
    fan_in_fan_out: bool = False  # True only for (in, out) weights; minipeft's Linear is (out, in)
    bias: str = "none"  # "none" | "all" | "lora_only": which base biases also train
    use_rslora: bool = False  # rsLoRA scaling alpha / sqrt(r)
    # True: Kaiming A, B = 0; "gaussian": A ~ N(0, 1/r^2), B = 0; False: B random too (not the identity);
    # "pissa", "pissa_niter_K", "olora", "loftq": from the base weight, which becomes the residual (lora_init.py)
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None  # only these block indices
    layers_pattern: list[str] | str | None = None  # name of the block list (GPT-2: "h") for layers_to_transform
    rank_pattern: dict = field(default_factory=dict)  # module-name pattern -> r
    alpha_pattern: dict = field(default_factory=dict)  # module-name pattern -> lora_alpha
    use_dora: bool = False  # DoRA magnitude/direction decomposition
    layer_replication: list | None = None  # peft feature not implemented (must stay None)
    loftq_config: dict = field(default_factory=dict)  # with init_lora_weights="loftq": LoftQConfig or its dict
    megatron_config: dict | None = None  # peft feature not implemented (must stay None)
    megatron_core: str | None = "megatron.core"  # written by peft; unused
    # loralib's name; None = the whole layer. [True, False, True] on c_attn: LoRA on W_q and W_v only, each
    # enabled slice its own rank-r A, B (lora_slices.py). Not in peft's format: saved as the equivalent plain LoRA.
    enable_lora: list[bool] | None = None

    runtime_fields = ("seed", "enable_lora")  # never written to adapter_config.json (save_adapter converts)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("r", self.r)
        for k, v in self.rank_pattern.items():
            check_rank(f"rank_pattern[{k!r}]", v)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        check_dropout("lora_dropout", self.lora_dropout)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        self.loftq_config = lora_init.check_init(self.init_lora_weights, self.loftq_config)
        if lora_init.is_weight_init(self.init_lora_weights) and self.enable_lora:
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} works on the whole weight; it cannot be "
                             "combined with enable_lora (LoRA on slices): use target_modules on the whole layer")
        check_layers(self)
        for k, default in (("layer_replication", None), ("megatron_config", None)):
            if getattr(self, k) != default:
                raise ValueError(f"{k} is not implemented in minipeft; leave it {default!r}")
        self.enable_lora = check_enable_lora(self.enable_lora, self.use_dora)


class LoraLayer(BaseTunerLayer):
    """A Linear (at ``base_layer``) plus LoRA adapters: ``y = base(x) + s · B(A(dropout(x)))``."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "enable_lora")

    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.enable_lora: dict[str, list[bool] | None] = {}  # None: LoRA on the whole output
        self.lora_dropout = ModuleDict()
        self.lora_A = ModuleDict()
        self.lora_B = ModuleDict()
        self.lora_magnitude_vector = ParameterDict()

    def update_layer(self, adapter_name: str, config: LoraConfig, rng, name: str = "", check_rank_fits=True,
                     **ctx) -> None:
        r = pattern_value(name, config.rank_pattern, config.r)
        alpha = pattern_value(name, config.alpha_pattern, config.lora_alpha)
        check_rank("r", r)
        mask = config.enable_lora
        n, q = (sum(mask), slice_rows(mask, self.out_features, name)) if mask else (1, self.out_features)
        if check_rank_fits and r > min(self.in_features, q):
            what = f"out={q} per slice" if mask else f"out={self.out_features}"
            raise ValueError(
                f"LoRA rank r={r} is larger than {name or 'the layer'} allows: min(in={self.in_features}, "
                f"{what}) = {min(self.in_features, q)}; a larger r adds "
                "parameters but no rank. Use r <= that (or a rank_pattern entry for this module)."
            )
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True but minipeft's Linear weight is (out, in): using False", stacklevel=3)
        dtype, xp = param_dtype_xp(self.base_layer)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = Dropout(config.lora_dropout)
        self.enable_lora[adapter_name] = list(mask) if mask else None
        init = config.init_lora_weights
        if lora_init.is_weight_init(init):  # PiSSA, OLoRA, LoftQ: from W (which becomes the residual), on its device
            a, b = lora_init.initialize(self, adapter_name, init, r, self.scaling[adapter_name], config.loftq_config,
                                        rng)
            a, b = Parameter(a.astype(dtype)), Parameter(b.astype(dtype))
        else:  # with slices: A = [A_1; A_2; ...] (n r, in), B = [B_1; B_2; ...] (n q, r), one block per slice
            if init == "gaussian":
                a = rng.normal(0.0, 1.0 / r, (n * r, self.in_features))
            else:
                a = kaiming_uniform(rng, (n * r, self.in_features))
            b = np.zeros((n * q, r)) if init else kaiming_uniform(rng, (n * q, r))
            a, b = Parameter.from_numpy(a, dtype, xp), Parameter.from_numpy(b, dtype, xp)
        self.lora_A[adapter_name] = Linear.from_weight(a)  # (n r, in)
        self.lora_B[adapter_name] = Linear.from_weight(b)  # (n q, r)
        self.use_dora[adapter_name] = bool(config.use_dora)
        if config.use_dora:
            self.lora_magnitude_vector[adapter_name] = Parameter(self.dora_weight_norm(adapter_name).astype(dtype))

    # ---- maths
    def get_delta_weight(self, adapter: str) -> Tensor:
        """``s · B @ A``, shape (out, in); with slices ``s · [B_1 A_1; 0; ...]`` (disabled rows exactly 0)."""
        A, B, mask = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.enable_lora.get(adapter)
        if mask:
            return sliced_delta_weight(A, B, mask, self.r[adapter]) * self.scaling[adapter]
        return F.matmul(B, A) * self.scaling[adapter]

    def dora_weight_norm(self, adapter: str):
        """DoRA's ``||W0 + s·B·A||`` per output row, a constant (no gradient), shape (out,)."""
        lora_w = self.lora_B[adapter].weight.data @ self.lora_A[adapter].weight.data  # (out, in)
        return dora.weight_norm(self.base_weight(), lora_w, self.scaling[adapter])

    def adapter_forward(self, x: Tensor, adapter: str, base_result: Tensor) -> Tensor:
        xd = self.lora_dropout[adapter](x)
        s = self.scaling[adapter]
        mask = self.enable_lora.get(adapter)
        if mask:  # LoRA on slices of the output (no DoRA: LoraConfig rejects it)
            return sliced_lora_forward(self.lora_A[adapter](xd), self.lora_B[adapter].weight, mask,
                                       self.r[adapter]) * s  # (..., out)
        lora = self.lora_B[adapter](self.lora_A[adapter](xd))  # (..., out)
        if self.use_dora[adapter]:
            return dora.forward(self, adapter, xd, lora, base_result)
        return lora * s

    def set_base_weight(self, array) -> None:
        """A 4-bit or 8-bit base takes the merged weight quantized again (peft's bnb layers);
        ``merge_rounding`` keeps the largest change that rounding made (``quant/requantize.py``)."""
        base = self.get_base_layer()
        if hasattr(base, "requantize"):
            self.merge_rounding = base.requantize(array)
            return
        super().set_base_weight(array)

    def merged_weight(self, weight, adapter: str):
        delta = self.get_delta_weight(adapter).data.astype(weight.dtype)
        if not self.use_dora[adapter]:
            return weight + delta
        merged, self._caches[f"{adapter}-weight_norm"] = dora.merged_weight(
            weight, delta, self.lora_magnitude_vector[adapter].data)
        return merged

    def unmerged_weight(self, weight, adapter: str):
        delta = self.get_delta_weight(adapter).data.astype(weight.dtype)
        if not self.use_dora[adapter]:
            return weight - delta
        norm = self._caches.pop(f"{adapter}-weight_norm")
        return dora.unmerged_weight(weight, delta, self.lora_magnitude_vector[adapter].data, norm)

    # ---- mixed-adapter batches (peft's adapter_names; mixed_batch.py)
    batch_adapters = None  # set by mixed_batch() for a call: the rows of each adapter (RowGroups), or None

    def reads_16bit_input(self) -> bool:
        """Under autocast, True where this layer only rounds its input to 16 bits (its fused op takes it,
        ``lora_fused.reads_16bit``): GPT then has the layer norm before it write 16 bits itself
        (:mod:`minipeft.amp_layernorm`)."""
        return lora_fused.reads_16bit(self)

    def forward(self, x, *args, **kwargs):
        if self.batch_adapters is None or self.disable_adapters:
            return lora_forward(self, x, *args, **kwargs)
        return mixed_batch_forward(self, x, self.batch_adapters, *args, **kwargs)


@fast.dispatch
def lora_forward(layer: LoraLayer, x, *args, **kwargs):
    """A LoRA layer's forward, the reference: ``base(x) + s · B(A(dropout(x)))`` for each active
    adapter (``BaseTunerLayer.forward``). Its fast path, one Function for the common case, is
    :mod:`minipeft.peft.lora_fused`."""
    return BaseTunerLayer.forward(layer, x, *args, **kwargs)


lora_fused.register(lora_forward)


def _lora(n_layer: int, n_embd: int, **kw) -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=list(BLOCK_LINEARS), **kw)


@register
class LoraMethod(PeftMethod):
    config_class = LoraConfig
    layer_class = LoraLayer
    recipes = (  # r=8, alpha=16 on every linear layer of every block
        Recipe("lora", "LoRA r=8", "reparameterization", _lora, lr=1e-2,
               memory=lambda n_layer, n_embd: dict(method="lora", targets=BLOCK_LINEARS, r=8)),
        Recipe("rslora", "rsLoRA r=8", "reparameterization", lambda n, d: _lora(n, d, use_rslora=True), lr=3e-3),
        Recipe("dora", "DoRA r=8", "reparameterization", lambda n, d: _lora(n, d, use_dora=True), lr=1e-2),
    )

    @classmethod
    def check_new_adapter(cls, peft_model, config, adapter_name) -> None:
        if peft_model.peft_config and (config.bias != "none" or any(
                c.bias != "none" for c in peft_model.peft_config.values())):
            raise ValueError("LoRA supports only one adapter with bias != 'none'; use bias='none' for all adapters")
        inits = [c.init_lora_weights for c in [config, *peft_model.peft_config.values()]]
        if peft_model.peft_config and any(lora_init.is_weight_init(i) for i in inits):
            warnings.warn(f"{[i for i in inits if lora_init.is_weight_init(i)]} change the base weights, which every "
                          "adapter of the model shares (as in peft). To use such an adapter beside others, save it "
                          "converted to plain LoRA: save_adapter(..., path_initial_model_for_weight_conversion=...)",
                          stacklevel=4)

    @classmethod
    def mixed_batch(cls, peft_model, adapter_names, rows: int, forward: bool = True):
        """``PeftModel(idx, adapter_names=[...])``: each row its own adapter (mixed_batch.py)."""
        return mixed_batch(peft_model, adapter_names, rows, forward, layer_class=cls.layer_class)

    @classmethod
    def add_weighted_adapter(cls, peft_model, adapters, weights, adapter_name, combination_type="svd", **kw) -> None:
        """peft's ``LoraModel.add_weighted_adapter``: every combination type (merge.py gives the rules).

        ``combination_type`` is one of "svd", "linear", "cat", "ties", "ties_svd", "dare_linear",
        "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd";
        keywords: ``svd_rank``, ``svd_clamp``, ``svd_full_matrices``, ``svd_driver``, ``density``,
        ``majority_sign_method`` ("total" | "frequency"), and minipeft's ``seed`` and ``dare_masks``
        for DARE's random masks.
        """
        merge.combine_lora(peft_model, LoraLayer, adapters, weights, adapter_name, combination_type, **kw)


__all__ = ["LoraConfig", "LoraLayer", "LoraMethod"]
