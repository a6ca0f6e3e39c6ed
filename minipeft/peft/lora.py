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

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from .. import functional as F
from ..backend import xp_of
from ..engine import Tensor, no_grad
from ..init import kaiming_uniform
from ..nn import Dropout, Linear, ModuleDict, Parameter, ParameterDict
from . import dora
from .config import PeftConfig, check_dropout, check_layers, check_rank, pattern_value
from .layer import BaseTunerLayer, param_dtype_xp
from .lora_slices import check_enable_lora, slice_rows, sliced_delta_weight, sliced_lora_forward
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
    init_lora_weights: bool | str = True  # True: Kaiming A, B = 0; "gaussian": A ~ N(0, 1/r^2); False: B random
    layers_to_transform: list[int] | int | None = None  # only these block indices
    layers_pattern: list[str] | str | None = None  # name of the block list (GPT-2: "h") for layers_to_transform
    rank_pattern: dict = field(default_factory=dict)  # module-name pattern -> r
    alpha_pattern: dict = field(default_factory=dict)  # module-name pattern -> lora_alpha
    use_dora: bool = False  # DoRA magnitude/direction decomposition
    layer_replication: list | None = None  # peft feature not implemented (must stay None)
    loftq_config: dict = field(default_factory=dict)  # peft feature not implemented (must stay {})
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
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        check_layers(self)
        for k, default in (("layer_replication", None), ("megatron_config", None)):
            if getattr(self, k) != default:
                raise ValueError(f"{k} is not implemented in minipeft; leave it {default!r}")
        if self.loftq_config:
            raise ValueError("loftq_config is not implemented in minipeft; leave it {}")
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
        # with slices: A = [A_1; A_2; ...] (n r, in), B = [B_1; B_2; ...] (n q, r), one block per enabled slice
        if init == "gaussian":
            a = rng.normal(0.0, 1.0 / r, (n * r, self.in_features))
        else:
            a = kaiming_uniform(rng, (n * r, self.in_features))
        b = np.zeros((n * q, r)) if init else kaiming_uniform(rng, (n * q, r))
        self.lora_A[adapter_name] = Linear.from_weight(Parameter.from_numpy(a, dtype, xp))  # (n r, in)
        self.lora_B[adapter_name] = Linear.from_weight(Parameter.from_numpy(b, dtype, xp))  # (n q, r)
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

    @classmethod
    def add_weighted_adapter(cls, peft_model, adapters, weights, adapter_name, combination_type="svd",
                             svd_rank=None, **kw) -> None:
        """peft's ``LoraModel.add_weighted_adapter`` for combination_type "linear", "cat", "svd".

        With s_i the scaling of adapter i and w_i its weight, the new adapter has
        ``lora_alpha = r_new`` (scaling 1) and, per layer:

        * ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], r_new = Σ r_i,
          so ΔW = Σ w_i s_i B_i A_i exactly;
        * ``linear`` (all r_i equal): A = Σ sqrt(w_i s_i) A_i, B = Σ sqrt(w_i s_i) B_i, so
          ΔW = (Σ sqrt(w_i s_i) B_i)(Σ sqrt(w_j s_j) A_j), which has cross terms: it is the
          weighted sum of deltas only for one adapter or orthogonal factors. Needs w_i s_i >= 0;
        * ``svd``: ΔW = Σ w_i s_i B_i A_i truncated to rank ``svd_rank`` (default max r_i):
          B = U_r S_r, A = V_r^T.

        Unlike peft, the new adapter never uses rsLoRA (so its scaling is exactly 1) and an
        existing ``adapter_name`` raises instead of being silently kept.
        """
        if kw:
            raise TypeError(f"unsupported arguments {sorted(kw)} (minipeft has linear, cat and svd without options)")
        cfgs = peft_model.peft_config
        if adapter_name in cfgs:
            raise ValueError(f"adapter {adapter_name!r} already exists; choose a new name")
        missing = [a for a in adapters if a not in cfgs]
        if missing or not adapters:
            raise ValueError(f"unknown adapters {missing or adapters}; adapters: {list(cfgs)}")
        if len(weights) != len(adapters):
            raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
        if any(cfgs[a].use_dora for a in adapters):
            raise ValueError("add_weighted_adapter cannot combine DoRA adapters (their magnitudes do not add)")
        if any(cfgs[a].enable_lora for a in adapters):
            raise ValueError("add_weighted_adapter cannot combine adapters with enable_lora (sliced B); save_adapter "
                             "writes them as plain LoRA: load that file and combine the loaded adapter")
        if len(adapters) == 1:
            combination_type = "linear"
        ranks = [cfgs[a].r for a in adapters]
        if any(cfgs[a].rank_pattern for a in adapters):
            raise ValueError("add_weighted_adapter does not support adapters with rank_pattern")
        if combination_type == "linear":
            if len(set(ranks)) != 1:
                raise ValueError(f"combination_type 'linear' needs equal ranks, got {ranks}; use 'cat' or 'svd'")
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type == "svd":
            new_rank = svd_rank or max(ranks)
        else:
            raise ValueError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}")
        tms = [cfgs[a].target_modules for a in adapters]
        if all(isinstance(t, str) for t in tms):
            targets = "|".join(f"({t})" for t in tms)
        elif all(isinstance(t, list) for t in tms):
            targets = sorted({t for tm in tms for t in tm})
        else:
            raise ValueError("cannot combine adapters whose target_modules mix a regex and a list of names")
        new_cfg = dataclasses.replace(cfgs[adapters[0]], r=new_rank, lora_alpha=new_rank, target_modules=targets,
                                      use_rslora=False, alpha_pattern={}, rank_pattern={}, init_lora_weights=True)
        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and any(a in m.lora_A for a in adapters)]
        with no_grad():
            for layer in layers:
                layer.update_layer(adapter_name, new_cfg, np.random.default_rng(0), check_rank_fits=False)
                A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                here = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
                As = [layer.lora_A[a].weight.data for a, _ in here]
                Bs = [layer.lora_B[a].weight.data for a, _ in here]
                ws = [w * layer.scaling[a] for a, w in here]
                xp = xp_of(A.data)
                if combination_type == "cat":
                    a_new = xp.concatenate([w * a for w, a in zip(ws, As)], axis=0)
                    b_new = xp.concatenate(Bs, axis=1)
                    a_full, b_full = xp.zeros_like(A.data), xp.zeros_like(B.data)
                    a_full[: a_new.shape[0]], b_full[:, : b_new.shape[1]] = a_new, b_new
                    a_new, b_new = a_full, b_full
                elif combination_type == "linear":
                    if any(w < 0 for w in ws):
                        raise ValueError("combination_type 'linear' takes sqrt(weight * scaling): weights must be >= 0")
                    roots = [math.sqrt(w) for w in ws]
                    a_new = sum(r * a for r, a in zip(roots, As))
                    b_new = sum(r * b for r, b in zip(roots, Bs))
                else:
                    delta = sum(w * (b @ a) for w, a, b in zip(ws, As, Bs))  # (out, in)
                    u, s, vh = xp.linalg.svd(delta, full_matrices=False)
                    k = min(new_rank, s.shape[0])
                    a_new, b_new = xp.zeros_like(A.data), xp.zeros_like(B.data)
                    a_new[:k], b_new[:, :k] = vh[:k], u[:, :k] * s[:k]
                A.data, B.data = a_new.astype(A.dtype), b_new.astype(B.dtype)
        peft_model.peft_config[adapter_name] = new_cfg
        peft_model._refresh_trainable()


__all__ = ["LoraConfig", "LoraLayer", "LoraMethod"]
