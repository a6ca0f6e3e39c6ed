"""Decoding for conditional generation: batched greedy and beam search over the key/value cache.

Greedy decoding takes ``y_t = argmax_v log p(v | x, y_<t)`` at every step. Beam search
(Sutskever et al. 2014, arXiv 1409.3215, §3.2; the decoder of the E2E experiments of
prefix tuning, arXiv 2101.00190, and LoRA, arXiv 2106.09685 — beam 5 and beam 10) keeps
the ``K`` best partial outputs of each prompt by their summed log-probability
``s(y_1..t) = s(y_<t) + log p(y_t | x, y_<t)``. At each step every beam's extensions are
scored and the ``2K`` best candidates of the prompt are ranked (Hugging Face's
``generate``):

* a candidate that ends with ``eos`` and ranks among the first ``K`` becomes a *finished
  hypothesis*, ranked by its length-normalised score ``s(Y) / lp(|Y|)`` with
  ``lp(n) = n ** alpha`` (Hugging Face's ``length_penalty``; |Y| counts the eos) or
  ``lp(n) = ((5 + n) / 6) ** alpha`` (GNMT, Wu et al. 2016, arXiv 1609.08144, eq. 14);
  alpha > 0 favours longer outputs, alpha < 0 shorter ones;
* the best ``K`` candidates that do not end with ``eos`` continue as the next beams.

A prompt is done when it holds ``K`` finished hypotheses and (``early_stopping=False``,
Hugging Face's heuristic) the best running beam, normalised at the current length, no
longer beats the worst of them; with ``early_stopping=True`` as soon as it holds ``K``.
At ``max_new_tokens`` the running beams join the finished ones and the best is returned.

``no_repeat_ngram_size = n`` (Paulus et al. 2017, arXiv 1705.04304, §2.5; Hugging Face's
``NoRepeatNGramLogitsProcessor``) gives probability 0 to any token that would complete an
n-gram already in the sequence — the prompt included, as Hugging Face does, or only the
generated part (``ngram_include_prompt=False``, which suits byte-level models whose
outputs copy long spans of the prompt).

The cache: the (left-padded) prompts run once, ``B`` rows; beam search then expands the
cache to ``B * K`` rows by indexing its batch dimension, reorders it every step by the
source beam of each survivor (``k[rows]``), and drops the rows of prompts that are done.
Positions count only kept tokens, as ``GPT.generate`` does. ``greedy_search`` makes the
very calls ``GPT.generate(greedy=True)`` makes, so its output is identical.

``model`` is a ``GPT`` or a ``PeftModel``: LoRA, adapters and selective fine-tuning live
inside the wrapped GPT; prompt and prefix tuning add their ``inputs_embeds_prefix`` /
``prefix_key_values`` to the first call (``generation_kwargs``), after which the cache
holds them. Unlike ``GPT.generate``, decoding never crops the window: it stops when the
sequence fills ``block_size`` (a cropped window would drop the start of the prompt).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .backend import to_numpy, xp_of
from .engine import Tensor, no_grad

LENGTH_PENALTY_STYLES = ("hf", "gnmt")


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


# ------------------------------------------------------------------ the model and its cache


def resolve_model(model):
    """``(gpt, extra)``: the GPT to call and the keyword arguments of its first call.

    A ``PeftModel`` decodes through its wrapped GPT (LoRA, adapters, selective tuning live
    inside it); prompt and prefix tuning supply ``inputs_embeds_prefix`` /
    ``prefix_key_values`` through their method's ``generation_kwargs``.
    """
    get_base = getattr(model, "get_base_model", None)
    if get_base is None:
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError(f"decoding needs a GPT or a PeftModel, got {type(model).__name__}")
        return model, {}
    gpt = get_base()
    if getattr(model, "_disabled", False):
        return gpt, {}
    method = model.method
    gen = getattr(method, "generation_kwargs", None)
    if gen is not None:
        return gpt, gen(model)
    from .peft.method import PeftMethod

    if getattr(method.forward, "__func__", None) is not PeftMethod.forward.__func__:
        raise TypeError(f"{method.peft_type} changes the model's forward but gives no generation_kwargs; "
                        "decoding cannot reproduce its forward with the cache")
    return gpt, {}


@contextlib.contextmanager
def _inference(model):
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


def _xp_of_model(gpt):
    try:
        return xp_of(gpt.transformer.wte.weight.data)
    except AttributeError:
        return np


def _array(x):
    return x.data if isinstance(x, Tensor) else x


class _Cache:
    """The prompts' first call, then one token per row against the cache (``GPT.generate``'s calls)."""

    def __init__(self, gpt, idx, attention_mask, extra: dict) -> None:
        xp = _xp_of_model(gpt)
        idx = xp.asarray(_array(idx))
        if idx.ndim != 2 or idx.dtype.kind not in "iu" or idx.shape[1] < 1:
            raise ValueError(f"prompts must be integer token ids of shape (B, T) with T >= 1, got {idx.dtype} "
                             f"{idx.shape}")
        B, T = idx.shape
        self.gpt, self.xp, self.B, self.T = gpt, xp, B, T
        self.masked = attention_mask is not None
        mask = xp.asarray(to_numpy(attention_mask)).astype(bool) if self.masked else xp.ones((B, T), bool)
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask must have the shape of the prompts {(B, T)}, got {mask.shape}")
        if self.masked and not bool(mask.any(axis=1).all()):
            raise ValueError("every prompt needs at least one kept token (a row of attention_mask is all 0)")
        pkv, pe = extra.get("prefix_key_values"), extra.get("inputs_embeds_prefix")
        n_kv = 0 if pkv is None else int(pkv[0][0].shape[2])
        n_prompt = 0 if pe is None else int(pe.shape[1])
        self.n_fixed = n_kv + n_prompt  # positions taken by prefixes
        block_size = gpt.config.block_size
        if self.n_fixed + T > block_size:
            raise ValueError(f"prompts of {T} tokens (+ {self.n_fixed} prefix positions) do not fit block_size "
                             f"{block_size}; shorten them or use a model with a larger block_size")
        self.room = block_size - self.n_fixed - T + 1  # tokens that can be generated before positions run out
        pos = None
        if self.masked:  # GPT.generate's positions: count only kept tokens
            prompt_pos = xp.broadcast_to(xp.arange(n_kv, self.n_fixed)[None, :], (B, n_prompt))
            tok_pos = self.n_fixed + xp.maximum(xp.cumsum(mask, axis=1) - 1, 0)
            pos = xp.concatenate([prompt_pos, tok_pos], axis=1)  # (B, P + T)
        o = gpt(idx, **extra, attention_mask=mask if self.masked else None, position_ids=pos, use_cache=True)
        self.past = o.past_key_values  # per layer (k, v), (B, H, S, D)
        self.cache_mask = xp.concatenate([xp.ones((B, self.n_fixed), bool), mask], axis=1)  # (B, S)
        self.n_kept = mask.sum(axis=1)  # (B,)
        self.logits = _array(o.logits)[:, -1, :]  # (B, V)
        self.dtype = idx.dtype

    def select(self, rows: np.ndarray) -> None:
        """Keep (and repeat, and reorder) the cache's rows: beam expansion and reordering."""
        r = self.xp.asarray(rows)
        self.past = [(k[r], v[r]) for k, v in self.past]
        self.cache_mask, self.n_kept = self.cache_mask[r], self.n_kept[r]

    def step(self, tokens: np.ndarray):
        """Feed one token per row; returns the next logits (R, V)."""
        xp, R = self.xp, len(tokens)
        self.cache_mask = xp.concatenate([self.cache_mask, xp.ones((R, 1), bool)], axis=1)  # (R, S + 1)
        pos = (self.n_fixed + self.n_kept)[:, None] if self.masked else None
        o = self.gpt(xp.asarray(tokens, dtype=self.dtype)[:, None], past_key_values=self.past, use_cache=True,
                     position_ids=pos, attention_mask=self.cache_mask if self.masked else None)
        self.n_kept = self.n_kept + 1
        self.past = o.past_key_values
        return _array(o.logits)[:, -1, :]


