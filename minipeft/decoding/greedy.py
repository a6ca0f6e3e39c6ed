"""Greedy decoding and sampling: one token per row, chosen from the last position's logits.

Greedy decoding takes ``y_t = argmax_v p(v | x, y_<t)``; sampling draws ``y_t`` from
``softmax(z / temperature)`` restricted to the ``top_k`` largest logits (Fan et al. 2018,
arXiv 1805.04833), by inverse-CDF with a seeded ``numpy.random.Generator``. A row that
emitted ``eos_token_id`` keeps emitting it; decoding stops when every row has.

``no_repeat_ngram_size = n`` (Paulus et al. 2017, arXiv 1705.04304, §2.5; Hugging Face's
``NoRepeatNGramLogitsProcessor``) gives probability 0 to any token that would complete an
n-gram already in the sequence — the prompt included, as Hugging Face does, or only the
generated part (``ngram_include_prompt=False``, which suits byte-level models whose
outputs copy long spans of the prompt).

:class:`PickTokens` is the chooser :func:`~minipeft.decoding.loop.run` calls;
:func:`generate` (``GPT.generate``, side tuning's ``generate``) and :func:`greedy_search`
are that loop with it.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy, xp_of
from .loop import Session, array_of, inference, resolve_model, run


def sample_next(logits: np.ndarray, greedy: bool, temperature: float, top_k, rng: np.random.Generator,
                top_p: float | None = None) -> np.ndarray:
    """Next token per row of ``logits`` (B, V) float64 on the host: argmax, or a sample at ``temperature``.

    Sampling keeps the ``top_k`` most likely tokens, then the nucleus of ``top_p``; each row
    draws one uniform number from ``rng``.
    """
    if greedy:
        return logits.argmax(axis=-1)
    return sample_rows(logits, temperature, top_k, top_p, rng.random(len(logits)))


def sample_rows(logits: np.ndarray, temperature, top_k, top_p, u: np.ndarray) -> np.ndarray:
    """Sample one token per row of ``logits`` (B, V) with per-row settings and uniform numbers ``u`` (B,).

    ``temperature``: a number or (B,); ``top_k``: None, an int or (B,) ints (0: all tokens);
    ``top_p``: None, a number or (B,) (1.0: all tokens). Hugging Face's order: temperature,
    then top-k, then top-p (nucleus sampling, Holtzman et al. 2019, arXiv 1904.09751: the
    most likely tokens whose probabilities sum to at least p). Then an inverse-CDF draw:
    the token where the cumulative probability passes ``u``. A row gets the same token
    whatever the other rows are, so a request decoded in any batch samples as it would alone.
    """
    B, V = logits.shape
    temperature = np.asarray(temperature, np.float64)
    z = logits / (temperature[:, None] if temperature.ndim else temperature)  # (B, V)
    if top_k is not None:
        k = np.broadcast_to(np.asarray(top_k, np.int64), (B,))
        kth = np.take_along_axis(np.sort(z, axis=-1), np.clip(V - k, 0, V - 1)[:, None], axis=-1)  # (B, 1)
        kth = np.where(((k > 0) & (k < V))[:, None], kth, -np.inf)  # k-th largest logit (0 or V: keep all)
        z = np.where(z < kth, -np.inf, z)
    if top_p is not None:
        p_top = np.broadcast_to(np.asarray(top_p, np.float64), (B,))
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)  # (B, V)
        order = np.argsort(-p, axis=-1, kind="stable")  # most likely first
        sp = np.take_along_axis(p, order, axis=-1)
        keep_sorted = np.cumsum(sp, axis=-1) - sp < p_top[:, None]  # the mass before it is still below p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        z = np.where(keep, z, -np.inf)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)  # (B, V), unnormalised
    u = np.asarray(u)[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), V - 1)  # inverse-CDF sample


def banned_ngram_tokens(seqs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, tokens)``: tokens that would complete an n-gram already in each row of ``seqs`` (R, L).

    Negative entries (padding) match nothing. Vectorized over rows and positions: the
    last n-1 tokens are compared with every earlier window of n-1.
    """
    R, L = seqs.shape
    m = L - n + 1  # complete n-grams in a row
    if n < 1 or m <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    match = np.ones((R, m), bool)  # (R, m): window i's first n-1 tokens equal the row's last n-1
    for j in range(n - 1):
        match &= seqs[:, j:j + m] == seqs[:, L - n + 1 + j:L - n + 2 + j]
    r, i = np.nonzero(match)
    tok = seqs[r, i + n - 1]
    keep = tok >= 0
    return r[keep], tok[keep]


def ban_ngrams(logp, seqs: np.ndarray, n: int):
    """Set to -inf, in place, the scores of tokens that would repeat an n-gram of ``seqs`` (R, L)."""
    rows, toks = banned_ngram_tokens(seqs, n)
    if rows.size:
        xp = xp_of(logp)
        logp[xp.asarray(rows), xp.asarray(toks)] = -np.inf
    return logp


def prompt_codes(idx, attention_mask, include: bool = True) -> np.ndarray:
    """Prompt ids for n-gram bans (B, T), padding replaced by distinct negative codes (they match nothing).

    ``include=False``: an empty (B, 0) history (bans look at generated tokens only).
    """
    ids = to_numpy(array_of(idx)).astype(np.int64)
    if not include:
        return np.zeros((ids.shape[0], 0), np.int64)
    if attention_mask is None:
        return ids
    mask = to_numpy(array_of(attention_mask)).astype(bool)
    codes = -1 - np.arange(ids.shape[1])[None, :]
    return np.where(mask, ids, codes)


