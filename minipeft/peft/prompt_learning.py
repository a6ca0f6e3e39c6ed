"""What prompt and prefix tuning share: peft's ``PromptLearningConfig`` and the method hooks.

Both methods wrap no module: they learn vectors the frozen model reads (a soft prompt in
front of the token embeddings, or keys and values in front of every layer's), kept in
``peft_model.prompt_encoder[<adapter>]`` (peft's in-memory name). Their configs share the
model-shape fields peft fills from the model at ``get_peft_model``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine import Tensor
from ..nn import Module, ModuleDict
from .config import PeftConfig
from .layer import derive_rng
from .method import PeftMethod


def _positive_or_none(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise ValueError(f"{name} must be a positive int or None (filled from the model), got {v!r}")


@dataclass
class PromptLearningConfig(PeftConfig):
    """peft's ``PromptLearningConfig``: fields shared by prompt and prefix tuning.

    ``token_dim``, ``num_layers``, ``num_attention_heads`` and
    ``num_transformer_submodules`` are filled from the model at ``get_peft_model`` (as
    peft does); given values must match the model (an adapter for another shape fails).
    """

    json_omit = ("target_modules", "exclude_modules")  # prompt learning wraps no modules

    num_virtual_tokens: int | None = None  # P, the prompt length (required)
    token_dim: int | None = None  # C, the model width (filled from the model)
    num_transformer_submodules: int | None = None  # 1 for a decoder-only model (filled)
    num_attention_heads: int | None = None  # H (filled from the model)
    num_layers: int | None = None  # L (filled from the model)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None or self.exclude_modules is not None:
            raise ValueError(f"{type(self).__name__} wraps no modules: leave target_modules/exclude_modules None")
        if self.num_virtual_tokens is None:
            raise ValueError(f"{type(self).__name__} needs num_virtual_tokens (the prompt length P), e.g. 20")
        for k in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                  "num_layers"):
            _positive_or_none(k, getattr(self, k))
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError("num_transformer_submodules must be 1: minipeft's GPT is decoder-only "
                             f"(2 is for encoder-decoder models), got {self.num_transformer_submodules}")

    def fill_from_model(self, model) -> None:
        """Fill the shape fields from a GPT's config; ValueError if a given one disagrees."""
        cfg = getattr(model, "config", None)
        if cfg is None or not all(hasattr(cfg, k) for k in ("n_layer", "n_embd", "n_head")):
            raise TypeError(f"{self.peft_type} needs a GPT-like model with config.n_layer/n_embd/n_head and a "
                            f"forward taking inputs_embeds_prefix/prefix_key_values, got {type(model).__name__}")
        want = {"token_dim": cfg.n_embd, "num_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "num_transformer_submodules": 1}
        bad = [f"{k}={getattr(self, k)} (model: {v})" for k, v in want.items()
               if getattr(self, k) is not None and getattr(self, k) != v]
        if bad:
            raise ValueError(f"{self.peft_type} config does not fit this model: {', '.join(bad)}. "
                             "Is it an adapter for another base model?")
        for k, v in want.items():
            setattr(self, k, int(v))


def encoder_dtype(wte: Tensor):
    """Prompt weights: float64 on a float64 model (gradient checks), otherwise float32 (as peft)."""
    return np.float64 if wte.dtype == np.float64 else np.float32


class PromptLearningMethod(PeftMethod):
    """Hooks shared by prompt and prefix tuning: encoders in ``peft_model.prompt_encoder``."""

    mergeable = False

    @classmethod
    def find_targets(cls, model, config):
        return []  # wraps nothing

    @classmethod
    def build_encoder(cls, peft_model, config, rng) -> Module:
        raise NotImplementedError

    @classmethod
    def prepare(cls, peft_model, config, adapter_name, targets) -> None:
        config.fill_from_model(peft_model.get_base_model())
        rng = derive_rng(config.seed, "prompt_encoder")  # get_peft_model's rng= does not reach here: seed only
        encoder = cls.build_encoder(peft_model, config, rng)
        if "prompt_encoder" not in peft_model._modules:
            peft_model.prompt_encoder = ModuleDict()
        peft_model.prompt_encoder[adapter_name] = encoder

    @classmethod
    def mark_trainable(cls, peft_model, config, adapter_name) -> None:
        pass  # nothing of the base trains (no bias option in prompt learning)

    @classmethod
    def set_adapter(cls, peft_model, adapter_name, inference_mode) -> None:
        for name, enc in peft_model.prompt_encoder.items():
            enc.requires_grad_(name == adapter_name and not inference_mode)

    @classmethod
    def delete_adapter(cls, peft_model, adapter_name) -> None:
        if "prompt_encoder" in peft_model._modules and adapter_name in peft_model.prompt_encoder:
            del peft_model.prompt_encoder[adapter_name]

    @classmethod
    def check_prefix_arg(cls, key: str, kwargs: dict) -> bool:
        """Whether to add the prefix to this call (not when continuing from a cache)."""
        if kwargs.get(key) is not None:
            raise ValueError(f"{cls.peft_type} supplies {key} itself; do not pass it to the PeftModel")
        return kwargs.get("past_key_values") is None  # the cache already holds the prefix


__all__ = ["PromptLearningConfig", "PromptLearningMethod", "encoder_dtype"]
