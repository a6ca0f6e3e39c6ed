"""The one table of model shapes and of the base models minipeft pretrains.

Everything that names a size reads it from here: ``GPTConfig.preset`` (a model's shape),
``minipeft.pretrained`` (how a base is pretrained and cached), the lessons (which base
they fine-tune) and ``minipeft.memory`` (the calculator's named shapes). This module
imports nothing from minipeft, so the memory calculator stays pure arithmetic.

Shapes (methods.md §0.3, the tiny ladder T0..T3 with a byte vocabulary; GPT-2's released
sizes, Radford et al. 2019; GPT-3 175B, Brown et al. 2020, Table 2.1)::

    shape   layers  width  heads  positions
    T0         2      64     2      128
    T0-512     2      64     2      512     (T0 with the context E2E needs)
    T1         4     128     4      512
    T2         6     256     4      512
    T3         8     384     6      512
    gpt2      12     768    12     1024    (GPT-2 small; BPE vocabulary 50257)

**A base knows exactly the positions it was pretrained on.** A base size's
``block_size`` is both its position table and the length of every pretraining window,
so no row of the table is left untrained (``check_base_sizes`` enforces it). A lesson
whose examples are longer than a base's context must pick a longer base; the E2E data
needs 512 bytes (prompt + text), so its CPU base is ``tiny-512`` and its GPU base
``small``. Stretching a table by copying rows (``evaluate.extend_positions``) is only an
explicit option of the evaluation command, never done silently by a lesson.
"""
from __future__ import annotations

from dataclasses import dataclass

BYTE_VOCAB_SIZE = 259  # 256 bytes + <|endoftext|>, <|pad|>, <|bos|> (minipeft.data.tokenizer)
GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE vocabulary

# name -> GPTConfig fields (block_size = number of learned positions)
SHAPES: dict[str, dict] = {
    "T0": dict(n_layer=2, n_embd=64, n_head=2, block_size=128),
    "T0-512": dict(n_layer=2, n_embd=64, n_head=2, block_size=512),
    "T1": dict(n_layer=4, n_embd=128, n_head=4, block_size=512),
    "T2": dict(n_layer=6, n_embd=256, n_head=4, block_size=512),
    "T3": dict(n_layer=8, n_embd=384, n_head=6, block_size=512),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, vocab_size=GPT2_VOCAB_SIZE),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, block_size=1024, vocab_size=GPT2_VOCAB_SIZE),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, block_size=1024, vocab_size=GPT2_VOCAB_SIZE),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, block_size=1024, vocab_size=GPT2_VOCAB_SIZE),
    "gpt3-175b": dict(n_layer=96, n_embd=12288, n_head=96, block_size=2048, vocab_size=GPT2_VOCAB_SIZE),
}


@dataclass(frozen=True)
class BaseSize:
    """A base model minipeft pretrains on local text: its shape and its pretraining recipe."""

    shape: str  # a key of SHAPES
    block_size: int  # positions = pretraining window length (bytes); equal to the shape's
    max_steps: int  # optimizer steps
    batch_size: int  # windows per step
    lr: float  # peak learning rate (linear warm-up, cosine decay to lr / 10)
    warmup_steps: int  # warm-up steps
    device: str  # where its default recipe is meant to run ("cpu": minutes on 2 cores; "cuda": a GPU)
    max_bytes: int | None = None  # training bytes of the corpus to read (None: all)

    @property
    def tokens(self) -> int:
        """Training tokens (bytes) the recipe reads: steps x batch x window."""
        return self.max_steps * self.batch_size * self.block_size


# Recipes: every base sees ~1k-16k tokens per step; the byte-level corpus is ~2 MB of English.
BASES: dict[str, BaseSize] = {
    "tiny": BaseSize("T0", 128, max_steps=1500, batch_size=8, lr=3e-3, warmup_steps=50, device="cpu"),
    "tiny-512": BaseSize("T0-512", 512, max_steps=1500, batch_size=2, lr=3e-3, warmup_steps=50, device="cpu"),
    "small": BaseSize("T1", 512, max_steps=3000, batch_size=16, lr=2e-3, warmup_steps=100, device="cuda"),
    "medium": BaseSize("T2", 512, max_steps=3000, batch_size=16, lr=1e-3, warmup_steps=200, device="cuda"),
    "large": BaseSize("T3", 512, max_steps=2000, batch_size=16, lr=6e-4, warmup_steps=200, device="cuda"),
    "gpt2": BaseSize("gpt2", 1024, max_steps=5000, batch_size=16, lr=3e-4, warmup_steps=300, device="cuda"),
}


def shape_of(name: str) -> dict:
    """GPTConfig fields of a shape (``'T1'``) or of a base size (``'small'``), vocabulary included."""
    if name in BASES:
        name = BASES[name].shape
    if name not in SHAPES:
        raise ValueError(f"unknown model size {name!r}; shapes: {sorted(SHAPES)}; base sizes: {sorted(BASES)}")
    return {"vocab_size": BYTE_VOCAB_SIZE, **SHAPES[name]}


def check_base_sizes() -> None:
    """Every base pretrains on windows as long as its position table (no untrained rows)."""
    for name, b in BASES.items():
        n_pos = SHAPES[b.shape]["block_size"]
        if b.block_size != n_pos:
            raise AssertionError(f"base {name!r}: pretraining windows of {b.block_size} but {n_pos} positions")


check_base_sizes()
