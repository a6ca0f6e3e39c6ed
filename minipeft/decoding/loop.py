"""The one decoding loop, and the session of sequences it grows.

Autoregressive decoding (Radford et al. 2019; beam search: Sutskever et al. 2014) repeats
one step: run the model, choose the next token of each row from the last position's
logits, append it. Everything that generates text in minipeft — ``GPT.generate``, greedy
and beam search (``decoding.greedy_search`` / ``beam_search`` / ``decode``), the
multi-adapter server (``serve.LoraServer``) and side tuning — runs :func:`run`; each
supplies only what differs:

* **how to choose** (a *chooser*): argmax, a top-k sample, or the beams' best extensions;
* **which rows are alive**: a chooser may return the rows that continue (beam search
  repeats, reorders and drops rows); the session then selects them, cache included;
* **what runs**: the model to call, the prefixes of prompt/prefix tuning for its first
  call, and for the server the adapter of each row (set on its layers for the loop).

A :class:`Session` holds the token history (R, L), its padding mask and the model's
:class:`~minipeft.kv_cache.KVCache`. ``start()`` runs the prompts once; ``step(tokens)``
runs one new token per row against the cache. Without a cache (``use_cache=False``, or a
model whose forward keeps none, such as side tuning's) each step reruns the whole window.
Positions come from one formula, ``kv_cache.positions``.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

from ..backend import synchronize, xp_of
from ..engine import Tensor, no_grad
from ..kv_cache import positions


def array_of(x):
    """The array of a Tensor, or ``x`` itself."""
    return x.data if isinstance(x, Tensor) else x


def widened(logits):
    """Logits widened to float32 where they are 16-bit (what the LM head writes under a 16-bit ``amp.autocast``):
    log-softmax, sampling and beam scores are float32 arithmetic. float32 and float64 ones as they are."""
    return logits.astype(np.float32) if logits.dtype.itemsize < 4 else logits


# ------------------------------------------------------------------ what runs


@dataclass
class Decodable:
    """What a session calls: the model's forward, the keyword arguments of its first call, whether it caches."""

    forward: object  # a GPT, or the PeftModel itself when its method brings its own forward (side tuning)
    extra: dict  # prompt/prefix tuning's inputs_embeds_prefix / prefix_key_values for the first call
    use_cache: bool  # False: the forward keeps no KVCache, so every step reruns the window
    block_size: int  # positions the model has
    xp: object  # numpy or cupy: where the model's arrays live


def resolve_model(model) -> Decodable:
    """How to decode ``model``: a ``GPT``, a ``PeftModel``, or anything with GPT.forward's signature.

    A ``PeftModel`` decodes through its wrapped GPT (LoRA, adapters, selective tuning live
    inside it, and so does a disabled adapter's base); prompt and prefix tuning add their
    prefixes through their method's ``generation_kwargs``. A method that brings its own
    forward and no ``generation_kwargs`` (side tuning) is decoded through the PeftModel
    itself, without a cache.
    """
    get_base = getattr(model, "get_base_model", None)
    if get_base is None:
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError(f"decoding needs a GPT or a PeftModel, got {type(model).__name__}")
        return Decodable(model, {}, True, model.config.block_size, _xp_of_model(model))
    gpt = get_base()
    out = Decodable(gpt, {}, True, gpt.config.block_size, _xp_of_model(gpt))
    if getattr(model, "_disabled", False):  # disable_adapter(): the base model alone
        return out
    method = model.method
    gen = getattr(method, "generation_kwargs", None)
    if gen is not None:
        out.extra = gen(model)
    elif _has_own_forward(method):
        out.forward, out.use_cache = model, False
    return out


def _has_own_forward(method) -> bool:
    """Whether a PEFT method class overrides the ``forward`` hook of its base class."""
    owners = [c for c in method.__mro__ if "forward" in vars(c)]
    return len(owners) > 1


def _xp_of_model(gpt):
    try:
        return xp_of(gpt.transformer.wte.weight.data)
    except AttributeError:
        return np


