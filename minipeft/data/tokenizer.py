"""Byte-level tokenizer: 256 byte ids plus a few special tokens.

GPT-2 (Radford et al., 2019, section 2.2) runs byte-pair encoding on top of raw UTF-8
bytes so that any string can be encoded with no unknown token. minipeft keeps only the
bottom layer of that scheme: one token per UTF-8 byte. Ids ``0..255`` are the bytes
themselves, so ``encode`` is ``list(text.encode("utf-8"))``; the ids after them are
special tokens that never come from text:

====  =================  ==========================================================
id    text               use
====  =================  ==========================================================
256   ``<|endoftext|>``  end of a document / of a target (GPT-2's only special token)
257   ``<|pad|>``        padding after a short sequence; its targets are ignored
258   ``<|bos|>``        optional start-of-sequence marker
====  =================  ==========================================================

A string containing the *characters* ``<|endoftext|>`` is encoded as those 13 bytes,
never as the special id: special tokens can only be added on purpose (``add_eos``),
so no text can smuggle one in.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..backend import to_numpy

EOS_TOKEN = "<|endoftext|>"  # GPT-2's end-of-text marker
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
NUM_BYTES = 256  # ids 0..255 are the UTF-8 bytes


class ByteTokenizer:
    """UTF-8 bytes as tokens, followed by special tokens.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé", add_eos=True).tolist()
    [104, 195, 169, 256]
    >>> tok.decode([104, 195, 169, 256])
    'hé'
    >>> tok.vocab_size
    259
    """

    def __init__(self, extra_special_tokens: Sequence[str] = ()):
        specials = [EOS_TOKEN, PAD_TOKEN, BOS_TOKEN, *extra_special_tokens]
        for s in specials:
            if not isinstance(s, str) or not s:
                raise TypeError(f"special tokens must be non-empty strings, got {s!r}")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special tokens must be distinct, got {specials}")
        # special token text -> id, in order after the 256 bytes
        self.special_tokens: dict[str, int] = {s: NUM_BYTES + i for i, s in enumerate(specials)}
        self._special_text = {i: s for s, i in self.special_tokens.items()}

    # ---- the ids -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of distinct ids: 256 bytes + the special tokens."""
        return NUM_BYTES + len(self.special_tokens)

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>`` (256)."""
        return self.special_tokens[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        """Id of ``<|pad|>`` (257)."""
        return self.special_tokens[PAD_TOKEN]

    @property
    def bos_id(self) -> int:
        """Id of ``<|bos|>`` (258)."""
        return self.special_tokens[BOS_TOKEN]

    def token_id(self, special: str) -> int:
        """Id of a special token given by its text, e.g. ``token_id("<|pad|>")``."""
        try:
            return self.special_tokens[special]
        except KeyError:
            raise KeyError(
                f"{special!r} is not a special token of this tokenizer; "
                f"known: {list(self.special_tokens)}"
            ) from None

    def is_special(self, token_id: int) -> bool:
        """True for ids >= 256 that name a special token."""
        return NUM_BYTES <= int(token_id) < self.vocab_size

    # ---- text -> ids ---------------------------------------------------------------
    def encode(self, text: str, add_eos: bool = False, add_bos: bool = False) -> np.ndarray:
        """UTF-8 bytes of ``text`` as an int64 array ``(n,)``, optionally framed by BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(
                f"encode expects a str, got {type(text).__name__}; "
                "decode bytes first (bytes.decode('utf-8')) or pass text"
            )
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # (n,)
        if add_bos or add_eos:
            parts = [ids]
            if add_bos:
                parts.insert(0, np.array([self.bos_id], dtype=np.int64))
            if add_eos:
                parts.append(np.array([self.eos_id], dtype=np.int64))
            ids = np.concatenate(parts)
        return ids

    def encode_batch(
        self, texts: Iterable[str], add_eos: bool = False, add_bos: bool = False
    ) -> list[np.ndarray]:
        """``encode`` each string; the arrays keep their own lengths (see ``batches`` to pad)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of strings, got one str; use encode()")
        return [self.encode(t, add_eos=add_eos, add_bos=add_bos) for t in texts]

    # ---- ids -> text ---------------------------------------------------------------
    def _check_ids(self, ids) -> np.ndarray:
        """Ids as a 1-D int64 NumPy array, or a ValueError naming the bad ones."""
        arr = to_numpy(ids)  # lists, NumPy and CuPy arrays alike
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(
                f"decode expects a 1-D sequence of ids, got shape {arr.shape}; "
                "use decode_batch for a (B, T) array"
            )
        arr = arr.astype(np.int64)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            pos = np.flatnonzero(bad)[:5]
            raise ValueError(
                f"token ids out of range [0, {self.vocab_size}): "
                f"{arr[pos].tolist()} at positions {pos.tolist()}. "
                "(-100 is the ignore_index of targets: decode inputs x, not targets y)"
            )
        return arr

    def decode(self, ids, skip_special: bool = True, errors: str = "replace") -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD (``errors='replace'``).

        Special tokens are dropped (``skip_special=True``) or written as their text,
        e.g. ``<|endoftext|>``. Bytes on either side of a special token are decoded
        separately, as they were separate pieces of text.
        """
        arr = self._check_ids(ids)
        is_byte = arr < NUM_BYTES
        if skip_special:
            return arr[is_byte].astype(np.uint8).tobytes().decode("utf-8", errors=errors)
        out: list[str] = []
        start = 0
        for pos in np.flatnonzero(~is_byte).tolist():  # only the (few) special positions
            out.append(arr[start:pos].astype(np.uint8).tobytes().decode("utf-8", errors=errors))
            out.append(self._special_text[int(arr[pos])])
            start = pos + 1
        out.append(arr[start:].astype(np.uint8).tobytes().decode("utf-8", errors=errors))
        return "".join(out)

    def decode_batch(self, ids, skip_special: bool = True, errors: str = "replace") -> list[str]:
        """``decode`` each row of a ``(B, T)`` array or each sequence of a list."""
        return [self.decode(row, skip_special=skip_special, errors=errors) for row in ids]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"
