"""Tests for minipeft/data/tokenizer.py: round trips, special tokens, bad ids."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_ids_and_vocab():
    assert TOK.vocab_size == len(TOK) == 259
    assert (TOK.eos_id, TOK.pad_id, TOK.bos_id) == (256, 257, 258)
    assert TOK.token_id("<|endoftext|>") == 256
    assert TOK.is_special(257) and not TOK.is_special(255)
    with pytest.raises(KeyError, match="not a special token"):
        TOK.token_id("<|nope|>")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_unicode(text):
    ids = TOK.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    framed = TOK.encode(text, add_bos=True, add_eos=True)
    assert framed[0] == TOK.bos_id and framed[-1] == TOK.eos_id
    assert TOK.decode(framed) == text
    assert TOK.decode(framed, skip_special=False) == "<|bos|>" + text + "<|endoftext|>"


def test_special_text_is_never_a_special_id():
    ids = TOK.encode("a<|endoftext|>b")
    assert ids.max() < 256 and len(ids) == 15


def test_decode_replaces_invalid_utf8_and_splits_at_specials():
    assert TOK.decode([0xFF, 104, 105]) == "\ufffdhi"
    # the two halves of "é" (c3 a9) around a special token are separate texts
    assert TOK.decode([0xC3, 256, 0xA9], skip_special=False) == "\ufffd<|endoftext|>\ufffd"
    assert TOK.decode([0xC3, 256, 0xA9]) == "é"  # skipping specials joins the bytes


def test_batch_and_array_inputs():
    texts = ["hello", "", "wörld"]
    enc = TOK.encode_batch(texts, add_eos=True)
    assert [len(e) for e in enc] == [6, 1, 7]
    assert TOK.decode_batch(enc) == texts
    arr = np.array([[104, 105, 257], [111, 107, 256]])
    assert TOK.decode_batch(arr) == ["hi", "ok"]
    assert TOK.decode(np.array([104.0, 105.0])) == "hi"  # integral floats are accepted
    assert TOK.decode([]) == ""


@pytest.mark.parametrize("bad", [[259], [-1], [104, -100], [10**9]])
def test_out_of_range_ids(bad):
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode(bad)


def test_bad_inputs():
    with pytest.raises(TypeError, match="expects a str"):
        TOK.encode(b"bytes")
    with pytest.raises(TypeError, match="list of strings"):
        TOK.encode_batch("one string")
    with pytest.raises(TypeError, match="integers"):
        TOK.decode(np.array([1.5]))
    with pytest.raises(ValueError, match="1-D"):
        TOK.decode(np.zeros((2, 2), dtype=np.int64))


def test_extra_special_tokens():
    tok = ByteTokenizer(extra_special_tokens=("<|sep|>",))
    assert tok.vocab_size == 260 and tok.token_id("<|sep|>") == 259
    assert tok.decode([97, 259, 98], skip_special=False) == "a<|sep|>b"
    with pytest.raises(ValueError, match="distinct"):
        ByteTokenizer(extra_special_tokens=("<|pad|>",))
    with pytest.raises(TypeError, match="special tokens must be non-empty strings"):
        ByteTokenizer(extra_special_tokens=("",))
