"""VeRA: vector-based random matrix adaptation (arXiv 2310.11454; peft ``tuners/vera/``).

``h = W0 x + Λ_b B Λ_d A x``: A (r, in) and B (out, r) are **frozen, random and shared by
every adapted layer** (each layer uses the slices ``A[:, :in]``, ``B[:out, :]`` of one
pair sized for the largest layer); only the vectors b (out) and d (r) train.
Init: A, B Kaiming-uniform with gain sqrt(2), i.e. U(±sqrt(6/fan_in)), drawn from
``numpy.random.default_rng(projection_prng_key)`` (A first, then B), so the seed alone
regenerates them; **b = 0**, d = d_initial (0.1), so the layer equals the base at init.
Per layer: out + r trainable parameters.

The pair lives on the tuner model as ``base_model.vera_A.<adapter>``/``vera_B`` (not
Parameters: they are not counted or trained), saved under ``base_model.vera_A`` /
``base_model.vera_B`` when ``save_projection`` (peft's keys). peft draws them with
torch's generator, so a file saved with ``save_projection=False`` does not give peft's
matrices: keep the default True for files meant for peft.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..backend import to_device
from ..engine import Tensor
from ..init import kaiming_uniform
from ..nn import Dropout, Module, ModuleDict, Parameter, ParameterDict
from .config import PeftConfig, check_dropout, check_layers, check_rank
from .layer import BaseTunerLayer, param_dtype_xp
from .method import BLOCK_LINEARS, PeftMethod, Recipe, register


@dataclass
class VeraConfig(PeftConfig):
    """peft's ``VeraConfig`` fields and defaults (peft has no ``exclude_modules`` for VeRA)."""

    peft_type = "VERA"
    default_target_modules = ["c_attn"]
    json_omit = ("exclude_modules",)

    r: int = 256  # rank of the shared random projections
    projection_prng_key: int = 0  # seed of the shared A and B
    save_projection: bool = True  # save A and B in the adapter file (peft's default)
    vera_dropout: float = 0.0  # dropout on the VeRA branch input
    d_initial: float = 0.1  # initial value of every d
    fan_in_fan_out: bool = False  # True only for (in, out) weights; minipeft's Linear is (out, in)
    bias: str = "none"  # "none" | "all" | "vera_only": which base biases also train
    init_weights: bool = True  # True: b = 0, d = d_initial; False: b = 1, d ~ N(0, 1)
    layers_to_transform: list[int] | int | None = None  # only these block indices
    layers_pattern: list[str] | str | None = None  # name of the block list (GPT-2: "h")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("r", self.r)
        check_dropout("vera_dropout", self.vera_dropout)
        if self.bias not in ("none", "all", "vera_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'vera_only', got {self.bias!r}")
        if self.exclude_modules is not None:
            raise ValueError("VeraConfig has no exclude_modules in peft; express the choice in target_modules")
        if not isinstance(self.projection_prng_key, int):
            raise TypeError(f"projection_prng_key must be an int seed, got {self.projection_prng_key!r}")
        check_layers(self)


