"""Prompt tuning (Lester et al., arXiv 2104.08691, §2): a learned soft prompt.

The frozen model reads ``[P_e; X_e]``: P learned rows P_e (P, C) in front of the token
embeddings X_e (methods.md §11). As in peft + Hugging Face GPT-2 (peft-format.md §4.6)
the rows go in **before** the position embeddings are added, so the virtual tokens take
positions 0..P-1 and the real tokens P..P+T-1; the attention mask gets P leading ones
and the loss covers the real tokens only (the labels' P leading -100s). minipeft's GPT
does all of that when given ``inputs_embeds_prefix`` (see ``GPT.forward``); the logits
cover all P + T positions, as peft's.

In memory the prompt is ``prompt_encoder.<adapter>.embedding.weight`` (P, C) (peft's
name); on disk it is the single tensor ``prompt_embeddings`` (no ``base_model.model.``
prefix). Initializations (``prompt_tuning_init``, peft's):

* ``"RANDOM"``: N(0, 1), ``torch.nn.Embedding``'s default (the paper's uniform
  [-0.5, 0.5] is not peft's);
* ``"SAMPLE_VOCAB"``: rows of the token embedding at ids drawn uniformly from the whole
  vocabulary (the paper restricts to the 5,000 most common tokens);
* ``"TEXT"``: the embeddings of ``prompt_tuning_init_text``, its ids repeated or cut to P.
  The tokenizer is minipeft's ``ByteTokenizer`` (``tokenizer_name_or_path`` None or
  ``"minipeft/byte"``), or any object with ``encode(text) -> ids`` passed as
  ``tokenizer=`` (runtime only, e.g. GPT-2's BPE tokenizer for a GPT-2 base). minipeft
  never downloads a tokenizer.

``generate`` works on the PeftModel: it calls ``GPT.generate(inputs_embeds_prefix=...)``
(and the base alone inside ``disable_adapter()``).

This file also holds what prompt and prefix tuning share: ``PromptLearningConfig``
(peft's fields, filled from the model as peft does) and the ``generate`` override.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy, xp_of
from ..engine import Tensor, no_grad
from ..nn import Embedding, Module, ModuleDict
from .config import PeftConfig
from .lora import new_param
from .tuner import PeftMethod, derive_rng, register

BYTE_TOKENIZER_NAME = "minipeft/byte"  # tokenizer_name_or_path meaning minipeft's ByteTokenizer
INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


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


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """peft's ``PromptTuningConfig`` (peft 0.21 fields and defaults), plus runtime ``tokenizer``."""

    peft_type = "PROMPT_TUNING"
    runtime_fields = ("seed", "tokenizer")

    prompt_tuning_init: str = "RANDOM"  # "RANDOM" N(0,1) | "SAMPLE_VOCAB" | "TEXT"
    prompt_tuning_init_text: str | None = None  # the text for "TEXT"
    tokenizer_name_or_path: str | None = None  # for "TEXT": None or "minipeft/byte" = ByteTokenizer
    tokenizer_kwargs: dict | None = None  # peft's AutoTokenizer arguments; unused by minipeft
    tokenizer: object = None  # minipeft only, not saved: an object with encode(text) -> ids for "TEXT"

    def __post_init__(self) -> None:
        super().__post_init__()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # peft's enum -> str
        if init not in INITS:
            raise ValueError(f"prompt_tuning_init must be one of {INITS}, got {self.prompt_tuning_init!r}")
        self.prompt_tuning_init = str(init)
        if init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text whose token "
                             "embeddings start the prompt)")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs only make sense with prompt_tuning_init='TEXT' (as in peft)")
        if init == "TEXT" and self.tokenizer is None and self.tokenizer_name_or_path not in (
                None, BYTE_TOKENIZER_NAME):
            raise ValueError(f"minipeft cannot load the tokenizer {self.tokenizer_name_or_path!r} (nothing is "
                             f"downloaded): pass tokenizer=<an object with encode(text) -> ids>, or use "
                             f"tokenizer_name_or_path={BYTE_TOKENIZER_NAME!r} (minipeft's ByteTokenizer)")
        if self.tokenizer is not None and not callable(getattr(self.tokenizer, "encode", None)):
            raise TypeError(f"tokenizer must have an encode(text) -> ids method, got {type(self.tokenizer).__name__}")
        if init == "TEXT" and self.tokenizer_name_or_path is None and self.tokenizer is None:
            self.tokenizer_name_or_path = BYTE_TOKENIZER_NAME  # recorded (peft requires one for TEXT)


class PromptEmbedding(Module):
    """peft's ``PromptEmbedding``: ``embedding.weight`` (P, C) is the soft prompt."""

    def __init__(self, weight: np.ndarray, dtype=np.float32, xp=np) -> None:
        super().__init__()
        self.embedding = Embedding(1, 1, rng=0)  # a cheap shell; the weight is set below
        self.embedding.num_embeddings, self.embedding.embedding_dim = weight.shape
        self.embedding.weight = new_param(weight, dtype, xp)  # (P, C)

    def forward(self) -> Tensor:
        return self.embedding.weight  # (P, C)


