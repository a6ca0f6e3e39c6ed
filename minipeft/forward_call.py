"""What one call of ``GPT.forward`` adds to the plain model: the extension points, checked.

The plain GPT-2 forward is ``wte + wpe -> blocks -> ln_f -> lm_head`` (``minipeft.gpt``).
PEFT methods and decoding extend it at a few named places, never by patching it; each is
a keyword of ``GPT.forward``:

* ``inputs_embeds_prefix`` (B or 1, P', C): rows in front of the token embeddings, before
  ``wpe`` is added (prompt tuning, Lester et al. 2021). Logits cover all P' + T positions;
  the loss only the last T.
* ``prefix_key_values``: per layer ``(k, v)`` of shape (B or 1, H, P, D) in front of that
  layer's keys and values (prefix tuning, Li & Liang 2021). As when Hugging Face GPT-2
  gets the prefix as ``past_key_values``, the tokens' positions start at P.
* ``past_key_values``: the :class:`~minipeft.kv_cache.KVCache` of an earlier call (or its
  list of per-layer ``(k, v)`` arrays, (B, H, S, D)); positions continue at S unless
  ``position_ids`` say otherwise. A cache with a padding mask keeps its padding masked.
* ``use_cache``: return this call's keys and values as a ``KVCache`` for the next call.
* ``attention_mask``: 1 keep / 0 padding, (B, T) over the tokens or (B, S + T) over the
  cached positions then the tokens. Prefix and prompt positions are always kept.
* ``position_ids``: (P' + T,) or (B, P' + T) positions of the new rows (default:
  consecutive, after any prefix and cache); decoding passes them for left-padded rows.
* ``output_hidden_states``: L + 1 Tensors as Hugging Face returns them: the embedding
  output, the outputs of blocks 1..L-1, and ``ln_f`` applied to block L's output (side
  tuning's ladder reads them).
* ``ignore_index``, ``label_smoothing``: options of the loss (``F.cross_entropy``).

A :class:`ForwardCall` checks them against the model and the batch once, and then serves
the forward's steps: :meth:`prepend_prompt`, :attr:`positions`, :meth:`front_kv` (what
each layer's attention sees in front of the new keys: the prefix, then the cache),
:attr:`key_mask`, :meth:`keep_hidden` / :meth:`keep_kv` (what the call collects) and
:meth:`loss`.

The keys of layer l are ``[prefix (P), cache (S), prompt and tokens (P' + T)]``.
"""
from __future__ import annotations

from . import functional as F
from .backend import xp_of
from .engine import Tensor
from .kv_cache import KVCache


def _array(x):
    return x.data if isinstance(x, Tensor) else x


