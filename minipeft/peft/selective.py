"""Selective fine-tuning through the PEFT API: BitFit, the top-k blocks, and full fine-tuning.

These methods add no parameters: they choose which of the base model's own tensors
train, so every comparison in the lessons runs through ``get_peft_model`` and one
training loop.

* **BitFit** (Ben Zaken et al., arXiv 2106.10199, §2): only the bias terms train,
  ``peft_type "BITFIT"``. By default every parameter named ``*.bias`` (the Linear biases
  and the LayerNorms' β: 102,144 on GPT-2 small); ``target_modules`` (names/suffixes or a
  regex, peft's matching) restricts it to the biases of those modules.
* **Top-k blocks** (``peft_type "TOP_K_BLOCKS"``; the FT-TOP2 baseline of Li & Liang,
  arXiv 2101.00190, Table 1): every parameter of the last ``top_k_blocks`` blocks of
  ``transformer.h`` trains, and ``ln_f`` with ``train_ln_f``.
* **Full fine-tuning** (``peft_type "FULL"``): every parameter trains (tied weights once).

All three are minipeft-only ``peft_type`` strings (peft has none of them). They train the
base tensors **in place**, so: one adapter per model (a second raises), ``merge`` is a
no-op and ``merge_and_unload()``/``unload()`` return the trained model, and
``disable_adapter()`` raises ``TypeError`` (no untouched base exists: keep a
``copy.deepcopy`` of the model before ``get_peft_model`` to compare). The saved tensors
(``peft_state_dict``) are the trained ones under their base names, e.g.
``base_model.model.transformer.h.0.attn.c_attn.bias`` [2304] (for FULL: the whole model,
``lm_head.weight`` tied to ``transformer.wte.weight`` and saved once).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..nn import ModuleList
from .config import PeftConfig
from .layer import describe_modules, walk
from .method import PeftMethod, Recipe, register

_PREFIX = "base_model.model."


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit: train the bias terms only (minipeft only; ``peft_type "BITFIT"``)."""

    peft_type = "BITFIT"

    target_modules: list[str] | str | None = None  # None: every *.bias; else only biases of these modules


@dataclass
class TopKBlocksConfig(PeftConfig):
    """Fine-tune the last ``top_k_blocks`` transformer blocks (minipeft only)."""

    peft_type = "TOP_K_BLOCKS"
    json_omit = ("target_modules", "exclude_modules")

    top_k_blocks: int = 2  # how many of the last blocks train (FT-TOP2 of the prefix-tuning paper)
    train_ln_f: bool = True  # also train the final LayerNorm
    layers_pattern: str = "h"  # the name of the block list (GPT-2: transformer.h)

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.top_k_blocks
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k_blocks must be a non-negative int, got {k!r}")
        if not isinstance(self.train_ln_f, bool):
            raise TypeError(f"train_ln_f must be True or False, got {self.train_ln_f!r}")
        if k == 0 and not self.train_ln_f:
            raise ValueError("top_k_blocks=0 with train_ln_f=False trains nothing")


@dataclass
class FullFineTuningConfig(PeftConfig):
    """Every parameter trains (minipeft only; ``peft_type "FULL"``)."""

    peft_type = "FULL"
    json_omit = ("target_modules", "exclude_modules")


def _bitfit(model, config: BitFitConfig) -> list[tuple[str, object]]:
    out = []
    for n, p in model.named_parameters():
        owner, _, leaf = n.rpartition(".")
        if leaf != "bias" or config.is_excluded(owner):
            continue
        if config.target_modules is None or config.matches(owner):
            out.append((n, p))
    return out


