"""Batches for language modeling and for (prompt, target) fine-tuning, and a unigram baseline.

Language modeling (Radford et al., 2019): a window ``w`` of ``T + 1`` consecutive tokens
gives the inputs ``x = w[:-1]`` and the next-token targets ``y = w[1:]``; the loss is
the mean of ``-log p(y_t | x_<=t)``.

Conditional generation (the E2E / table-to-text setting of LoRA, Hu et al., 2021, and
prefix tuning, Li & Liang, 2021): a prompt ``p`` and target ``t`` are concatenated,
``p + t + <|endoftext|>``, and only the target tokens are scored — the targets over
the prompt and over padding are ``IGNORE_INDEX`` (-100, as in PyTorch and Hugging
Face), so the model learns ``p(t | p)`` rather than the prompt text. Sequences are
left-aligned and padded at the end with ``<|pad|>``; a causal model never attends
forward, so padding at the end cannot change the scored positions.

Baseline: a unigram model with add-one (Laplace) smoothing,
``p(v) = (count(v) + 1) / (N + V)``, scores ``H = -1/M sum_i log p(v_i)`` nats per
validation token. A language model has learned something only once it beats it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..backend import to_numpy, xp_of
from .tokenizer import ByteTokenizer

IGNORE_INDEX = -100  # target value the cross-entropy skips (PyTorch's default)
TRUNCATE_MODES = ("error", "left")


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_tokens(tokens, block_size: int, what: str = "tokens") -> int:
    """Length of a 1-D integer token array that can fill one window of ``block_size + 1``."""
    if getattr(tokens, "ndim", None) != 1 or tokens.dtype.kind not in "iu":
        raise TypeError(f"{what} must be a 1-D integer array (e.g. tokenizer.encode(text)), got "
                        f"{type(tokens).__name__} {getattr(tokens, 'dtype', '')} "
                        f"of shape {getattr(tokens, 'shape', None)}")
    n = int(tokens.shape[0])
    if n < block_size + 1:
        raise ValueError(f"{what} has {n} tokens but a window needs block_size + 1 = {block_size + 1}; "
                         "use more text (a larger max_bytes) or a smaller block_size")
    return n


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng


# ---- language modeling ---------------------------------------------------------------------
def lm_batches(tokens, batch_size: int, block_size: int, rng: np.random.Generator):
    """One batch of ``batch_size`` random windows: ``(x, y)``, each int64 ``(B, T)``.

    Starts are drawn uniformly from ``[0, n - T)`` with ``rng`` (NumPy), so the same seed
    gives the same batches on either backend; the gather runs where ``tokens`` lives.
    """
    B, T = _check_positive_int(batch_size, "batch_size"), _check_positive_int(block_size, "block_size")
    n = _check_tokens(tokens, T)
    xp = xp_of(tokens)
    starts = _check_rng(rng).integers(0, n - T, size=B)  # (B,)
    idx = xp.asarray(starts[:, None] + np.arange(T)[None, :])  # (B, T)
    x = tokens[idx].astype(xp.int64)  # (B, T)
    y = tokens[idx + 1].astype(xp.int64)  # (B, T) the next token of each input
    return x, y


def iter_lm_batches(tokens, batch_size: int, block_size: int, rng: np.random.Generator,
                    num_batches: int | None = None) -> Iterator[tuple]:
    """``lm_batches`` again and again: ``num_batches`` times, or forever when None."""
    count = 0
    while num_batches is None or count < num_batches:
        yield lm_batches(tokens, batch_size, block_size, rng)
        count += 1


def num_eval_windows(n_tokens: int, block_size: int) -> int:
    """How many non-overlapping windows ``eval_batches`` reads from ``n_tokens`` tokens."""
    return max((int(n_tokens) - 1) // int(block_size), 0)


def split_validation(tokens):
    """``(select, report)``: the first and second half of ``tokens``, disjoint.

    The select (stopping) slice chooses hyperparameters or the checkpoint to keep; the report
    slice is only scored, so the reported loss is not biased by the choice.
    """
    n = len(tokens)
    if n < 4:
        raise ValueError(f"the validation split has {n} tokens; it needs at least 4 to be cut in two halves")
    return tokens[:n // 2], tokens[n // 2:]


def eval_batches(tokens, batch_size: int, block_size: int,
                 max_batches: int | None = None) -> Iterator[tuple]:
    """Deterministic, non-overlapping windows in order: window ``k`` starts at ``k * T``.

    Every token but the last ``< T`` of the tail is scored exactly once; the last batch
    may hold fewer than ``batch_size`` windows. ``max_batches`` stops early (a quick
    estimate on the first part of the split).
    """
    B, T = _check_positive_int(batch_size, "batch_size"), _check_positive_int(block_size, "block_size")
    if max_batches is not None:
        _check_positive_int(max_batches, "max_batches")
    n = _check_tokens(tokens, T)
    xp = xp_of(tokens)
    windows = num_eval_windows(n, T)
    offsets = np.arange(T)[None, :]  # (1, T)
    for b, first in enumerate(range(0, windows, B)):
        if max_batches is not None and b >= max_batches:
            return
        starts = np.arange(first, min(first + B, windows)) * T  # (b,)
        idx = xp.asarray(starts[:, None] + offsets)  # (b, T)
        yield tokens[idx].astype(xp.int64), tokens[idx + 1].astype(xp.int64)


# ---- (prompt, target) pairs ------------------------------------------------------------------
def _check_pairs(pairs) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise TypeError(f"pairs must be a list of (prompt, target) string pairs, got {type(pairs).__name__}")
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty: need at least one (prompt, target) pair")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and isinstance(pair[0], str) and isinstance(pair[1], str)):
            raise TypeError(f"pairs[{i}] must be a (prompt: str, target: str) pair, got {pair!r:.80}")
    return pairs


def pack_prompt_target(tokenizer: ByteTokenizer, pairs: Sequence[tuple[str, str]], block_size: int,
                       add_eos: bool = True, truncate: str = "error"):
    """Pack pairs into ``(x, y)``, int64 ``(N, block_size)``, loss only on the targets.

    Row ``i`` holds ``ids = prompt + target (+ EOS)``: ``x = ids[:-1]`` then ``<|pad|>``,
    ``y = ids[1:]`` with ``IGNORE_INDEX`` where ``y`` is still a prompt token and over
    the padding. A pair longer than ``block_size + 1`` tokens raises (``truncate='error'``)
    or loses tokens from the start of its prompt (``truncate='left'``).
    """
    T = _check_positive_int(block_size, "block_size")
    if truncate not in TRUNCATE_MODES:
        raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, got {truncate!r}")
    pairs = _check_pairs(pairs)
    x = np.full((len(pairs), T), tokenizer.pad_id, dtype=np.int64)  # (N, T)
    y = np.full((len(pairs), T), IGNORE_INDEX, dtype=np.int64)  # (N, T)
    for i, (prompt, target) in enumerate(pairs):
        p = tokenizer.encode(prompt)
        ids = np.concatenate([p, tokenizer.encode(target, add_eos=add_eos)])  # (L,)
        n_prompt = len(p)
        if len(ids) > T + 1:
            if truncate == "error":
                raise ValueError(
                    f"pairs[{i}] is {len(ids)} tokens (prompt {n_prompt}, target {len(ids) - n_prompt}) "
                    f"but block_size {T} fits {T + 1}; raise block_size or pass truncate='left'")
            drop = len(ids) - (T + 1)
            ids, n_prompt = ids[drop:], max(n_prompt - drop, 0)
        if len(ids) < 2:
            raise ValueError(f"pairs[{i}] has {len(ids)} token(s); a pair needs at least 2 "
                             "(an input and a next token to predict)")
        L = len(ids) - 1
        x[i, :L] = ids[:-1]
        y[i, :L] = ids[1:]
        y[i, : max(n_prompt - 1, 0)] = IGNORE_INDEX  # targets that are still prompt tokens
    return x, y


@dataclass
class PromptTargetBatches:
    """Packed (prompt, target) pairs and the ways to draw batches from them."""

    x: np.ndarray  # (N, T) int64 inputs, <|pad|> after each sequence
    y: np.ndarray  # (N, T) int64 targets, IGNORE_INDEX on prompt and padding
    pad_id: int  # the <|pad|> id used in x

    def __post_init__(self):
        if self.x.shape != self.y.shape or self.x.ndim != 2:
            raise ValueError(f"x and y must share a (N, T) shape, got {self.x.shape} and {self.y.shape}")
        self.lengths = (self.x != self.pad_id).sum(axis=1)  # (N,) non-pad length of each row

    @classmethod
    def from_pairs(cls, tokenizer: ByteTokenizer, pairs, block_size: int, add_eos: bool = True,
                   truncate: str = "error") -> "PromptTargetBatches":
        x, y = pack_prompt_target(tokenizer, pairs, block_size, add_eos=add_eos, truncate=truncate)
        return cls(x, y, tokenizer.pad_id)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx, trim: bool = True):
        """Rows ``idx``; with ``trim`` the padding columns no row of the batch uses are cut."""
        idx = np.asarray(idx, dtype=np.int64)
        width = int(self.lengths[idx].max()) if trim and idx.size else self.x.shape[1]
        return self.x[idx, :width], self.y[idx, :width]  # (b, width) each

    def sample(self, batch_size: int, rng: np.random.Generator, trim: bool = True):
        """``batch_size`` rows drawn uniformly with replacement."""
        B = _check_positive_int(batch_size, "batch_size")
        return self.take(_check_rng(rng).integers(0, len(self), size=B), trim=trim)

    def epoch(self, batch_size: int, rng: np.random.Generator | None = None, trim: bool = True,
              drop_last: bool = False) -> Iterator[tuple]:
        """Every row once, in order (``rng=None``) or shuffled by ``rng``; last batch may be short."""
        B = _check_positive_int(batch_size, "batch_size")
        order = np.arange(len(self)) if rng is None else _check_rng(rng).permutation(len(self))
        for first in range(0, len(self), B):
            idx = order[first: first + B]
            if drop_last and len(idx) < B:
                return
            yield self.take(idx, trim=trim)


# ---- baseline ------------------------------------------------------------------------------
def unigram_cross_entropy(train_tokens, val_tokens, vocab_size: int) -> float:
    """Cross-entropy in nats/token of an add-one-smoothed unigram model fit on ``train_tokens``."""
    V = _check_positive_int(vocab_size, "vocab_size")
    train, val = to_numpy(train_tokens).ravel(), to_numpy(val_tokens).ravel()
    for name, a in (("train_tokens", train), ("val_tokens", val)):
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer ids, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= V):
            raise ValueError(f"{name} has ids outside [0, {V}): min {a.min()}, max {a.max()}; "
                             "is vocab_size the tokenizer's?")
    if val.size == 0:
        raise ValueError("val_tokens is empty: nothing to score")
    counts = np.bincount(train, minlength=V).astype(np.float64) + 1.0  # (V,) add-one smoothing
    log_p = np.log(counts) - np.log(counts.sum())  # (V,)
    return float(-log_p[val].mean())