def init_ids_from_text(ids, n: int) -> np.ndarray:
    """peft's rule: the text's ids cut to n, or repeated ceil(n / len) times then cut."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if not ids:
        raise ValueError("prompt_tuning_init_text encodes to no tokens; give a non-empty text")
    if len(ids) < n:
        ids = ids * math.ceil(n / len(ids))
    return np.asarray(ids[:n], dtype=np.int64)


def encoder_dtype(wte: Tensor):
    """Prompt weights: float64 on a float64 model (gradient checks), otherwise float32 (as peft)."""
    return np.float64 if wte.dtype == np.float64 else np.float32


def initial_prompt(config: PromptTuningConfig, wte: Tensor, rng: np.random.Generator) -> np.ndarray:
    """The (P, C) starting prompt for ``config.prompt_tuning_init`` (peft's ``PromptEmbedding``)."""
    P, C = config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim
    init = config.prompt_tuning_init
    if init == "RANDOM" or config.inference_mode:  # in inference mode the file fills it, as in peft
        return rng.standard_normal((P, C))
    V = wte.shape[0]
    if init == "SAMPLE_VOCAB":
        ids = rng.integers(0, V, P)
    else:
        tok = config.tokenizer
        if tok is None:
            from ..data.tokenizer import ByteTokenizer

            tok = ByteTokenizer()
        ids = init_ids_from_text(tok.encode(config.prompt_tuning_init_text), P)
        if int(ids.max()) >= V or int(ids.min()) < 0:
            raise ValueError(f"the init text's token ids reach {int(ids.max())} but the model's vocabulary has {V} "
                             "tokens: use the tokenizer the model was trained with (tokenizer=...)")
    return to_numpy(wte.data)[ids]  # (P, C) rows of the token embedding


# ----------------------------------------------------------- shared by prompt and prefix tuning


def install_generate(peft_model) -> None:
    """Give ``peft_model`` a ``generate`` that passes the method's prefix to ``GPT.generate``.

    ``PeftModel`` forwards unknown attributes (``generate``) to the base model, which
    knows nothing of the prompt; this instance attribute takes precedence. The method
    supplies the extra arguments through ``generation_kwargs(peft_model)``.
    """
    if "generate" not in peft_model.__dict__:
        peft_model.generate = types.MethodType(_generate, peft_model)


def _generate(self, idx, max_new_tokens: int, **kwargs):
    """``GPT.generate`` with the active adapter's prompt/prefix (the base alone when disabled)."""
    base = self.get_base_model()
    if not self._disabled:
        extra = self.method.generation_kwargs(self)
        clash = [k for k in extra if kwargs.get(k) is not None]
        if clash:
            raise ValueError(f"{self.peft_type} supplies {clash} itself; do not pass them to generate()")
        kwargs.update(extra)
    return base.generate(idx, max_new_tokens, **kwargs)


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
        install_generate(peft_model)

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


@register
class PromptTuningMethod(PromptLearningMethod):
    peft_type = "PROMPT_TUNING"
    config_class = PromptTuningConfig

    @classmethod
    def build_encoder(cls, peft_model, config, rng) -> Module:
        wte = peft_model.get_base_model().transformer.wte.weight
        return PromptEmbedding(initial_prompt(config, wte, rng), encoder_dtype(wte), xp_of(wte.data))

    @classmethod
    def prompt(cls, peft_model) -> Tensor:
        """The active adapter's prompt as (1, P, C)."""
        w = peft_model.prompt_encoder[peft_model.active_adapter]()  # (P, C)
        return w.reshape(1, *w.shape)

    @classmethod
    def forward(cls, peft_model, *args, **kwargs):
        if cls.check_prefix_arg("inputs_embeds_prefix", kwargs):
            kwargs["inputs_embeds_prefix"] = cls.prompt(peft_model)  # (1, P, C), broadcast over the batch
        return peft_model.base_model(*args, **kwargs)

    @classmethod
    def generation_kwargs(cls, peft_model) -> dict:
        with no_grad():
            return {"inputs_embeds_prefix": cls.prompt(peft_model).data}

    @classmethod
    def extra_adapter_state(cls, peft_model, adapter_name):
        if "prompt_encoder" not in peft_model._modules or adapter_name not in peft_model.prompt_encoder:
            return []
        w = peft_model.prompt_encoder[adapter_name].embedding.weight
        return [(f"prompt_encoder.{adapter_name}.embedding.weight", "prompt_embeddings", w)]


__all__ = ["PromptLearningConfig", "PromptTuningConfig", "PromptEmbedding", "PromptTuningMethod",
           "PromptLearningMethod", "initial_prompt", "init_ids_from_text", "install_generate", "BYTE_TOKENIZER_NAME"]
