"""The LyCORIS base shared by LoHa and LoKr (LyCORIS, arXiv 2309.14859; peft ``tuners/lycoris_utils.py``).

Both methods build a full weight change ΔW (out, in) from small factors (a Hadamard
product for LoHa, a Kronecker product for LoKr) and add ``x ΔW^T`` to the base output.
``LycorisLayer`` holds what they share: the rank, ``alpha`` and scaling ``alpha / r`` per
adapter (with ``rank_pattern``/``alpha_pattern`` overrides), and peft's two dropouts:

* **rank dropout**: while training, drop each row of ΔW with probability p, rescaling the
  kept rows by 1 / (kept fraction) when ``rank_dropout_scale``;
* **module dropout**: while training, skip the whole adapter for a step with probability p.
"""
from __future__ import annotations

from .. import functional as F
from ..engine import Tensor
from ..random import generator
from .config import check_dropout, check_layers, check_rank, pattern_value
from .layer import BaseTunerLayer


def check_lycoris(cfg) -> None:
    """Validate the fields LoHaConfig and LoKrConfig share."""
    check_rank("r", cfg.r)
    for k, v in cfg.rank_pattern.items():
        check_rank(f"rank_pattern[{k!r}]", v)
    check_dropout("rank_dropout", cfg.rank_dropout)
    check_dropout("module_dropout", cfg.module_dropout)
    if cfg.use_effective_conv2d:
        raise ValueError("use_effective_conv2d applies to Conv2d only; minipeft has no convolutions (leave False)")
    check_layers(cfg)


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


__all__ = ["LycorisLayer", "check_lycoris"]
