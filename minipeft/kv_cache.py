"""The key/value cache of autoregressive decoding, and the position of each new token.

A GPT generates one token at a time. The attention of the new token needs the keys and
values of every earlier position, and those never change (the mask is causal), so the
model keeps them instead of recomputing the whole sequence at every step (the "past" of
GPT-2's released code; Hugging Face's ``past_key_values``). Each step then runs one row per
sequence through the blocks.

What the cache holds, per layer ``l`` of ``n_layer``::

    keys[l], values[l]    (B, H, S, D)    B rows, H heads, S cached positions, D = C / H
    mask                  (B, S) bool     True where a cached position may be attended; None: all

The S positions of a row are, in this order:

1. prefix tuning's P virtual tokens: learned keys and values given per layer
   (``prefix_key_values``); no token and no query of their own, but they take positions
   0..P-1, as when Hugging Face GPT-2 gets them as ``past_key_values``;
2. prompt tuning's P' virtual tokens: learned input embeddings (``inputs_embeds_prefix``)
   that run through the blocks like tokens, at positions P..P+P'-1;
3. the tokens: the prompt, then one generated token per step.

Prefixes are given to the first call only: after it the cache holds them.

**How positions advance.** Left padding lets prompts of different lengths share a batch;
a padded position is masked out and must not count. The position of a new entry is the
number of kept positions before it in its row::

    position = start + max(cumsum(mask) - 1, 0)       # positions(mask, start)

with ``start`` the row's offset: P + P' for the prompt's tokens (the prefixes are always
kept), and afterwards ``next_positions()``, the number of kept positions in the cache
(``mask.sum(1)``). Rows of a batch thus sit at different offsets, and each continues
exactly as its prompt alone would (Hugging Face's ``generate`` counts positions the same
way). Without padding every row's offset is S and the positions are consecutive.

A ``KVCache`` is a value: ``GPT.forward(..., past_key_values=cache, use_cache=True)``
returns a new one (the old keys and values with the new ones appended); ``select(rows)``
keeps, repeats or reorders rows (beam search). It reads like the list of per-layer
``(k, v)`` pairs it replaces: ``cache[l]`` is layer l's pair, ``len(cache)`` is n_layer.
"""
from __future__ import annotations

from .backend import xp_of


def positions(mask, start):
    """Position of each new entry: ``start`` + the kept entries before it (left padding shares its neighbour's).

    ``mask`` (B, T) bool, True for kept entries; ``start`` an int or (B,) per-row offsets.
    Returns (B, T) integer positions.
    """
    xp = xp_of(mask)
    start = xp.asarray(start)
    return (start[:, None] if start.ndim else start) + xp.maximum(xp.cumsum(mask, axis=1) - 1, 0)


class KVCache:
    """Per-layer keys and values (B, H, S, D) of the positions seen so far, and which of them are kept (B, S)."""

    def __init__(self, layers, mask=None) -> None:
        self.layers = [(k, v) for k, v in layers]  # per layer (k, v) arrays, (B, H, S, D)
        if not self.layers:
            raise ValueError("a KVCache needs one (k, v) pair per layer, got none")
        B, S = self.layers[0][0].shape[0], self.layers[0][0].shape[2]
        if mask is not None and tuple(mask.shape) != (B, S):
            raise ValueError(f"KVCache mask must be (B, S) = {(B, S)}, the batch and length of its keys; "
                             f"got {tuple(mask.shape)}")
        self.mask = mask  # (B, S) bool, or None: every cached position is kept

    @property
    def length(self) -> int:
        """S: cached positions per row (prefixes and padding included)."""
        return int(self.layers[0][0].shape[2])

    @property
    def batch_size(self) -> int:
        return int(self.layers[0][0].shape[0])

    def next_positions(self):
        """Each row's next position: its kept cached positions, (B,) (an int S without padding)."""
        return self.length if self.mask is None else self.mask.sum(axis=1)

    def select(self, rows) -> "KVCache":
        """The cache of ``rows`` (R,) of this one, in that order (rows may repeat: beam expansion)."""
        r = xp_of(self.layers[0][0]).asarray(rows)
        return KVCache([(k[r], v[r]) for k, v in self.layers], None if self.mask is None else self.mask[r])

    # the list of (k, v) pairs it stands for
    def __getitem__(self, layer: int):
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self) -> str:
        k = self.layers[0][0]
        return f"KVCache(layers={len(self)}, shape={tuple(k.shape)}, padded={self.mask is not None})"


__all__ = ["KVCache", "positions"]