class BufferDict(Module):
    """Frozen arrays by adapter name (peft's ``BufferDict``): in ``state_dict``, not in ``parameters()``."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Tensor:
        return self.buffers[key]

    def __setitem__(self, key: str, t: Tensor) -> None:
        self.buffers[key] = t

    def __delitem__(self, key: str) -> None:
        del self.buffers[key]

    def __contains__(self, key: str) -> bool:
        return key in self.buffers

    def __len__(self) -> int:
        return len(self.buffers)

    def _extra_state(self) -> dict:
        return {k: t.data for k, t in self.buffers.items()}

    def _load_extra_state(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.buffers))
        if unknown:
            raise KeyError(f"BufferDict has no entries {unknown}")
        for k, arr in state.items():
            self.buffers[k].data = to_device(arr, self.buffers[k].device).astype(self.buffers[k].dtype)

    def _moved_to(self, device: str) -> None:
        for t in self.buffers.values():
            t.data = to_device(t.data, device)


class VeraLayer(BaseTunerLayer):
    """``y = base(x) + b ⊙ B_s (d ⊙ A_s dropout(x))`` with A_s, B_s the shared pair's slices."""

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("r", "vera_dropout")

    def __init__(self, base_layer) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.vera_dropout = ModuleDict()
        self.vera_lambda_b = ParameterDict()
        self.vera_lambda_d = ParameterDict()

    def update_layer(self, adapter_name: str, config: VeraConfig, rng, tuner_model=None, **ctx) -> None:
        if tuner_model is None or "vera_A" not in tuner_model._modules:
            raise RuntimeError("VeraLayer.update_layer needs the tuner model holding vera_A/vera_B; "
                               "use get_peft_model")
        # unregistered references: the shared pair is saved once, on the tuner model
        object.__setattr__(self, "_vera_A", tuner_model.vera_A)
        object.__setattr__(self, "_vera_B", tuner_model.vera_B)
        a, b = self._vera_A[adapter_name], self._vera_B[adapter_name]
        if a.shape[1] < self.in_features or b.shape[0] < self.out_features or a.shape[0] < config.r:
            raise ValueError(
                f"shared VeRA projections A {a.shape}, B {b.shape} are too small for this layer "
                f"(in={self.in_features}, out={self.out_features}, r={config.r})"
            )
        dtype, xp = param_dtype_xp(self.base_layer)
        self.r[adapter_name] = config.r
        self.vera_dropout[adapter_name] = Dropout(config.vera_dropout)
        if config.init_weights:
            lam_b, lam_d = np.zeros(self.out_features), np.full(config.r, config.d_initial)
        else:
            lam_b, lam_d = np.ones(self.out_features), rng.standard_normal(config.r)
        self.vera_lambda_b[adapter_name] = Parameter.from_numpy(lam_b, dtype, xp)
        self.vera_lambda_d[adapter_name] = Parameter.from_numpy(lam_d, dtype, xp)

    def _slices(self, adapter: str) -> tuple[Tensor, Tensor]:
        a = self._vera_A[adapter].data[:, : self.in_features]  # (r, in)
        b = self._vera_B[adapter].data[: self.out_features, :]  # (out, r)
        return Tensor(a), Tensor(b)

    def adapter_forward(self, x: Tensor, adapter: str, base_result: Tensor) -> Tensor:
        a, b = self._slices(adapter)
        h = F.linear(self.vera_dropout[adapter](x), a) * self.vera_lambda_d[adapter]  # (..., r)
        return F.linear(h, b) * self.vera_lambda_b[adapter]  # (..., out)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``diag(b) B_s diag(d) A_s``, shape (out, in)."""
        a, b = self._slices(adapter)
        lam_b, lam_d = self.vera_lambda_b[adapter], self.vera_lambda_d[adapter]
        bd = b * F.reshape(lam_d, (1, -1))  # (out, r)
        return F.reshape(lam_b, (-1, 1)) * F.matmul(bd, a)


@register
class VeraMethod(PeftMethod):
    config_class = VeraConfig
    layer_class = VeraLayer
    recipes = (Recipe("vera", "VeRA r=256", "reparameterization",  # A, B come back from the seed: not saved
                      lambda n_layer, n_embd: VeraConfig(r=256, target_modules=list(BLOCK_LINEARS),
                                                         save_projection=False), lr=1e-1),)

    @classmethod
    def check_new_adapter(cls, peft_model, config, adapter_name) -> None:
        for other in peft_model.peft_config.values():
            if (other.projection_prng_key, other.save_projection) != (config.projection_prng_key,
                                                                       config.save_projection):
                raise ValueError("all VeRA adapters of a model share A and B: use the same projection_prng_key "
                                 "and save_projection")

    @classmethod
    def prepare(cls, peft_model, config, adapter_name, targets) -> None:
        tuner_model = peft_model.base_model
        if "vera_A" not in tuner_model._modules:
            tuner_model.vera_A, tuner_model.vera_B = BufferDict(), BufferDict()
        va, vb = tuner_model.vera_A, tuner_model.vera_B
        if len(va):  # later adapters reuse the first pair, as peft does
            va[adapter_name], vb[adapter_name] = next(iter(va.buffers.values())), next(iter(vb.buffers.values()))
            return
        max_out = max(m.out_features for _, m in targets)
        max_in = max(m.in_features for _, m in targets)
        rng = np.random.default_rng(config.projection_prng_key)
        a = kaiming_uniform(rng, (config.r, max_in), a=0.0)  # U(±sqrt(6/in))
        b = kaiming_uniform(rng, (max_out, config.r), a=0.0)  # U(±sqrt(6/r))
        base = targets[0][1]
        dtype, xp = param_dtype_xp(getattr(base, "base_layer", base))
        va[adapter_name] = Tensor(xp.asarray(a.astype(dtype)))  # frozen: a Tensor, not a Parameter
        vb[adapter_name] = Tensor(xp.asarray(b.astype(dtype)))

    @classmethod
    def extra_adapter_state(cls, peft_model, adapter_name):
        tuner = peft_model.base_model
        if not peft_model.peft_config[adapter_name].save_projection or "vera_A" not in tuner._modules:
            return []
        return [(f"base_model.vera_A.{adapter_name}", "base_model.vera_A", tuner.vera_A[adapter_name]),
                (f"base_model.vera_B.{adapter_name}", "base_model.vera_B", tuner.vera_B[adapter_name])]

    @classmethod
    def delete_adapter(cls, peft_model, adapter_name) -> None:
        tuner = peft_model.base_model
        for key in ("vera_A", "vera_B"):
            if key in tuner._modules and adapter_name in tuner._modules[key]:
                del tuner._modules[key][adapter_name]


__all__ = ["VeraConfig", "VeraLayer", "VeraMethod", "BufferDict"]