# ------------------------------------------------------------------ scores, bans


def log_softmax(logits):
    """Row-wise log-softmax in float64, on the logits' device."""
    xp = xp_of(logits)
    z = logits.astype(xp.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def length_norm(n: int, alpha: float, style: str = "hf") -> float:
    """lp(n): ``n ** alpha`` (Hugging Face) or ``((5 + n) / 6) ** alpha`` (GNMT eq. 14), for n >= 1 tokens."""
    if n < 1:
        raise ValueError(f"length_norm needs a length n >= 1, got {n}")
    return float(n) ** alpha if style == "hf" else ((5.0 + n) / 6.0) ** alpha


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


def _ban(logp, seqs: np.ndarray, n: int):
    rows, toks = banned_ngram_tokens(seqs, n)
    if rows.size:
        xp = xp_of(logp)
        logp[xp.asarray(rows), xp.asarray(toks)] = -np.inf
    return logp


def _prompt_codes(idx, attention_mask) -> np.ndarray:
    """Prompt ids for n-gram bans, with padding replaced by distinct negative codes (they match nothing)."""
    ids = to_numpy(_array(idx)).astype(np.int64)
    if attention_mask is None:
        return ids
    mask = to_numpy(attention_mask).astype(bool)
    codes = -1 - np.arange(ids.shape[1])[None, :]
    return np.where(mask, ids, codes)


def _topk(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best entries of each row (indices, values), best first, ties by index; on the host."""
    xp = xp_of(scores)
    N = scores.shape[1]
    if k < N:
        part = xp.argpartition(-scores, k - 1, axis=1)[:, :k]  # (A, k), unordered
    else:
        part = xp.broadcast_to(xp.arange(N)[None, :], scores.shape)
    vals = to_numpy(xp.take_along_axis(scores, part, axis=1))
    part = to_numpy(part)
    order = np.lexsort((part, -vals), axis=-1)  # by value (descending), then index
    return np.take_along_axis(part, order, 1), np.take_along_axis(vals, order, 1)


# ------------------------------------------------------------------ greedy


def greedy_search(model, idx, max_new_tokens: int, eos_token_id: int | None = None, attention_mask=None,
                  no_repeat_ngram_size: int = 0, ngram_include_prompt: bool = True):
    """Greedy continuation of ``idx`` (B, T); returns (B, T + n) ids, like ``GPT.generate(greedy=True)``.

    A row that emitted ``eos_token_id`` keeps emitting it; decoding stops when every row
    has, after ``max_new_tokens``, or when the sequence fills ``block_size``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    gpt, extra = resolve_model(model)
    with _inference(model):
        xp = _xp_of_model(gpt)
        out = xp.asarray(_array(idx))
        if max_new_tokens == 0:
            return out
        cache = _Cache(gpt, out, attention_mask, extra)
        B, steps = cache.B, min(max_new_tokens, cache.room)
        prompt = _prompt_codes(out, attention_mask) if ngram_include_prompt else np.zeros((B, 0), np.int64)
        new = np.zeros((B, 0), np.int64)
        done = np.zeros(B, bool)
        logits = cache.logits
        for t in range(steps):
            logits = to_numpy(logits).astype(np.float64)  # (B, V), as GPT.generate
            if no_repeat_ngram_size:
                logits = _ban(logits, np.concatenate([prompt, new], axis=1), no_repeat_ngram_size)
            nxt = logits.argmax(axis=-1)  # (B,)
            if eos_token_id is not None:
                nxt = np.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            new = np.concatenate([new, nxt[:, None]], axis=1)  # (B, t + 1)
            if (eos_token_id is not None and done.all()) or t == steps - 1:
                break
            logits = cache.step(nxt)
        return xp.concatenate([out, xp.asarray(new, dtype=out.dtype)], axis=1)  # (B, T + n)


# ------------------------------------------------------------------ beam search


class _Finished:
    """The K best finished hypotheses of each prompt: normalised scores, tokens, lengths."""

    def __init__(self, B: int, K: int, steps: int) -> None:
        self.score = np.full((B, K), -np.inf)  # (B, K), -inf where empty
        self.tok = np.zeros((B, K, steps), np.int64)  # (B, K, steps), padded
        self.len = np.zeros((B, K), np.int64)

    def add(self, prompts: np.ndarray, scores: np.ndarray, seqs: np.ndarray) -> None:
        """Offer hypotheses ``seqs`` (A, M, n) with ``scores`` (A, M) (-inf: none) to ``prompts`` (A,)."""
        A, M, n = seqs.shape
        K = self.score.shape[1]
        padded = np.zeros((A, M, self.tok.shape[2]), np.int64)
        padded[:, :, :n] = seqs
        all_s = np.concatenate([self.score[prompts], scores], axis=1)  # (A, K + M)
        pick = np.argsort(-all_s, axis=1, kind="stable")[:, :K]  # (A, K) best of old + new; old win ties
        rows = np.arange(A)[:, None]
        self.score[prompts] = all_s[rows, pick]
        self.len[prompts] = np.concatenate([self.len[prompts], np.full((A, M), n)], axis=1)[rows, pick]
        self.tok[prompts] = np.concatenate([self.tok[prompts], padded], axis=1)[rows, pick]

    def best(self, return_scores: bool):
        b = self.score.argmax(axis=1)  # (B,)
        outs = [self.tok[i, b[i], :self.len[i, b[i]]].copy() for i in range(len(b))]
        return (outs, self.score[np.arange(len(b)), b]) if return_scores else outs


def beam_search(model, idx, num_beams: int = 4, max_new_tokens: int = 64, eos_token_id: int | None = None,
                attention_mask=None, length_penalty: float = 1.0, length_penalty_style: str = "hf",
                no_repeat_ngram_size: int = 0, ngram_include_prompt: bool = True, early_stopping: bool = False,
                return_scores: bool = False):
    """Beam search from each row of ``idx`` (B, T); returns B arrays of new tokens (no eos).

    With ``return_scores`` also the (B,) normalised scores ``s(Y) / lp(|Y|)`` of the outputs.
    """
    K = int(num_beams)
    if K < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if length_penalty_style not in LENGTH_PENALTY_STYLES:
        raise ValueError(f"length_penalty_style must be one of {LENGTH_PENALTY_STYLES}, got {length_penalty_style!r}")
    gpt, extra = resolve_model(model)
    with _inference(model):
        cache = _Cache(gpt, idx, attention_mask, extra)
        xp, B = cache.xp, cache.B
        steps = min(max_new_tokens, cache.room)
        prompt = _prompt_codes(idx, attention_mask) if ngram_include_prompt else np.zeros((B, 0), np.int64)
        norm = [1.0] + [length_norm(n, length_penalty, length_penalty_style) for n in range(1, steps + 1)]  # lp(|Y|)
        rows = np.repeat(np.arange(B), K)  # (B K,): expand every prompt to K beams
        logp = log_softmax(cache.logits)[xp.asarray(rows)]  # (B K, V)
        cache.select(rows)
        V = logp.shape[1]
        beam_scores = np.where(np.arange(B * K) % K == 0, 0.0, -np.inf)  # only beam 0 starts (no duplicates)
        gen = np.zeros((B * K, 0), np.int64)  # tokens of the running beams
        fin = _Finished(B, K, steps)
        active = np.arange(B)  # prompts still decoding, in cache order
        rank = np.arange(2 * K)[None, :]
        for t in range(steps):
            A = len(active)
            if no_repeat_ngram_size:
                logp = _ban(logp, np.concatenate([prompt[np.repeat(active, K)], gen], axis=1), no_repeat_ngram_size)
            total = (xp.asarray(beam_scores)[:, None] + logp).reshape(A, K * V)  # (A, K V)
            cand, score = _topk(total, 2 * K)  # (A, 2K) best first
            cand_beam, cand_tok = cand // V, cand % V
            is_eos = cand_tok == eos_token_id if eos_token_id is not None else np.zeros(cand.shape, bool)
            add = is_eos & (rank < K) & np.isfinite(score)  # eos among the K best: a finished hypothesis
            if add.any():  # their tokens: the source beam's (the eos is not kept)
                seqs = gen.reshape(A, K, t)[np.arange(A)[:, None], cand_beam]  # (A, 2K, t)
                fin.add(active, np.where(add, score / norm[t + 1], -np.inf), seqs)
            go = np.argsort(is_eos, axis=1, kind="stable")[:, :K]  # the first K candidates without eos
            nb, nt, ns = (np.take_along_axis(a, go, 1) for a in (cand_beam, cand_tok, score))  # (A, K)
            src = np.arange(A)[:, None] * K + nb  # (A, K) rows the next beams come from
            gen = np.concatenate([gen[src.ravel()], nt.reshape(-1, 1)], axis=1)  # (A K, t + 1)
            beam_scores = ns.ravel()
            done = (fin.score[active] > -np.inf).sum(axis=1) >= K
            if not early_stopping:  # Hugging Face's heuristic: the best running beam cannot win any more
                done &= fin.score[active].min(axis=1) >= ns[:, 0] / norm[t + 1]
            if done.any():
                keep = ~done
                active, src, nt = active[keep], src[keep], nt[keep]
                gen = gen.reshape(A, K, -1)[keep].reshape(-1, t + 1)
                beam_scores = beam_scores.reshape(A, K)[keep].ravel()
            if not len(active) or t == steps - 1:
                break
            cache.select(src.ravel())
            logp = log_softmax(cache.step(nt.ravel()))  # (A' K, V)
        if len(active):  # out of steps: the running beams compete with the finished ones
            n = gen.shape[1]
            fin.add(active, beam_scores.reshape(len(active), K) / norm[n], gen.reshape(len(active), K, n))
        return fin.best(return_scores)


# ------------------------------------------------------------------ many prompts


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
    import dataclasses

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
        T = int(lengths[chunk].max())
        idx = np.full((len(chunk), T), cfg.pad_token_id, np.int64)
        mask = np.zeros((len(chunk), T), bool)
        for row, i in enumerate(chunk):  # left padding
            idx[row, T - lengths[i]:] = prompts[i]
            mask[row, T - lengths[i]:] = True
        am = None if mask.all() else mask
        kw = dict(eos_token_id=cfg.eos_token_id, attention_mask=am, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                  ngram_include_prompt=cfg.ngram_include_prompt)
        if cfg.num_beams == 1:
            new = to_numpy(greedy_search(model, idx, cfg.max_new_tokens, **kw))[:, T:]
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
    gpt, extra = resolve_model(model)
    prompt, cont = (np.asarray(to_numpy(a)).reshape(-1).astype(np.int64) for a in (prompt, continuation))
    if cont.size == 0:
        return 0.0
    ids = np.concatenate([prompt, cont])[None, :]  # (1, T)
    with _inference(model):
        xp = _xp_of_model(gpt)
        logits = _array(gpt(xp.asarray(ids), **extra).logits)[0]  # (P + T, V)
    lp = to_numpy(log_softmax(logits))[-ids.shape[1]:]  # the token positions
    T0 = prompt.size
    return float(lp[np.arange(T0 - 1, ids.shape[1] - 1), cont].sum())


__all__ = ["DecodeConfig", "decode", "greedy_search", "beam_search", "banned_ngram_tokens", "length_norm",
           "log_softmax", "resolve_model", "sequence_log_prob", "LENGTH_PENALTY_STYLES"]
