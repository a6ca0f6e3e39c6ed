"""minipeft.metrics against reference implementations (fixture made by
tests/fixtures/make_metric_fixtures.py: sacrebleu, nltk, pycocoevalcap, and a plain mteval
re-derivation), plus the degenerate cases the E2E scorer defines.

Tolerance: every implementation works in float64 and differs from minipeft only in the order of
its sums (numpy versus Python, per n-gram versus per order). Over at most ~10^5 terms that moves
a score by well under 1e-12 relative (measured: <= 1.1e-13 on the full dev set); ``TOL = 1e-9``
leaves margin and is still five orders below the 4th decimal the challenge prints.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest

from minipeft.metrics import (
    NIST_BETA,
    _tokenize_batch,
    cider_d,
    cider_d_scores,
    corpus_bleu,
    corpus_nist,
    e2e_scores,
    rouge_l,
    rouge_l_scores,
    tokenize_13a,
    tokenize_ptb,
)

TOL = 1e-9
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "e2e_metrics_reference.json").read_text("utf-8"))
DEVSET = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "e2e" / "devset.csv"


def _devset_groups():
    if not DEVSET.is_file():
        pytest.skip(f"E2E dev set not found at {DEVSET}")
    groups: dict[str, list[str]] = {}
    with open(DEVSET, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            groups.setdefault(row["mr"], []).append(row["ref"])
    return list(groups.items())


def _inputs(name: str):
    """Rebuild a fixture case's (hyps, refs_list), from the fixture or from the dev set."""
    case = FIXTURE["cases"][name]
    if "hyps" in case:
        return case["hyps"], case["refs"]
    groups = _devset_groups()
    idx = case["devset_mr_indices"]
    sel = groups if idx == "all" else [groups[i] for i in idx]
    if name == "dev_heldout_first_half":
        half = lambda t: " ".join(t.split()[: max(1, len(t.split()) // 2)])  # noqa: E731
        return [half(r[0]) for _, r in sel], [r[1:] for _, r in sel]
    if name == "dev_single_ref":
        return [r[0] for _, r in sel], [[r[1]] for _, r in sel]
    return [r[0] for _, r in sel], [r[1:] for _, r in sel]  # dev_heldout, devset_full


FULL_CASES = ["handmade", "dev_heldout", "dev_heldout_first_half", "dev_single_ref", "devset_full"]


@pytest.mark.parametrize("name", FULL_CASES)
def test_agrees_with_reference_implementations(name):
    hyps, refs = _inputs(name)
    expected = FIXTURE["cases"][name]["values"]
    got = e2e_scores(hyps, refs)
    assert set(got) == {"BLEU", "NIST", "ROUGE_L", "CIDEr"}
    for metric, by_source in expected.items():
        if metric.startswith("METEOR"):
            continue  # informational: minipeft does not compute METEOR
        for source, value in by_source.items():
            if source == "each":
                each = rouge_l_scores(hyps, refs) if metric == "ROUGE_L" else cider_d_scores(hyps, refs)
                assert max(abs(a - b) for a, b in zip(each, value)) < TOL, (name, metric)
            else:
                assert abs(got[metric] - value) < TOL, (name, metric, source, got[metric], value)


@pytest.mark.parametrize("name", ["empty_hypothesis", "short_hypotheses", "no_4gram_match"])
def test_mteval_conventions(name):
    """Corpora only mteval's own rules decide: an empty output, no 4-gram at all, no 4-gram match."""
    hyps, refs = _inputs(name)
    v = FIXTURE["cases"][name]["values"]
    assert abs(corpus_bleu(hyps, refs) - v["BLEU"]["plain_mteval"]) < TOL
    assert abs(corpus_nist(hyps, refs) - v["NIST"]["plain_mteval"]) < TOL


def test_ptb_tokenizer_probes():
    probes = FIXTURE["ptb_probes"]
    assert _tokenize_batch(probes["sentences"]) == probes["tokens"]


def test_ptb_tokenizer_matches_java_on_every_dev_reference():
    groups = _devset_groups()
    refs = [r for _, rs in groups for r in rs]
    want = FIXTURE["devset_ref_ptb_digests"].split()
    got = [hashlib.sha1("\x1f".join(t).encode()).hexdigest()[:10] for t in _tokenize_batch(refs)]
    bad = [refs[i] for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert len(got) == len(want) == FIXTURE["devset"]["n_rows"]
    assert not bad, f"{len(bad)} references tokenized differently from Stanford PTBTokenizer, e.g. {bad[:3]}"


# ---- tokenization by definition -----------------------------------------------------------------
def test_tokenize_13a():
    assert tokenize_13a("The Eagle's price is £20-25.") == ["the", "eagle's", "price", "is", "£20", "-", "25", "."]
    assert tokenize_13a("1,000 and 3.5, ok.") == ["1,000", "and", "3.5", ",", "ok", "."]
    assert tokenize_13a("A&amp;B &quot;x&quot;") == ["a", "&", "b", '"', "x", '"']
    assert tokenize_13a("ÉCOLE Café") == ["École", "café"]  # Perl's tr/[A-Z]/[a-z]/: A-Z only
    assert tokenize_13a("") == []


def test_tokenize_ptb_examples():
    assert tokenize_ptb("The Eagle's prices (£20-25) aren't high.") == [
        "the", "eagle", "'s", "prices", "-lrb-", "#", "20-25", "-rrb-", "are", "n't", "high"]
    assert tokenize_ptb("It cannot be family-friendly...") == ["it", "can", "not", "be", "family-friendly"]
    assert tokenize_ptb("a foo d.", next_line="The next") == ["a", "foo", "d"]
    assert tokenize_ptb("a foo d.", next_line="the next") == ["a", "foo", "d."]
    assert tokenize_ptb("a foo d.") == ["a", "foo", "d."]
    with pytest.raises(TypeError, match="text must be a string, got int"):
        tokenize_ptb(3)


# ---- degenerate cases ---------------------------------------------------------------------------
def test_identical_hypothesis_scores_one():
    refs = [["The Eagle is a cheap coffee shop near Burger King."], ["Aromi is a family-friendly pub by the river."]]
    hyps = [r[0] for r in refs]
    assert corpus_bleu(hyps, refs) == pytest.approx(1.0, abs=1e-15)  # the challenge's 0-1 scale
    assert rouge_l(hyps, refs) == pytest.approx(1.0, abs=1e-15)
    assert corpus_nist(hyps, refs) > 0


def test_empty_hypotheses_score_zero():
    refs = [["The Eagle is a cheap coffee shop."], ["Aromi is a pub."]]
    s = e2e_scores(["", ""], refs)
    assert s == {"BLEU": 0.0, "NIST": 0.0, "ROUGE_L": 0.0, "CIDEr": 0.0}


def test_one_empty_hypothesis_only_costs_its_share():
    refs = [["a b c d e f"], ["g h i j k l"]]
    assert rouge_l(["a b c d e f", ""], refs) == pytest.approx(0.5)
    # BLEU: precisions 1, brevity penalty exp(1 - 12/6)
    assert corpus_bleu(["a b c d e f", ""], refs) == pytest.approx(math.exp(1 - 12 / 6))


def test_single_instance_cider_is_zero():
    """With one instance every document frequency equals N = 1, so every IDF is log 1 - log 1 = 0."""
    assert cider_d(["a pub by the river"], [["a pub by the river"]]) == 0.0


def test_nist_length_conventions():
    hyps = ["the pub", "a cheap pub by the river"]
    same = [["the old pub", "the pub"], ["a cheap pub by the river", "a pub by the river"]]
    assert corpus_nist(hyps, same) == pytest.approx(corpus_nist(hyps, same, nist_length="average"), abs=1e-12)
    ragged = [["the old pub", "the pub", "a pub", "the pub in town"], ["a cheap pub by the river side today"]]
    assert corpus_nist(hyps, ragged) != pytest.approx(corpus_nist(hyps, ragged, nist_length="average"))
    assert NIST_BETA == pytest.approx(4.2162, abs=1e-4)
    with pytest.raises(ValueError, match="nist_length"):
        corpus_nist(hyps, same, nist_length="closest")


@pytest.mark.parametrize("fn", [corpus_bleu, corpus_nist, rouge_l, cider_d, e2e_scores])
def test_bad_input(fn):
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        fn(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="at least one reference"):
        fn(["a"], [[]])
    with pytest.raises(TypeError, match="wrap a single reference"):
        fn(["a"], ["a"])
    with pytest.raises(TypeError, match="hyps must be a list of strings"):
        fn("a", [["a"]])
    with pytest.raises(TypeError, match=r"hyps\[0\] must be a string, got NoneType"):
        fn([None], [["a"]])
