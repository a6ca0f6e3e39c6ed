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
(``generation_kwargs``; the base alone inside ``disable_adapter()``).

What prompt and prefix tuning share (``PromptLearningConfig``, ``PromptLearningMethod``) is
in prompt_learning.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy, xp_of
from ..engine import Tensor, no_grad
from ..nn import Embedding, Module, Parameter
from .method import Recipe, register
from .prompt_learning import PromptLearningConfig, PromptLearningMethod, encoder_dtype

BYTE_TOKENIZER_NAME = "minipeft/byte"  # tokenizer_name_or_path meaning minipeft's ByteTokenizer
INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
PROMPT_TOKENS = 20  # the course's prompt length (Lester et al.: 1 -> 20 is the big gain)
PROMPT_TEXT = "Python source code:\n"  # 20 bytes: the course's prompt starts at their embeddings (best init)


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
        self.embedding = Embedding.from_weight(Parameter.from_numpy(weight, dtype, xp))  # (P, C)

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


@register
class PromptTuningMethod(PromptLearningMethod):
    config_class = PromptTuningConfig
    recipes = (Recipe("prompt", f"prompt tuning P={PROMPT_TOKENS}", "additive: soft prompts",
                      lambda n_layer, n_embd: PromptTuningConfig(num_virtual_tokens=PROMPT_TOKENS,
                                                                 prompt_tuning_init="TEXT",
                                                                 prompt_tuning_init_text=PROMPT_TEXT), lr=1e-2,
                      memory=lambda n_layer, n_embd: dict(method="prompt", n_virtual_tokens=PROMPT_TOKENS)),)

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


__all__ = ["PromptTuningConfig", "PromptEmbedding", "PromptTuningMethod", "initial_prompt", "init_ids_from_text",
           "BYTE_TOKENIZER_NAME", "PROMPT_TOKENS", "PROMPT_TEXT"]
