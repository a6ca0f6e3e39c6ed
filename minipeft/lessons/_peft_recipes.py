"""The peft_methods lesson's recipes: each method's config and learning rate, and how it is fine-tuned.

Shared by every part of the lesson (``minipeft.lessons.peft_methods``) and by its study of
adapters against full fine-tuning (``_peft_adapters``): one ``method_config`` per method
of the course, one peak learning rate per method (``LR``), one fine-tuning recipe
(``train_config``: AdamW, cosine schedule after a 5% warm-up, clipping), one validation
measurement (``val_loss``).
"""
from __future__ import annotations

import copy
import sys

from .. import pretrained
from ..data import lm_batches
from ..data.batches import num_eval_windows
from ..gpt import GPT
from ..peft import (BitFitConfig, FullFineTuningConfig, HoulsbyConfig, IA3Config, LoHaConfig, LoKrConfig,
                    LoraConfig, PfeifferConfig, PrefixTuningConfig, PromptTuningConfig, TopKBlocksConfig,
                    VeraConfig, get_peft_model)
from ..train import TrainConfig, train

LINEARS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # the LoRA family adapts every linear layer
PROMPT_TOKENS = 20  # prompt tuning length (Lester et al.: 1 -> 20 is the big gain)
PREFIX_TOKENS = 10  # prefix length (Li & Liang's table-to-text setting)
PROMPT_TEXT = "Python source code:\n"  # 20 bytes: the prompt starts at their embeddings (the paper's best init)

# name -> (label, family); families are the course's taxonomy (Lialin et al. 2023)
METHODS = {
    "full": ("full fine-tuning", "full"),
    "top_k": ("top-k blocks", "selective"),
    "bitfit": ("BitFit", "selective"),
    "lora": ("LoRA r=8", "reparameterization"),
    "rslora": ("rsLoRA r=8", "reparameterization"),
    "dora": ("DoRA r=8", "reparameterization"),
    "loha": ("LoHa r=4", "reparameterization"),
    "lokr": ("LoKr r=8", "reparameterization"),
    "vera": ("VeRA r=256", "reparameterization"),
    "houlsby": ("Houlsby adapter", "additive: adapters"),
    "pfeiffer": ("Pfeiffer adapter", "additive: adapters"),
    "ia3": ("(IA)^3", "additive: adapters"),
    "prefix": (f"prefix tuning P={PREFIX_TOKENS}", "additive: soft prompts"),
    "prompt": (f"prompt tuning P={PROMPT_TOKENS}", "additive: soft prompts"),
}
# Peak learning rates: per method, the lowest final validation loss of a sweep in steps of about 3x,
# extended until the best lay inside the range (the smaller LR when two ended within 0.002 nats), at the CPU
# default budget (tiny base, 300 steps of 8 x 96 tokens, seed 0). Ranges swept: full 3e-4..1e-2; top-k
# 3e-4..3e-2; BitFit 3e-3..3e-1; LoRA, DoRA 1e-3..3e-2; rsLoRA 1e-3..1e-2; LoHa, LoKr, Houlsby, Pfeiffer
# 1e-3..1e-1; VeRA 3e-3..3e-1; (IA)3 1e-2..3e-1; prefix 1e-3..1e-1; prompt 3e-3..1e-1.
LR = {"full": 3e-3, "top_k": 1e-2, "bitfit": 1e-1, "lora": 1e-2, "rslora": 3e-3, "dora": 1e-2, "loha": 3e-2,
      "lokr": 3e-2, "vera": 1e-1, "houlsby": 3e-2, "pfeiffer": 3e-2, "ia3": 1e-1, "prefix": 3e-2, "prompt": 1e-2}

