"""minipeft.peft: parameter-efficient fine-tuning methods behind one API (Hugging Face peft's).

Use::

    from minipeft.peft import LoraConfig, get_peft_model
    model = get_peft_model(gpt, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    model.print_trainable_parameters()   # trainable params: ... || all params: ... || trainable%: ...
    out = model(idx, targets)            # calls the wrapped GPT
    model.merge_and_unload()             # plain GPT with the adapter folded into its weights

Names match peft's: ``PeftModel.base_model`` (a ``TunerModel``) ``.model`` (the GPT), so
``model.named_parameters()`` gives ``base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight``,
and ``model.peft_state_dict()`` gives peft's on-disk keys (the adapter name stripped).

Where things are
----------------
* ``layer.py``: ``BaseTunerLayer`` (a module wrapped with named adapters: forward, merge,
  unmerge) and ``ModulesToSaveWrapper``;
* ``method.py``: ``PeftMethod`` (one method's hooks), ``@register`` (the one registry,
  keyed by the config's ``peft_type``) and the method table (``method_table()``: how the
  course runs each method; the lessons, the memory predictions and the tests read it);
* ``model.py``: ``PeftModel`` and ``get_peft_model``; ``config.py``: ``PeftConfig``
  (peft's ``adapter_config.json``); ``io.py``: adapter files in peft's format;
* one file per method: ``lora.py`` (with ``dora.py`` and ``lora_slices.py``), ``loha.py``
  and ``lokr.py`` (on ``lycoris.py``), ``vera.py``, ``adapters.py`` (Houlsby, Pfeiffer),
  ``ia3.py``, ``prompt_tuning.py``, ``prefix_tuning.py``, ``selective.py`` (BitFit, top-k
  blocks, full fine-tuning), ``side_tuning.py`` (Side-Tuning, LST, QST); ``qlora.py`` is
  the QLoRA recipe (a 4-bit base plus LoRA).

A new method is its own file plus one line below (its import, which registers it): see
``README.md`` in this folder for the walk-through, and ``tests/peft/test_new_method.py``
for it done and tested.
"""
from .config import PeftConfig
from .layer import BaseTunerLayer, ModulesToSaveWrapper
from .method import FAMILIES, REGISTRY, PeftMethod, Recipe, method_table, register
from .model import PeftModel, TunerModel, get_peft_model

# The methods: importing a method's module registers it (one line per method).
from .lora import LoraConfig, LoraLayer  # noqa: E402
from .lora_init import LoftQConfig  # noqa: E402  (init_lora_weights="loftq")
from .loha import LoHaConfig, LoHaLayer  # noqa: E402
from .lokr import LoKrConfig, LoKrLayer  # noqa: E402
from .vera import VeraConfig, VeraLayer  # noqa: E402
from .adapters import BottleneckConfig, BottleneckLayer, HoulsbyConfig, PfeifferConfig  # noqa: E402
from .ia3 import IA3Config, IA3Layer  # noqa: E402
from .prefix_tuning import (PrefixTuningConfig, load_prefix_prompt_embeddings,  # noqa: E402
                            prefix_prompt_embeddings, remove_reparameterization)
from .prompt_tuning import PromptTuningConfig  # noqa: E402
from .selective import BitFitConfig, FullFineTuningConfig, TopKBlocksConfig  # noqa: E402
from .side_tuning import LSTConfig, QSTConfig, SideTuningConfig, held_leaf_bytes, set_alpha  # noqa: E402

from .io import from_pretrained, load_adapter, save_adapter  # noqa: E402  (peft-format adapter files)
from .qlora import get_qlora_model  # noqa: E402  (the QLoRA recipe: a 4-bit base plus LoRA)

__all__ = [
    "get_peft_model", "PeftModel", "PeftConfig", "PeftMethod", "BaseTunerLayer", "ModulesToSaveWrapper",
    "TunerModel", "REGISTRY", "register", "Recipe", "method_table", "FAMILIES",
    "LoraConfig", "LoraLayer", "LoftQConfig", "LoHaConfig", "LoHaLayer", "LoKrConfig", "LoKrLayer", "VeraConfig", "VeraLayer",
    "BottleneckConfig", "BottleneckLayer", "HoulsbyConfig", "PfeifferConfig", "IA3Config", "IA3Layer",
    "PromptTuningConfig", "PrefixTuningConfig", "prefix_prompt_embeddings", "load_prefix_prompt_embeddings",
    "remove_reparameterization", "BitFitConfig", "TopKBlocksConfig", "FullFineTuningConfig",
    "SideTuningConfig", "LSTConfig", "QSTConfig", "set_alpha", "held_leaf_bytes",
    "save_adapter", "load_adapter", "from_pretrained", "get_qlora_model",
]