class ForwardCall:
    """The extension points of one forward call on token ids ``idx`` (B, T), checked against ``config`` (GPTConfig)."""

    def __init__(self, config, idx, *, inputs_embeds_prefix=None, prefix_key_values=None, past_key_values=None,
                 use_cache: bool = False, attention_mask=None, position_ids=None, output_hidden_states: bool = False,
                 ignore_index: int = -100, label_smoothing: float = 0.0) -> None:
        xp = xp_of(idx)
        B, T = idx.shape
        self.B, self.T, self.xp = B, T, xp
        self.prefix = prefix_key_values
        self.n_prefix = check_layers_kv(config, prefix_key_values, "prefix_key_values", B, shared_ok=True)
        self.n_past = check_layers_kv(config, past_key_values, "past_key_values", B, shared_ok=False)
        self.cache = None if past_key_values is None else (
            past_key_values if isinstance(past_key_values, KVCache) else KVCache(past_key_values))
        self.prompt = self._check_prompt(inputs_embeds_prefix, config.n_embd)
        self.n_prompt = 0 if self.prompt is None else self.prompt.shape[1]
        self.positions = self._positions(position_ids, config.block_size)  # (P' + T,) or (B, P' + T)
        self.key_mask = self._key_mask(attention_mask)  # (B, P + S + P' + T) or None: every key kept
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.hidden_states = [] if output_hidden_states else None  # L + 1 Tensors (B, P' + T, C)
        self._presents = [] if use_cache else None  # per layer (k, v) arrays (B, H, P + S + P' + T, D)

    # ---- checks
    def _check_prompt(self, pe, n_embd):
        if pe is None:
            return None
        pe = pe if isinstance(pe, Tensor) else Tensor(pe)
        B = self.B
        if pe.ndim != 3 or pe.shape[0] not in (1, B) or pe.shape[2] != n_embd:
            raise ValueError(f"inputs_embeds_prefix must have shape ({B} or 1, P, {n_embd}), got {pe.shape}")
        return pe if pe.shape[0] == B else F.broadcast_to(pe, (B,) + pe.shape[1:])

    def _positions(self, position_ids, block_size):
        xp, offset, n_new = self.xp, self.n_prefix + self.n_past, self.n_prompt + self.T
        if position_ids is None:
            pos = xp.arange(offset, offset + n_new)  # (P' + T,): consecutive after prefix and cache
            last = offset + n_new
        else:
            pos = xp.asarray(_array(position_ids))
            if pos.shape not in ((n_new,), (self.B, n_new)) or pos.dtype.kind not in "iu":
                raise ValueError(f"position_ids must be integers of shape ({n_new},) or ({self.B}, {n_new}), got "
                                 f"{pos.dtype} {pos.shape}")
            last = int(pos.max()) + 1 if pos.size else 0
        if last > block_size:
            raise ValueError(
                f"sequence too long: positions reach {last} (prefix {self.n_prefix} + cache {self.n_past} + prompt "
                f"{self.n_prompt} + tokens {self.T}) but block_size is {block_size}; shorten the input or build the "
                f"model with a larger GPTConfig.block_size")
        return pos

    def _key_mask(self, attention_mask):
        """Which keys each query may see: prefix and prompt always, the cache's kept positions, the kept tokens."""
        xp, B, T, S = self.xp, self.B, self.T, self.n_past
        past = None if self.cache is None else self.cache.mask  # (B, S) or None
        if attention_mask is None and past is None:
            return None
        if attention_mask is None:
            m = xp.ones((B, T), bool)
        else:
            m = xp.asarray(_array(attention_mask))
            if m.shape not in ((B, T), (B, S + T)):
                raise ValueError(f"attention_mask must have shape (B, T) = {(B, T)} or (B, S + T) = {(B, S + T)} "
                                 f"with S = {S} cached positions, got {m.shape}")
            m = m.astype(bool)
            if m.shape[1] == S + T:
                past, m = m[:, :S], m[:, S:]
        past = xp.ones((B, S), bool) if past is None else past
        ones = xp.ones((B, self.n_prefix), bool), xp.ones((B, self.n_prompt), bool)
        return xp.concatenate([ones[0], past, ones[1], m], axis=1)  # (B, Tk)

    # ---- the forward's steps
    def prepend_prompt(self, x: Tensor) -> Tensor:
        """Prompt tuning: the prompt's rows in front of the token embeddings (B, T, C) -> (B, P' + T, C)."""
        if self.prompt is None:
            return x
        return F.concatenate([F.cast(self.prompt, x.dtype), x], axis=1)

    def front_kv(self, layer: int):
        """Keys and values layer ``layer`` sees before this call's own: [prefix (P), cache (S)], (B, H, P + S, D)."""
        parts = []
        if self.prefix is not None:
            pk, pv = (p if isinstance(p, Tensor) else Tensor(p) for p in self.prefix[layer])
            if pk.shape[0] != self.B:  # one prefix shared by every row
                pk, pv = F.broadcast_to(pk, (self.B,) + pk.shape[1:]), F.broadcast_to(pv, (self.B,) + pv.shape[1:])
            parts.append((pk, pv))
        if self.cache is not None:
            k, v = self.cache[layer]
            parts.append((Tensor(k), Tensor(v)))
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        (pk, pv), (k, v) = parts
        return (F.concatenate([F.cast(pk, k.dtype), k], axis=2), F.concatenate([F.cast(pv, v.dtype), v], axis=2))

    def keep_hidden(self, x: Tensor) -> None:
        if self.hidden_states is not None:
            self.hidden_states.append(x)

    def keep_kv(self, kv) -> None:
        if self._presents is not None:
            self._presents.append((kv[0].data, kv[1].data))

    def new_cache(self) -> KVCache | None:
        """The keys and values of every position so far (prefix, cache, this call), with their mask."""
        return None if self._presents is None else KVCache(self._presents, self.key_mask)

    def loss(self, logits: Tensor, targets):
        """Mean cross-entropy over the T token positions (the prompt's P' rows have no targets), or None."""
        if targets is None:
            return None
        t = self.xp.asarray(_array(targets))
        if t.shape != (self.B, self.T):
            raise ValueError(f"targets must have the shape of idx {(self.B, self.T)}, got {t.shape}")
        tok_logits = logits[:, self.n_prompt:, :] if self.n_prompt else logits  # (B, T, V)
        return F.cross_entropy(tok_logits, t, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)


def check_layers_kv(config, kv, what: str, B: int, shared_ok: bool) -> int:
    """Check a per-layer list of (k, v), each (B, H, P, D) (or (1, ...) when ``shared_ok``); return P."""
    if kv is None:
        return 0
    if len(kv) != config.n_layer:
        raise ValueError(f"{what} must hold one (k, v) pair per layer ({config.n_layer}), got {len(kv)}")
    n = None
    for i, pair in enumerate(kv):
        if len(pair) != 2:
            raise ValueError(f"{what}[{i}] must be a (k, v) pair")
        for t in pair:
            s = tuple(t.shape)
            ok_b = s[:1] == (B,) or (shared_ok and s[:1] == (1,))
            same_p = n is None or (len(s) == 4 and s[2] == n)
            if len(s) != 4 or not ok_b or s[1] != config.n_head or s[3] != config.head_dim or not same_p:
                raise ValueError(f"{what}[{i}] tensors must have shape ({B}{' or 1' if shared_ok else ''}, "
                                 f"{config.n_head}, P, {config.head_dim}) with one P for all layers, got {s}")
            n = s[2]
    return n


def key_mask_of(attention_mask, B: int, T: int, xp):
    """The key mask of a plain call (no prefix, prompt or cache): ``attention_mask`` (B, T) as bool, or None."""
    if attention_mask is None:
        return None
    m = xp.asarray(_array(attention_mask))
    if m.shape != (B, T):
        raise ValueError(f"attention_mask must have shape (B, T) = {(B, T)}, got {m.shape}")
    return m.astype(bool)


__all__ = ["ForwardCall", "check_layers_kv", "key_mask_of"]
