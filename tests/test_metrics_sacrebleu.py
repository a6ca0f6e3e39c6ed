"""minipeft's BLEU against sacrebleu itself, live, on generated corpora (sacrebleu 2.6.0,
.ci/crosscheck.txt); ``test_metrics.py`` compares with numbers sacrebleu and others wrote
into a fixture once.

sacrebleu's "13a" tokenizer is a port of mteval-v13a's and its ``smooth_method="exp"`` is
mteval's smoothing, so on ASCII text the two agree - except in two degenerate corpora that
are left out here: with no matching n-gram at all sacrebleu returns 0 (mteval smooths every
order), and an order with no hypothesis n-gram (every hypothesis shorter than n) counts as
log 0 in sacrebleu and as log 1 in mteval.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.metrics import corpus_bleu, tokenize_13a

sacrebleu = pytest.importorskip("sacrebleu")
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # noqa: E402

TOL = 1e-9  # as test_metrics.py: float64 sums in another order

# 13a's special cases: entities, <skipped>, hyphenated line ends, numbers with . , -
PIECES = ["&quot;", "&amp;", "&lt;", "&gt;", "<skipped>", "-\n", "\n", "1,000", "3.5", "2-3",
          "e.g.", "U.S.", "it's", "£20-25"]
WORDS = ["the", "Eagle", "is", "a", "coffee", "shop", "near", "Burger", "King", "in", "the",
         "riverside", "area", "5", "out", "of", "3.5", "it's", "family-friendly", "(cheap)",
         "food:", "Italian", ",", ".", "don't", "1,000", "&amp;", "price", "range", "high!"]

ascii_text = st.lists(st.one_of(st.characters(min_codepoint=9, max_codepoint=126),
                                st.sampled_from(PIECES)), max_size=40).map("".join)
sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=14).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(ascii_text)
def test_tokenize_13a_is_sacrebleus(text):
    assert tokenize_13a(text) == Tokenizer13a()(text.lower()).split()


@st.composite
def corpora(draw):
    """(hyps, refs_list) with 1..4 references each; the first hypothesis repeats a reference
    of at least 4 tokens, so every order has n-grams and matches (see the docstring)."""
    m = draw(st.integers(1, 5))
    refs_list = [draw(st.lists(sentence, min_size=1, max_size=4)) for _ in range(m)]
    hyps = [draw(sentence) for _ in range(m)]
    first = draw(st.lists(st.sampled_from(WORDS[:13]), min_size=4, max_size=10).map(" ".join))
    refs_list[0][0], hyps[0] = first, draw(st.sampled_from([first, first.upper(), first + " ."]))
    return hyps, refs_list


def sacrebleu_bleu(hyps, refs_list):
    """sacrebleu's corpus BLEU in [0, 1]; ragged reference sets padded with None (dropped)."""
    width = max(len(r) for r in refs_list)
    streams = [[refs[i] if i < len(refs) else None for refs in refs_list] for i in range(width)]
    return sacrebleu.corpus_bleu(hyps, streams, tokenize="13a", lowercase=True).score / 100.0


@settings(max_examples=150, deadline=None)
@given(corpora())
def test_corpus_bleu_is_sacrebleus(corpus):
    hyps, refs_list = corpus
    assert corpus_bleu(hyps, refs_list) == pytest.approx(sacrebleu_bleu(hyps, refs_list), rel=TOL, abs=TOL)


def test_a_known_corpus():
    """One corpus by hand, so a failure here is easy to read: brevity penalty and smoothing."""
    hyps = ["The Eagle is a coffee shop near Burger King .", "cheap Italian food"]
    refs = [["The Eagle is a coffee shop in the riverside area near Burger King .",
             "Near Burger King is The Eagle , a coffee shop ."],
            ["It serves cheap Italian food .", "Italian food , cheap"]]
    ours = corpus_bleu(hyps, refs)
    assert 0 < ours < 1
    assert ours == pytest.approx(sacrebleu_bleu(hyps, refs), rel=TOL)