def _top_k(model, config: TopKBlocksConfig) -> list[tuple[str, object]]:
    lists = [(n, m) for n, m in walk(model) if isinstance(m, ModuleList)
             and (n == config.layers_pattern or n.endswith("." + config.layers_pattern))]
    if len(lists) != 1:
        raise ValueError(f"TOP_K_BLOCKS needs exactly one block list named {config.layers_pattern!r}, found "
                         f"{[n for n, _ in lists]}; set layers_pattern. Modules: {describe_modules(model)}")
    name, blocks = lists[0]
    k = config.top_k_blocks
    if k > len(blocks):
        raise ValueError(f"top_k_blocks={k} but the model has {len(blocks)} blocks in {name}")
    keep = [rf"{re.escape(name)}\.{i}\." for i in range(len(blocks) - k, len(blocks))]
    if config.train_ln_f:
        keep.append(r"(.*\.)?ln_f\.")
    pattern = re.compile("|".join(keep)) if keep else None
    return [(n, p) for n, p in model.named_parameters() if pattern and pattern.match(n)]


def _full(model, config) -> list[tuple[str, object]]:
    return list(model.named_parameters())


class SelectiveMethod(PeftMethod):
    """Shared hooks: choose base tensors, train them in place, save them under their own names."""

    choose = staticmethod(_full)

    @classmethod
    def find_targets(cls, model, config):
        return []  # nothing is wrapped

    @classmethod
    def check_new_adapter(cls, peft_model, config, adapter_name) -> None:
        if peft_model.peft_config:
            raise ValueError(f"{cls.peft_type} trains the base model's own tensors, so a model holds one such "
                             "adapter; deepcopy the base model before get_peft_model to train another")

    @classmethod
    def prepare(cls, peft_model, config, adapter_name, targets) -> None:
        if not cls.choose(peft_model.get_base_model(), config):
            raise ValueError(f"{cls.peft_type}: {config} selects no parameter of this model; its modules are: "
                             f"{describe_modules(peft_model.get_base_model())}")

    @classmethod
    def check_disable(cls, peft_model) -> None:
        """There is nothing to disable: the trained tensors are the base model's own."""
        raise TypeError(f"{cls.peft_type} fine-tunes the base model's own tensors in place, so there is no "
                        "untouched base to run; keep copy.deepcopy(model) from before get_peft_model to compare")

    @classmethod
    def mark_trainable(cls, peft_model, config, adapter_name) -> None:
        for _, p in cls.choose(peft_model.get_base_model(), config):
            p.requires_grad = not config.inference_mode

    @classmethod
    def extra_adapter_state(cls, peft_model, adapter_name):
        cfg = peft_model.peft_config[adapter_name]
        return [(_PREFIX + n, _PREFIX + n, p) for n, p in cls.choose(peft_model.get_base_model(), cfg)]


@register
class TopKBlocksMethod(SelectiveMethod):
    config_class = TopKBlocksConfig
    choose = staticmethod(_top_k)
    # FT-TOP2 trains 2 of GPT-2 M's 24 blocks; a 2-block base trains its top 1 (2 would be all of them)
    recipes = (Recipe("top_k", "top-k blocks", "selective",
                      lambda n_layer, n_embd: TopKBlocksConfig(top_k_blocks=min(2, n_layer - 1)), lr=1e-2),)


@register
class BitFitMethod(SelectiveMethod):
    config_class = BitFitConfig
    choose = staticmethod(_bitfit)
    recipes = (Recipe("bitfit", "BitFit", "selective", lambda n_layer, n_embd: BitFitConfig(), lr=1e-1),)


@register
class FullFineTuningMethod(SelectiveMethod):
    config_class = FullFineTuningConfig
    choose = staticmethod(_full)
    recipes = (Recipe("full", "full fine-tuning", "full", lambda n_layer, n_embd: FullFineTuningConfig(), lr=3e-3,
                      memory=lambda n_layer, n_embd: dict(method="full")),)


__all__ = ["BitFitConfig", "TopKBlocksConfig", "FullFineTuningConfig", "BitFitMethod", "TopKBlocksMethod",
           "FullFineTuningMethod", "SelectiveMethod"]