@contextlib.contextmanager
def inference(model):
    """Eval mode (no dropout) and no graph, restoring the training flag afterwards."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with no_grad():
            yield
    finally:
        if hasattr(model, "train"):
            model.train(was_training)


# ------------------------------------------------------------------ the session


class Session:
    """Token ids being decoded (R, L), their padding mask, and the model's cache of them.

    ``crop``: when the sequence outgrows ``block_size``, rerun the last window that fits
    (``GPT.generate``, nanoGPT's crop); without it the prompts must fit and
    :meth:`steps` stops where positions run out.
    """

    def __init__(self, target: Decodable, idx, attention_mask=None, extra: dict | None = None,
                 use_cache: bool = True, crop: bool = False) -> None:
        xp = target.xp
        idx = xp.asarray(array_of(idx))
        if idx.ndim != 2 or idx.dtype.kind not in "iu" or idx.shape[1] < 1:
            raise ValueError(f"idx must be integer token ids of shape (B, T) with T >= 1, got {idx.dtype} "
                             f"{idx.shape} (one sequence: pass idx[None])")
        B, T = idx.shape
        self.masked = attention_mask is not None
        mask = xp.asarray(array_of(attention_mask)).astype(bool) if self.masked else xp.ones((B, T), bool)
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask must have the shape of idx {(B, T)}, got {mask.shape}")
        if self.masked and not bool(mask.any(axis=1).all()):
            raise ValueError("every prompt needs at least one kept token (a row of attention_mask is all 0)")
        self.forward, self.xp, self.crop = target.forward, xp, crop
        self.use_cache = use_cache and target.use_cache
        clash = sorted(set(target.extra) & set(extra or {}))
        if clash:
            raise ValueError(f"the model supplies {clash} itself (prompt or prefix tuning); do not pass them")
        self.extra = {**target.extra, **(extra or {})}
        pkv, pe = self.extra.get("prefix_key_values"), self.extra.get("inputs_embeds_prefix")
        self.n_kv = 0 if pkv is None else int(pkv[0][0].shape[2])  # prefix tuning's virtual tokens
        self.n_prompt = 0 if pe is None else int(pe.shape[1])  # prompt tuning's virtual tokens
        self.n_fixed = self.n_kv + self.n_prompt  # positions before the first token
        self.block_size = target.block_size
        self.window = self.block_size - self.n_fixed  # tokens that fit after the prefixes
        if self.window < 1:
            raise ValueError(f"prefixes of {self.n_fixed} positions leave no room in block_size {self.block_size}")
        if not crop and T > self.window:
            raise ValueError(f"prompts of {T} tokens (+ {self.n_fixed} prefix positions) do not fit block_size "
                             f"{self.block_size}; shorten them or use a model with a larger block_size")
        self.tokens, self.mask = idx, mask  # (R, L): the prompts, then each step's token
        self.prompt_length = T
        self.cache = None

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])

    def steps(self, max_new_tokens: int) -> int:
        """Tokens to generate: ``max_new_tokens``, or (without crop) fewer where positions run out."""
        if self.crop:
            return max_new_tokens
        return min(max_new_tokens, self.block_size - self.n_fixed - self.prompt_length + 1)

    def start(self):
        """Run the prompts; the logits (R, V) of each row's next token."""
        return self._run_window()

    def step(self, tokens):
        """Append one token per row (R,) and run it; the logits (R, V) of the next one."""
        xp, R = self.xp, self.rows
        tokens = xp.asarray(tokens, dtype=self.tokens.dtype)
        self.tokens = xp.concatenate([self.tokens, tokens[:, None]], axis=1)  # (R, L + 1)
        self.mask = xp.concatenate([self.mask, xp.ones((R, 1), bool)], axis=1)
        if self.cache is None or self.cache.length + 1 > self.block_size:  # no cache, or it is full
            return self._run_window()
        kw = dict(past_key_values=self.cache, use_cache=True)  # the cache holds the prefixes and its mask
        if self.masked:  # each row continues at its own position: its kept positions so far
            kw["position_ids"] = positions(xp.ones((R, 1), bool), self.cache.next_positions())  # (R, 1)
        out = self.forward(tokens[:, None], **kw)
        self.cache = out.past_key_values
        return widened(array_of(out.logits)[:, -1, :])

    def select(self, rows) -> None:
        """Keep, repeat and reorder rows (R',) of the session: history, mask and cache."""
        r = self.xp.asarray(rows)
        self.tokens, self.mask = self.tokens[r], self.mask[r]
        if self.cache is not None:
            self.cache = self.cache.select(r)

    def join(self, other: "Session") -> None:
        """Append the rows of ``other`` (prompts of its own, already run) to this session: continuous batching.

        Histories and caches of different lengths are aligned on the right, the shorter
        left-padded with masked entries, which take no position and no attention: each row
        continues exactly as it would alone.
        """
        if self.cache is None or other.cache is None:
            raise ValueError("join needs two sessions that have run their prompts (start()) on a key/value cache")
        if self.n_fixed != other.n_fixed or len(self.cache) != len(other.cache):
            raise ValueError("join needs sessions of one model with the same prefixes")
        xp = self.xp
        L = max(self.tokens.shape[1], other.tokens.shape[1])
        tokens, masks = zip(*(_pad_left(s.tokens, s.mask, L, xp) for s in (self, other)))
        self.tokens, self.mask = xp.concatenate(tokens), xp.concatenate(masks)  # (R + R', L)
        S = max(self.cache.length, other.cache.length)
        layers = []
        for (k1, v1), (k2, v2) in zip(self.cache, other.cache):  # (R, H, S_i, D) each
            layers.append(tuple(xp.concatenate([_pad_kv(a, S, xp), _pad_kv(b, S, xp)])
                                for a, b in ((k1, k2), (v1, v2))))  # (R + R', H, S, D)
        cmask = [s.cache.mask if s.cache.mask is not None else xp.ones((s.rows, s.cache.length), bool)
                 for s in (self, other)]
        mask = xp.concatenate([_pad_left(m, m, S, xp)[1] for m in cmask])  # (R + R', S)
        self.cache = type(self.cache)(layers, mask)
        self.masked = True
        self.prompt_length = max(self.prompt_length, other.prompt_length)

    def compact(self) -> None:
        """Drop leading columns that no row keeps (left padding left behind by rows that left)."""
        xp = self.xp
        kept = xp.flatnonzero(self.mask.any(axis=0))
        first = int(kept[0]) if kept.size else 0
        if first:
            self.tokens, self.mask = self.tokens[:, first:], self.mask[:, first:]
        if self.cache is not None and self.cache.mask is not None:
            kept = xp.flatnonzero(self.cache.mask.any(axis=0))
            first = int(kept[0]) if kept.size else 0
            if first:
                layers = [(k[:, :, first:], v[:, :, first:]) for k, v in self.cache]
                self.cache = type(self.cache)(layers, self.cache.mask[:, first:])

    def _run_window(self):
        """The forward over the last ``window`` tokens (all of them at the start), with the prefixes."""
        xp = self.xp
        win, wmask = self.tokens[:, -self.window:], self.mask[:, -self.window:]  # (R, Tw)
        kw = dict(self.extra)
        if self.masked:  # positions count kept tokens only: left padding takes none
            prompt_pos = positions(xp.ones((self.rows, self.n_prompt), bool), self.n_kv)  # (R, P')
            kw.update(attention_mask=wmask, position_ids=xp.concatenate(
                [prompt_pos, positions(wmask, self.n_fixed)], axis=1))  # (R, P' + Tw)
        if self.use_cache:
            kw["use_cache"] = True
        out = self.forward(win, **kw)
        self.cache = out.past_key_values if self.use_cache else None
        return widened(array_of(out.logits)[:, -1, :])


def _pad_left(tokens, mask, length: int, xp):
    """(tokens, mask) (R, L0) left-padded to (R, length): padding 0, masked out."""
    n = length - tokens.shape[1]
    if n == 0:
        return tokens, mask
    return (xp.concatenate([xp.zeros((tokens.shape[0], n), tokens.dtype), tokens], axis=1),
            xp.concatenate([xp.zeros((mask.shape[0], n), bool), mask], axis=1))


def _pad_kv(a, length: int, xp):
    """Keys or values (R, H, S0, D) left-padded with zeros to (R, H, length, D)."""
    n = length - a.shape[2]
    return a if n == 0 else xp.concatenate([xp.zeros(a.shape[:2] + (n,) + a.shape[3:], a.dtype), a], axis=2)


# ------------------------------------------------------------------ the loop


def run(session: Session, choose, steps: int, timing: dict | None = None) -> None:
    """The decoding loop: ``steps`` times, choose each row's next token, then run it.

    ``choose(logits)`` takes the logits (R, V) of the rows' next tokens and returns
    ``(tokens, rows)``: the chosen tokens (R',) and the session rows they continue (None:
    every row, in order); ``choose.finished`` ends the loop early (every row ended). The
    last choice is not run. ``timing`` (a dict) accumulates prefill_s, decode_s,
    prefill_tokens and decode_tokens.
    """
    if steps < 1:
        return
    device = "cpu" if session.xp is np else "cuda"
    clock = _Clock(device, timing)
    n_prompt_tokens = int(session.mask.sum()) if timing is not None else 0  # kept (not padding)
    logits = session.start()
    clock.lap("prefill_s", "prefill_tokens", n_prompt_tokens)
    n_decoded = 0  # rows run by the steps after the prefill
    for t in range(steps):
        tokens, rows = choose(logits)
        if choose.finished or t == steps - 1:
            break
        if rows is not None:
            session.select(rows)
        logits = session.step(tokens)
        n_decoded += session.rows
    clock.lap("decode_s", "decode_tokens", n_decoded)


class _Clock:
    """Wall time of the prefill and of the decode steps, after synchronizing the GPU (only when timing)."""

    def __init__(self, device: str, timing: dict | None) -> None:
        self.device, self.timing = device, timing
        if timing is not None:
            synchronize(device)
            self.t = time.perf_counter()

    def lap(self, key: str, count_key: str | None = None, n: int = 0) -> None:
        if self.timing is None:
            return
        synchronize(self.device)
        now = time.perf_counter()
        self.timing[key] = self.timing.get(key, 0) + now - self.t
        self.t = now
        if count_key:
            self.count(count_key, n)

    def count(self, key: str, n: int) -> None:
        if self.timing is not None:
            self.timing[key] = self.timing.get(key, 0) + n


__all__ = ["Decodable", "Session", "inference", "resolve_model", "run"]
