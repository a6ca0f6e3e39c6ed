"""Beam search: the K best partial outputs of each prompt, grown one token at a time.

Beam search (Sutskever et al. 2014, arXiv 1409.3215, §3.2; the decoder of the E2E
experiments of prefix tuning, arXiv 2101.00190, and LoRA, arXiv 2106.09685 — beam 5 and
beam 10) keeps the ``K`` best partial outputs of each prompt by their summed
log-probability ``s(y_1..t) = s(y_<t) + log p(y_t | x, y_<t)``. At each step every beam's
extensions are scored and the ``2K`` best candidates of the prompt are ranked (Hugging
Face's ``generate``):

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

In the one decoding loop (``decoding.loop.run``) beam search is a chooser that returns,
besides the tokens, the rows they continue: the (left-padded) prompts run once, ``B``
rows; the first choice expands them to ``B * K`` rows, each later one reorders them by
the source beam of each survivor and drops the rows of prompts that are done. The session
selects those rows of its cache (``KVCache.select``).
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy, xp_of
from .greedy import ban_ngrams, prompt_codes
from .loop import Session, inference, resolve_model, run

LENGTH_PENALTY_STYLES = ("hf", "gnmt")


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


class BeamChooser:
    """The chooser of beam search: the K best extensions of each prompt's beams, and the rows they come from."""

    def __init__(self, xp, B: int, K: int, steps: int, eos_token_id, norm: list, no_repeat_ngram_size: int,
                 prompt: np.ndarray, early_stopping: bool = False) -> None:
        self.xp, self.K, self.eos, self.norm, self.early_stopping = xp, K, eos_token_id, norm, early_stopping
        self.ngram, self.prompt = no_repeat_ngram_size, prompt
        self.t = 0
        self.row_of_beam = np.repeat(np.arange(B), K)  # (B K,): at first every beam of a prompt is its prompt's row
        self.beam_scores = np.where(np.arange(B * K) % K == 0, 0.0, -np.inf)  # only beam 0 starts (no duplicates)
        self.gen = np.zeros((B * K, 0), np.int64)  # tokens of the running beams
        self.fin = _Finished(B, K, steps)
        self.active = np.arange(B)  # prompts still decoding, in row order
        self.rank = np.arange(2 * K)[None, :]

    @property
    def finished(self) -> bool:
        return not len(self.active)

    def __call__(self, logits):
        xp, K, t = self.xp, self.K, self.t
        logp = log_softmax(logits)  # (R, V)
        if t == 0:
            logp = logp[xp.asarray(self.row_of_beam)]  # (B K, V): expand every prompt to K beams
        A, V = len(self.active), logp.shape[1]
        if self.ngram:
            logp = ban_ngrams(logp, np.concatenate([self.prompt[np.repeat(self.active, K)], self.gen], axis=1),
                              self.ngram)
        total = (xp.asarray(self.beam_scores)[:, None] + logp).reshape(A, K * V)  # (A, K V)
        cand, score = _topk(total, 2 * K)  # (A, 2K) best first
        cand_beam, cand_tok = cand // V, cand % V
        is_eos = cand_tok == self.eos if self.eos is not None else np.zeros(cand.shape, bool)
        add = is_eos & (self.rank < K) & np.isfinite(score)  # eos among the K best: a finished hypothesis
        if add.any():  # their tokens: the source beam's (the eos is not kept)
            seqs = self.gen.reshape(A, K, t)[np.arange(A)[:, None], cand_beam]  # (A, 2K, t)
            self.fin.add(self.active, np.where(add, score / self.norm[t + 1], -np.inf), seqs)
        go = np.argsort(is_eos, axis=1, kind="stable")[:, :K]  # the first K candidates without eos
        nb, nt, ns = (np.take_along_axis(a, go, 1) for a in (cand_beam, cand_tok, score))  # (A, K)
        src = np.arange(A)[:, None] * K + nb  # (A, K) beams the next beams come from
        self.gen = np.concatenate([self.gen[src.ravel()], nt.reshape(-1, 1)], axis=1)  # (A K, t + 1)
        self.beam_scores = ns.ravel()
        done = (self.fin.score[self.active] > -np.inf).sum(axis=1) >= K
        if not self.early_stopping:  # Hugging Face's heuristic: the best running beam cannot win any more
            done &= self.fin.score[self.active].min(axis=1) >= ns[:, 0] / self.norm[t + 1]
        if done.any():
            keep = ~done
            self.active, src, nt = self.active[keep], src[keep], nt[keep]
            self.gen = self.gen.reshape(A, K, -1)[keep].reshape(-1, t + 1)
            self.beam_scores = self.beam_scores.reshape(A, K)[keep].ravel()
        rows = self.row_of_beam[src.ravel()]  # session rows of the surviving beams' sources
        self.row_of_beam = np.arange(rows.size)  # after the select, beam j is session row j
        self.t += 1
        return nt.ravel(), rows

    def result(self, return_scores: bool):
        """The best hypothesis of each prompt (the running beams compete with the finished ones)."""
        if len(self.active):
            A, n = len(self.active), self.gen.shape[1]
            scores = self.beam_scores.reshape(A, self.K) / self.norm[n]  # (A, K) normalised at length n
            self.fin.add(self.active, scores, self.gen.reshape(A, self.K, n))
        return self.fin.best(return_scores)


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
    target = resolve_model(model)
    with inference(model):
        session = Session(target, idx, attention_mask)
        B, steps = session.rows, session.steps(max_new_tokens)
        norm = [1.0] + [length_norm(n, length_penalty, length_penalty_style) for n in range(1, steps + 1)]  # lp(|Y|)
        prompt = prompt_codes(idx, attention_mask, ngram_include_prompt)
        choose = BeamChooser(target.xp, B, K, steps, eos_token_id, norm, no_repeat_ngram_size, prompt, early_stopping)
        run(session, choose, steps)
        return choose.result(return_scores)


__all__ = ["BeamChooser", "beam_search", "length_norm", "log_softmax", "LENGTH_PENALTY_STYLES"]