def method_config(name: str, n_layer: int, n_embd: int, seed: int = 0):
    """The ``PeftConfig`` of method ``name`` for a GPT with ``n_layer`` blocks of width ``n_embd``."""
    m = max(2, n_embd // 8)  # bottleneck width: d/8 (Houlsby's 3.6%-of-parameters regime on our bases)
    cfgs = {
        "full": lambda: FullFineTuningConfig(),
        # FT-TOP2 trains 2 of GPT-2 M's 24 blocks; a 2-block base trains its top 1 (2 would be all of them)
        "top_k": lambda: TopKBlocksConfig(top_k_blocks=min(2, n_layer - 1)),
        "bitfit": lambda: BitFitConfig(),
        "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS),
        "rslora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS, use_rslora=True),
        "dora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS, use_dora=True),
        "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=LINEARS),  # LoRA r=8's parameter count
        "lokr": lambda: LoKrConfig(r=8, alpha=8, target_modules=LINEARS),
        "vera": lambda: VeraConfig(r=256, target_modules=LINEARS, save_projection=False),  # A, B from the seed
        "houlsby": lambda: HoulsbyConfig(adapter_size=m),
        "pfeiffer": lambda: PfeifferConfig(adapter_size=m),
        "ia3": lambda: IA3Config(paper_kv_only=True),  # K, V and the MLP's hidden units, as the paper
        # trained through the MLP (hidden = d); the last Linear starts at 0, so the prefix starts at 0
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=PREFIX_TOKENS, prefix_projection=True,
                                             init_weights="zero"),
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=PROMPT_TOKENS, prompt_tuning_init="TEXT",
                                             prompt_tuning_init_text=PROMPT_TEXT),
    }
    if name not in cfgs:
        raise ValueError(f"unknown method {name!r}; methods: {list(cfgs)}")
    cfg = cfgs[name]()
    cfg.seed = seed
    return cfg


def build(name: str, base: GPT, seed: int = 0):
    """A copy of ``base`` with method ``name`` applied (a ``PeftModel``)."""
    c = base.config
    return get_peft_model(copy.deepcopy(base), method_config(name, c.n_layer, c.n_embd, seed))


def val_loss(model, tokens, s, batches: int | None = None) -> float:
    """Mean loss (nats/token) of ``model`` on the first ``batches`` (default: ``val_batches``) batches of ``tokens``."""
    return pretrained.validation_loss(model, tokens, s["block"], batch_size=8, max_batches=batches or s["val_batches"])


def scored_tokens(tokens, s, batches: int) -> int:
    """Tokens that ``val_loss(model, tokens, s, batches)`` scores."""
    return min(num_eval_windows(len(tokens), s["block"]), 8 * batches) * s["block"]


def warmup_steps(steps: int) -> int:
    """Linear warm-up of every fine-tuning run here: 5% of the steps."""
    return max(1, steps // 20)


def train_config(s, lr: float, steps: int, name: str, eval_every: int = 0) -> TrainConfig:
    """The fine-tuning recipe: AdamW without weight decay, cosine to 0 after 5% warm-up, clip 1."""
    return TrainConfig(max_steps=steps, batch_size=s["batch"], lr=lr, schedule="cosine",
                       warmup_steps=warmup_steps(steps), weight_decay=0.0, grad_clip=1.0, eval_every=eval_every,
                       seed=s["seed"], progress=False, run_name=f"peft_methods {name} seed {s['seed']}")


def fine_tune(model, train_tok, val_tok, s, lr: float, steps: int, name: str = "run") -> dict:
    """Train ``model`` for ``steps`` steps (``train_config``); its final validation loss and speed."""
    try:
        res = train(model, lambda r: lm_batches(train_tok, s["batch"], s["block"], r),
                    config=train_config(s, lr, steps, name))
    except FloatingPointError:  # diverged (too large a learning rate)
        return dict(val_loss=float("nan"), steps=0, sec_per_step=float("nan"), tokens_per_sec=float("nan"),
                    diverged=True)
    return dict(val_loss=val_loss(model, val_tok, s), steps=res.final["steps"], sec_per_step=res.final["sec_per_step"],
                tokens_per_sec=res.final["tokens_per_sec"], diverged=False)


def log(msg: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)
