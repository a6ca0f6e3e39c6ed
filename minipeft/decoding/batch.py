"""Many prompts of any lengths: left-padded batches, greedy or beam search, and a check on decoders.

Prompts are sorted by length and decoded ``batch_size`` at a time, left-padded with an
attention mask (padding is masked out and takes no position, so every prompt continues
exactly as it would alone).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy
from .beam import LENGTH_PENALTY_STYLES, beam_search, log_softmax
from .greedy import greedy_search
from .loop import array_of, inference, resolve_model, widened


@dataclass
class DecodeConfig:
    """How ``decode`` generates; defaults are greedy decoding."""

    num_beams: int = 1  # K: 1 is greedy; K > 1 beam search with K beams per prompt
    max_new_tokens: int = 64  # most tokens generated per prompt (fewer if the sequence fills block_size)
    eos_token_id: int | None = None  # an output ends with it (it is not returned); None: run max_new_tokens
    length_penalty: float = 1.0  # alpha of lp(n); 0 ranks finished hypotheses by raw log-probability
    length_penalty_style: str = "hf"  # "hf": n ** alpha; "gnmt": ((5 + n) / 6) ** alpha
    no_repeat_ngram_size: int = 0  # n > 0 bans tokens that would repeat an n-gram; 0 = off
    ngram_include_prompt: bool = True  # n-grams of the prompt count too (Hugging Face); False: generated only
    early_stopping: bool = False  # True: done at K finished hypotheses; False: Hugging Face's heuristic
    batch_size: int = 32  # prompts decoded together (each is K rows in beam search)
    pad_token_id: int = 0  # id written into the left padding (masked out, so any valid id works)

    def __post_init__(self) -> None:
        for name in ("num_beams", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"DecodeConfig.{name} must be a positive int, got {v!r}")
        for name in ("max_new_tokens", "no_repeat_ngram_size", "pad_token_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"DecodeConfig.{name} must be a non-negative int, got {v!r}")
        if self.eos_token_id is not None and (isinstance(self.eos_token_id, bool) or self.eos_token_id < 0):
            raise ValueError(f"DecodeConfig.eos_token_id must be None or a token id >= 0, got {self.eos_token_id!r}")
        if not np.isfinite(self.length_penalty):
            raise ValueError(f"DecodeConfig.length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.length_penalty_style not in LENGTH_PENALTY_STYLES:
            raise ValueError(f"DecodeConfig.length_penalty_style must be one of {LENGTH_PENALTY_STYLES}, "
                             f"got {self.length_penalty_style!r}")


def left_pad(prompts: list, pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(idx, mask)``: 1-D prompts right-aligned in a (B, T) batch, T the longest; mask True on the tokens."""
    T = max(len(p) for p in prompts)
    idx = np.full((len(prompts), T), pad_token_id, np.int64)
    mask = np.zeros((len(prompts), T), bool)
    for row, p in enumerate(prompts):
        idx[row, T - len(p):] = p
        mask[row, T - len(p):] = True
    return idx, mask


def _strip(tokens: np.ndarray, eos: int | None) -> np.ndarray:
    if eos is None:
        return tokens
    hit = np.flatnonzero(tokens == eos)
    return tokens[:hit[0]] if hit.size else tokens


def decode(model, prompts, config: DecodeConfig | None = None, progress: bool = False, **overrides) -> list:
    """New tokens (eos removed) for each prompt of ``prompts`` (1-D int arrays of any lengths), in order.

    Prompts are sorted by length and decoded ``config.batch_size`` at a time, left-padded
    with an attention mask; ``config.num_beams`` 1 decodes greedily, more runs beam search.
    Keyword overrides replace fields of ``config`` (``decode(m, p, num_beams=5)``).
    """
    cfg = dataclasses.replace(config or DecodeConfig(), **overrides)
    prompts = [np.asarray(to_numpy(p)).reshape(-1).astype(np.int64) for p in prompts]
    if any(p.size == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    lengths = np.array([p.size for p in prompts])
    order = np.argsort(lengths, kind="stable")
    out: list = [None] * len(prompts)
    chunks = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="decode", unit="batch")
    for chunk in chunks:
        idx, mask = left_pad([prompts[i] for i in chunk], cfg.pad_token_id)
        am = None if mask.all() else mask
        kw = dict(eos_token_id=cfg.eos_token_id, attention_mask=am, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                  ngram_include_prompt=cfg.ngram_include_prompt)
        if cfg.num_beams == 1:
            new = to_numpy(greedy_search(model, idx, cfg.max_new_tokens, **kw))[:, idx.shape[1]:]
            news = [_strip(r, cfg.eos_token_id) for r in new]
        else:
            news = beam_search(model, idx, cfg.num_beams, cfg.max_new_tokens, length_penalty=cfg.length_penalty,
                               length_penalty_style=cfg.length_penalty_style, early_stopping=cfg.early_stopping,
                               **kw)
        for i, r in zip(chunk, news):
            out[i] = np.asarray(r, np.int64)
    return out


def sequence_log_prob(model, prompt, continuation) -> float:
    """log p(continuation | prompt) under ``model`` (one full forward, no cache): a check on decoders."""
    target = resolve_model(model)
    prompt, cont = (np.asarray(to_numpy(a)).reshape(-1).astype(np.int64) for a in (prompt, continuation))
    if cont.size == 0:
        return 0.0
    ids = np.concatenate([prompt, cont])[None, :]  # (1, T)
    with inference(model):
        logits = widened(array_of(target.forward(target.xp.asarray(ids), **target.extra).logits)[0])  # (P + T, V)
    lp = to_numpy(log_softmax(logits))[-ids.shape[1]:]  # the token positions
    T0 = prompt.size
    return float(lp[np.arange(T0 - 1, ids.shape[1] - 1), cont].sum())


__all__ = ["DecodeConfig", "decode", "left_pad", "sequence_log_prob"]
