"""The peft_methods lesson's recipes: each method's config and learning rate, and how it is fine-tuned.

Shared by every part of the lesson (``minipeft.lessons.peft_methods``) and by its study of
adapters against full fine-tuning (``_peft_adapters``): the methods of the course and their
configs and peak learning rates come from the method table (``minipeft.peft.method_table()``,
each method's file declares its rows); here are one fine-tuning recipe (``train_config``:
AdamW, cosine schedule after a 5% warm-up, clipping) and one validation measurement
(``val_loss``).
"""
from __future__ import annotations

import copy
import sys

from .. import pretrained
from ..data import lm_batches
from ..data.batches import num_eval_windows
from ..gpt import GPT
from ..peft import get_peft_model, method_table
from ..peft.method import BLOCK_LINEARS
from ..peft.prefix_tuning import PREFIX_TOKENS  # noqa: F401 (the lesson's API)
from ..peft.prompt_tuning import PROMPT_TEXT, PROMPT_TOKENS  # noqa: F401 (the lesson's API)
from ..train import TrainConfig, train

LINEARS = list(BLOCK_LINEARS)  # the LoRA family adapts every linear layer
TABLE = method_table()  # name -> Recipe: every method of the course, as its own file declares it

# name -> (label, family); families are the course's taxonomy (Lialin et al. 2023)
METHODS = {name: (r.label, r.family) for name, r in TABLE.items()}
# Peak learning rates (the table's ``lr``): per method, the lowest final validation loss of a sweep in steps
# of about 3x, extended until the best lay inside the range (the smaller LR when two ended within 0.002 nats),
# at the CPU default budget (tiny base, 300 steps of 8 x 96 tokens, seed 0). Ranges swept: full 3e-4..1e-2;
# top-k 3e-4..3e-2; BitFit 3e-3..3e-1; LoRA, DoRA 1e-3..3e-2; rsLoRA 1e-3..1e-2; LoHa, LoKr, Houlsby, Pfeiffer
# 1e-3..1e-1; VeRA 3e-3..3e-1; (IA)3 1e-2..3e-1; prefix 1e-3..1e-1; prompt 3e-3..1e-1.
LR = {name: r.lr for name, r in TABLE.items()}


def method_config(name: str, n_layer: int, n_embd: int, seed: int = 0):
    """The ``PeftConfig`` of method ``name`` for a GPT with ``n_layer`` blocks of width ``n_embd``."""
    if name not in TABLE:
        raise ValueError(f"unknown method {name!r}; methods: {list(TABLE)}")
    cfg = TABLE[name].config(n_layer, n_embd)
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