class PickTokens:
    """The chooser of greedy decoding and sampling: one token per row; rows never change.

    Greedy choices stay on the model's device (``argmax`` of the logits); sampling and
    n-gram bans work on the host in float64.
    """

    def __init__(self, xp, rows: int, greedy: bool = True, temperature: float = 1.0, top_k: int | None = None,
                 rng: np.random.Generator | None = None, eos_token_id: int | None = None,
                 no_repeat_ngram_size: int = 0, prompt: np.ndarray | None = None, top_p: float | None = None) -> None:
        self.xp, self.greedy, self.temperature, self.top_k, self.rng = xp, greedy, temperature, top_k, rng
        self.top_p = top_p
        self.eos, self.ngram = eos_token_id, no_repeat_ngram_size
        self.history = prompt if prompt is not None else np.zeros((rows, 0), np.int64)  # host, for bans
        self.done = np.zeros(rows, bool)  # rows that emitted eos
        self.new: list = []  # (R,) chosen tokens per step, on the device

    @property
    def finished(self) -> bool:
        return self.eos is not None and bool(self.done.all())

    def __call__(self, logits):
        if self.greedy and not self.ngram:
            nxt = self.xp.argmax(logits, axis=-1)  # (R,), on the device
        else:
            z = to_numpy(logits).astype(np.float64)  # (R, V)
            if self.ngram:
                z = ban_ngrams(z, self.history, self.ngram)
            nxt = sample_next(z, self.greedy, self.temperature, self.top_k, self.rng, self.top_p)  # (R,)
        if self.eos is not None:
            nxt = np.where(self.done, self.eos, to_numpy(nxt))
            self.done |= nxt == self.eos
        if self.ngram:
            self.history = np.concatenate([self.history, to_numpy(nxt).astype(np.int64)[:, None]], axis=1)
        self.new.append(self.xp.asarray(nxt))
        return self.new[-1], None

    def tokens(self, dtype):
        """The chosen tokens (R, n), on the device."""
        xp = self.xp
        return xp.stack(self.new, axis=1).astype(dtype) if self.new else xp.zeros((len(self.done), 0), dtype)


def check_sampling(temperature: float, top_k, top_p, vocab_size: int | None = None) -> None:
    """ValueError unless temperature > 0, top_k None or in [1, vocab_size], top_p None or in (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature!r}); use greedy=True (or do_sample=False) "
                         "for argmax decoding")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1
                              or (vocab_size is not None and top_k > vocab_size)):
        raise ValueError(f"top_k must be None or an int in [1, {vocab_size or 'vocab_size'}], got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def _check_sampling(max_new_tokens: int, greedy: bool, temperature: float, top_k, vocab_size: int,
                    top_p=None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy:
        check_sampling(temperature, top_k, top_p, vocab_size)
    elif top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}], got {top_k}")


def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             greedy: bool = False, seed=None, eos_token_id: int | None = None, attention_mask=None,
             use_cache: bool = True, extra: dict | None = None, top_p: float | None = None):
    """``GPT.generate`` for a GPT or a PeftModel: continue ``idx`` (B, T); returns (B, T + n) ids on the device.

    Greedy, or sampling at ``temperature`` among the ``top_k`` most likely tokens and the
    nucleus of ``top_p``, with ``seed`` (int or numpy Generator). The sequence may outgrow ``block_size``: each step
    then reruns the last window that fits (nanoGPT's crop). ``extra``: prompt/prefix
    tuning's ``inputs_embeds_prefix`` / ``prefix_key_values`` for the first call.
    """
    target = resolve_model(model)
    _check_sampling(max_new_tokens, greedy, temperature, top_k, _vocab_size(model), top_p)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    with inference(model):
        session = Session(target, idx, attention_mask, extra, use_cache=use_cache, crop=True)
        pick = PickTokens(target.xp, session.rows, greedy, temperature, top_k, rng, eos_token_id, top_p=top_p)
        prompts = session.tokens
        run(session, pick, session.steps(max_new_tokens))
        return target.xp.concatenate([prompts, pick.tokens(prompts.dtype)], axis=1)  # (B, T + n)


def _vocab_size(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.vocab_size


def greedy_search(model, idx, max_new_tokens: int, eos_token_id: int | None = None, attention_mask=None,
                  no_repeat_ngram_size: int = 0, ngram_include_prompt: bool = True):
    """Greedy continuation of ``idx`` (B, T); returns (B, T + n) ids, like ``GPT.generate(greedy=True)``.

    A row that emitted ``eos_token_id`` keeps emitting it; decoding stops when every row
    has, after ``max_new_tokens``, or when the sequence fills ``block_size`` (it never
    crops: a cropped window would drop the start of the prompt).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    target = resolve_model(model)
    with inference(model):
        session = Session(target, idx, attention_mask)
        prompt = prompt_codes(idx, attention_mask, ngram_include_prompt) if no_repeat_ngram_size else None
        pick = PickTokens(target.xp, session.rows, eos_token_id=eos_token_id,
                          no_repeat_ngram_size=no_repeat_ngram_size, prompt=prompt)
        prompts = session.tokens
        run(session, pick, session.steps(max_new_tokens))
        return target.xp.concatenate([prompts, pick.tokens(prompts.dtype)], axis=1)  # (B, T + n)


__all__ = ["PickTokens", "generate", "greedy_search", "sample_next", "sample_rows", "check_sampling",
           "banned_ngram_tokens", "ban_ngrams", "prompt_codes"]
