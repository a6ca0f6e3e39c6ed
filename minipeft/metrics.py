"""The E2E NLG Challenge metrics — BLEU, NIST, ROUGE-L and CIDEr-D — as the challenge scores them.

The challenge's scorer (Dušek et al., "Evaluating the state-of-the-art of End-to-End Natural
Language Generation", arXiv:1901.07931; script ``measure_scores.py`` of tuetschek/e2e-metrics)
runs two programs, and this module reproduces both from their definitions:

* **BLEU-4 and NIST-5** from MT-Eval ``mteval-v13a`` (Papineni et al., 2002; Doddington,
  2002), on its "13a" tokenization, lower-cased (``tokenize_13a``). BLEU is corpus-level:
  ``BLEU = BP * exp(1/4 * sum_n log p_n)``, ``p_n = sum_seg sum_g min(c_hyp(g), max_ref c_ref(g))
  / sum_seg (len_hyp - n + 1)``, ``BP = exp(min(0, 1 - r/c))`` with ``r`` the sum over segments of
  the reference length closest to the hypothesis length (ties go to the shorter). NIST sums
  information-weighted matches, ``info(w_1..w_n) = log2(count(w_1..w_{n-1}) / count(w_1..w_n))``
  with counts over every reference of the corpus (the 0-gram count is the number of reference
  words), times ``BP_N = exp(-beta * log^2(min(L_sys / L_ref, 1)))``, ``beta = -ln 0.5 / ln^2 1.5``.
* **ROUGE-L and CIDEr-D** from the MS-COCO caption code (``pycocoevalcap``: Lin, 2004;
  Vedantam et al., 2015, arXiv:1411.5726), on the Stanford PTB tokenization, lower-cased, with
  punctuation tokens removed (``tokenize_ptb``). ROUGE-L per instance is
  ``(1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``, ``P = max_r LCS/|c|``, ``R = max_r LCS/|r|``
  (the two maxima taken separately); CIDEr-D per instance is
  ``10/(4 |refs|) sum_n sum_r exp(-(l_c - l_r)^2 / (2 sigma^2)) * <min(g_c, g_r), g_r> / (|g_c| |g_r|)``
  with TF-IDF vectors ``g`` of n-grams (n = 1..4), document frequencies over the reference sets
  of the evaluated corpus and ``sigma = 6``. Both are averaged over instances.

Scale: as ``measure_scores.py`` prints them — BLEU and ROUGE-L in [0, 1] (the challenge's
baseline on the dev set is BLEU 0.6925), NIST and CIDEr raw. Papers multiply BLEU, METEOR and
ROUGE-L by 100.

Quirks reproduced on purpose (each is what the official scorer does):

* mteval's corpus BLEU is smoothed: an n-gram order with no match contributes
  ``1 / (2^k * total_n)`` for the k-th such order, and an order with no hypothesis n-gram
  counts as precision 1; BP is 0 when every hypothesis is empty.
* ``measure_scores.py`` pads ragged reference sets with empty references, so mteval's NIST
  uses ``L_ref = (reference words of the corpus) / (largest number of references)``
  (``nist_length="mteval"``). The Python port ``pymteval`` and ``methods.md`` §17 instead sum the
  *average* reference length of each segment (``nist_length="average"``); the two agree when
  every segment has the same number of references.
* CIDEr-D's Gaussian length penalty counts *bigrams*, not words; a one-instance corpus has
  every IDF equal to 0, hence CIDEr 0.
* COCO splits a tokenized sentence with ``split(" ")``, so an empty one is one empty token.

METEOR is omitted: the official METEOR 1.5 aligns words by exact match, Porter stem, WordNet
synonym and a 300k-entry paraphrase table, with tuned weights; without WordNet and that table
(which are data, not formulas) it cannot be reproduced faithfully, and an "exact-match METEOR"
would be a different metric under the same name. ``pycocoevalcap.meteor`` (Java) computes it.

Tokenization (``tokenize_ptb``) re-implements the rules of Stanford CoreNLP 3.4.1's
``PTBTokenizer`` that English text of this kind exercises — longest match between rules, as
its JFlex lexer does. It gives the Java tokenizer's tokens for all 4,672 E2E dev-set references
(a test checks them) and for 98.7% of 3,000 dev references corrupted with random punctuation;
what still differs is stray symbols glued inside words (``c#``, ``sho;p``, quotes next to
quotes), which changes a score only through those tokens.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache
from typing import Sequence

BLEU_MAX_N = 4  # BLEU-4, as mteval and the challenge
NIST_MAX_N = 5  # NIST-5, mteval's default
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # BP_N = 0.5 at L_sys/L_ref = 2/3 (about 4.2162)
ROUGE_BETA = 1.2  # recall weight of COCO's ROUGE-L
CIDER_N = 4  # CIDEr-D n-gram orders 1..4
CIDER_SIGMA = 6.0  # width of CIDEr-D's Gaussian length penalty
# Tokens that pycocoevalcap's PTBTokenizer wrapper drops after tokenizing (its exact list; the
# bracket names never match, since the Java tokenizer lower-cases them first: "-lrb-" stays).
COCO_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                               ".", "?", "!", ",", ":", "-", "--", "...", ";"])


# ---- input checks -----------------------------------------------------------------------------
def _check_corpus(hyps, refs_list) -> tuple[list[str], list[list[str]]]:
    if isinstance(hyps, str) or not isinstance(hyps, Sequence):
        raise TypeError(f"hyps must be a list of strings (one output per instance), got {type(hyps).__name__}")
    if isinstance(refs_list, str) or not isinstance(refs_list, Sequence):
        raise TypeError("refs_list must be a list of lists of strings (the references of each instance), "
                        f"got {type(refs_list).__name__}")
    if len(hyps) != len(refs_list):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs_list)} reference sets; "
                         "give exactly one list of references per hypothesis, in the same order")
    if len(hyps) == 0:
        raise ValueError("the corpus is empty: give at least one hypothesis and its references")
    for i, h in enumerate(hyps):
        if not isinstance(h, str):
            raise TypeError(f"hyps[{i}] must be a string, got {type(h).__name__}")
    out = []
    for i, refs in enumerate(refs_list):
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(f"refs_list[{i}] must be a list of reference strings, got {type(refs).__name__} "
                            "(wrap a single reference as [ref])")
        if len(refs) == 0:
            raise ValueError(f"refs_list[{i}] is empty: every instance needs at least one reference")
        for r in refs:
            if not isinstance(r, str):
                raise TypeError(f"refs_list[{i}] holds a {type(r).__name__}; references must be strings")
        out.append(list(refs))
    return list(hyps), out


# ---- mteval-v13a tokenization -----------------------------------------------------------------
_13A_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")  # {|}~ [\]^_` space!"#$%& ()*+ :;<=>?@ /
_13A_PERIOD_COMMA_1 = re.compile(r"([^0-9])([\.,])")  # split . and , unless preceded by a digit
_13A_PERIOD_COMMA_2 = re.compile(r"([\.,])([^0-9])")  # ... unless followed by a digit
_13A_DASH = re.compile(r"([0-9])(-)")  # split - after a digit
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def tokenize_13a(text: str, lowercase: bool = True) -> list[str]:
    """mteval-v13a's default tokenization (its ``tokenization`` routine), as a list of tokens.

    Unescapes ``&quot; &amp; &lt; &gt;``, lower-cases A-Z only (Perl's ``tr/[A-Z]/[a-z]/``),
    splits punctuation and symbols, splits ``.`` and ``,`` unless a digit is on both sides,
    splits ``-`` after a digit, and splits on whitespace.
    """
    t = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    t = t.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    t = f" {t} "
    if lowercase:
        t = t.translate(_ASCII_LOWER)
    t = _13A_PUNCT.sub(r" \1 ", t)
    t = _13A_PERIOD_COMMA_1.sub(r"\1 \2 ", t)
    t = _13A_PERIOD_COMMA_2.sub(r" \1 \2", t)
    t = _13A_DASH.sub(r"\1 \2 ", t)
    return t.split()


# ---- n-gram helpers ---------------------------------------------------------------------------
def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))


def _max_ref_counts(refs: Sequence[Sequence[str]], n: int) -> Counter:
    merged: Counter = Counter()
    for r in refs:
        merged |= _ngrams(r, n)  # element-wise max over the references
    return merged


def _closest_ref_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """mteval's ``brevity_penalty_closest`` folded over the references in order: the length
    closest to ``hyp_len``, ties to the shorter; empty references after the first are skipped
    (they are the padding ``measure_scores.py`` adds to ragged reference sets)."""
    best = ref_lens[0]
    for r in ref_lens[1:]:
        if r == 0:
            continue
        d, d_best = abs(hyp_len - r), abs(hyp_len - best)
        if d < d_best or (d == d_best and r < best):
            best = r
    return best


# ---- BLEU -------------------------------------------------------------------------------------
def corpus_bleu(hyps: Sequence[str], refs_list: Sequence[Sequence[str]], max_n: int = BLEU_MAX_N) -> float:
    """Corpus BLEU in [0, 1] as mteval-v13a computes it (13a tokens, lower-cased, smoothed)."""
    hyps, refs_list = _check_corpus(hyps, refs_list)
    match, total = [0] * max_n, [0] * max_n
    ref_len = hyp_len = 0
    for h, refs in zip(hyps, refs_list):
        ht, rts = tokenize_13a(h), [tokenize_13a(r) for r in refs]
        for n in range(1, max_n + 1):
            match[n - 1] += sum((_ngrams(ht, n) & _max_ref_counts(rts, n)).values())  # clipped matches
            total[n - 1] += max(0, len(ht) - n + 1)
        hyp_len += len(ht)
        ref_len += _closest_ref_length(len(ht), [len(r) for r in rts])
    if hyp_len == 0:
        return 0.0
    log_bp = min(0.0, 1.0 - ref_len / hyp_len)
    log_p, smooth = 0.0, 1
    for m, t in zip(match, total):
        if t == 0:
            continue  # mteval: an order with no hypothesis n-gram adds log 1
        if m == 0:
            smooth *= 2  # mteval's smoothing: 1/2, 1/4, ... of one match
            log_p += math.log(1.0 / (smooth * t))
        else:
            log_p += math.log(m / t)
    return math.exp(log_p / max_n) * math.exp(log_bp)


# ---- NIST -------------------------------------------------------------------------------------
def nist_info_weights(refs_tokens: Sequence[Sequence[Sequence[str]]], max_n: int = NIST_MAX_N) -> dict:
    """``info(g) = log2(count(g[:-1]) / count(g))`` for every n-gram (n <= max_n) of the references."""
    counts: Counter = Counter()
    total_words = 0
    for refs in refs_tokens:
        for r in refs:
            total_words += len(r)
            for n in range(1, max_n + 1):
                counts.update(_ngrams(r, n))
    return {g: math.log2((counts[g[:-1]] if len(g) > 1 else total_words) / c) for g, c in counts.items()}


def corpus_nist(hyps: Sequence[str], refs_list: Sequence[Sequence[str]], max_n: int = NIST_MAX_N,
                nist_length: str = "mteval") -> float:
    """Corpus NIST as mteval-v13a computes it on ``measure_scores.py``'s padded references.

    ``nist_length="mteval"``: ``L_ref`` = reference words / largest reference count (official);
    ``"average"``: ``L_ref`` = sum over segments of the mean reference length (pymteval).
    """
    if nist_length not in ("mteval", "average"):
        raise ValueError(f"nist_length must be 'mteval' or 'average', got {nist_length!r}")
    hyps, refs_list = _check_corpus(hyps, refs_list)
    hyp_toks = [tokenize_13a(h) for h in hyps]
    ref_toks = [[tokenize_13a(r) for r in refs] for refs in refs_list]
    info = nist_info_weights(ref_toks, max_n)
    ref_words = sum(len(r) for refs in ref_toks for r in refs)
    if ref_words == 0:
        raise ValueError("every reference is empty after tokenization; NIST needs reference words")
    tst_info, tst_count = [0.0] * max_n, [0] * max_n
    for ht, rts in zip(hyp_toks, ref_toks):
        for n in range(1, max_n + 1):
            clipped = _ngrams(ht, n) & _max_ref_counts(rts, n)
            tst_info[n - 1] += sum(info[g] * c for g, c in clipped.items())
            tst_count[n - 1] += max(0, len(ht) - n + 1)
    score = sum(i / max(c, 1) for i, c in zip(tst_info, tst_count))
    if nist_length == "mteval":
        l_ref = ref_words / max(len(refs) for refs in ref_toks)
    else:
        l_ref = sum(sum(len(r) for r in rts) / len(rts) for rts in ref_toks)
    ratio = tst_count[0] / l_ref
    bp = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-NIST_BETA * math.log(ratio) ** 2)
    return score * bp


# ---- Stanford PTBTokenizer (CoreNLP 3.4.1), as pycocoevalcap runs it ----------------------------
_L, _LD = r"[^\W\d_]", r"[^\W_]"  # a Unicode letter; a letter or digit
_APOS = r"['\u0092\u2019]"
_SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
_HYPHEN = "[-_\u058a\u2010\u2011]"
_WORD = rf"{_L}{_LD}*(?:[.!?]{_L}{_LD}*)*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|re|ve|ll)"
_THING = rf"(?:[dDoOlL]{_APOS}{_LD})?{_LD}+(?:{_HYPHEN}(?:[dDoOlL]{_APOS}{_LD})?{_LD}+)*"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
_ABBREV1 = ("(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec|Mon|Tues?|Wed|Thu|Thurs|Fri|Ala|Ariz|Ark|Calif|Colo"
            "|Conn|Ct|Dak|Del|Fla|Ga|Ill|Ind|Kans?|Ky|La|Mass|Md|Mich|Minn|Miss|Mo|Mont|Neb|Nev|Okla|Ore|Pa|Penn"
            "|Tenn|Tex|Va|Vt|Wash|Wisc?|Wyo|Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Dept|Bhd|Assn|Univ|Intl"
            r"|Sys|tel|est|ext|sq|Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq|etc|al|seq|Bldg)\.")
_ABBREV2 = ("(?:Mrs|Mr|Ms|Miss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt"
            "|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|MM|Mmes?|Mlles?|vs|Alex|Wm|Jos|Cie"
            rf"|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl|M[ft]g|{_ACRO}|[A-Za-z])\.")
_CURRENCY = {"\u00a3": "#", "\u20ac": "$", "\u0080": "$", "\u00a2": "cents"}  # normalizeCurrency
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
# (name, token regex, trailing-context regex or None, case-insensitive); the longest token+context
# wins and ties go to the earlier rule, as in a JFlex lexer.
_PTB_RULES = [
    ("cannot", "cannot", rf"(?!{_LD})", True),
    ("sgml", r"</?[A-Za-z!?][^>\r\n.;]*>", None, False),
    ("mdash", "[\u0096\u0097\u2013\u2014\u2015]|&(?:MD|mdash|ndash);", None, False),
    ("word", _WORD, _REDAUX, False),
    ("word", r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]", "n['\u0092\u2019\u2018]t", False),
    ("word", _WORD, None, False),
    ("apoword", rf"{_APOS}n{_APOS}?|[lLdDjJ]{_APOS}|[A-HJ-XZn]['\u0092\u2019\u2018]{_L}{{2}}{_L}*"
                rf"|{_APOS}[2-9]0s|{_APOS}till?|{_L}+[aeiouyAEIOUY]['\u0092\u2019\u2018][aeiouA-Z]{_L}*"
                rf"|{_APOS}cause|{_APOS}em|[yY]{_APOS}", None, False),
    ("word", r"[^\W_][^\s\"<>|(){}]*@[^\s\"<>|(){}.,;:@]+(?:\.[^\s\"<>|(){}.,;:@]+)*", None, False),  # EMAIL
    ("word", r"[@#][A-Za-z_][A-Za-z0-9_]*", None, False),  # @name, #tag
    ("word", _ABBREV1, None, False),
    ("word", _ABBREV2, None, True),
    ("letter", r"[A-Za-z]\.", "[ \t\u00a0](?:[ \t\u00a0\n]|[A-Z])|\n(?:[ \t\u00a0]|[A-Z])",
     False),  # a letter before a sentence end: "d" "."
    ("word", _ACRO, rf"(?:{_SPACE}|\n|\Z)", False),
    ("word", r"(?:ca|figs?|prop|nos?|art|bldg|pp|op)\.", rf"{_SPACE}?\d", True),
    ("word", r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", None, False),  # DATE
    ("word", r"[-+]?(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)", None, False),  # NUMBER
    ("word", r"(?:\d{1,4}-)?\d{1,4}(?:\\?/|\u2044)\d{1,4}", None, False),  # FRAC
    ("word", rf"{_APOS}\d\d", None, False),
    ("currency", r"[A-Z]*\$|[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
     None, False),
    ("word", rf"(?:{_L}|\d)[A-Za-z0-9.,\u00ad]*(?:-(?:{_ACRO}\.|[A-Za-z0-9\u00ad]+))+", None, False),  # HTHING
    ("word", rf"(?:{_THING}|{_WORD})\.", "[,;:\u3001]", False),  # "center.,"
    ("word", _THING, None, False),
    ("word", r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+", None, False),  # THINGA
    ("word", rf"{_LD}+(?:[/-]{_LD}+)*/{_LD}+(?:[/-]{_LD}+)*", None, False),  # slash-joined: and/or, 5/5star
    ("word", r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]/]", "[^A-Za-z]|\\Z", False),  # SMILEY
    ("quote", _REDAUX, "[^A-Za-z]|\\Z", False),
    ("quote", "n['\u0092\u2019\u2018]t", "[^A-Za-z]|\\Z", False),
    ("quote", "'", "[A-Za-z][^ \t\n\r\u00a0]", False),
    ("quote", _REDAUX, None, False),
    ("quote", "n['\u0092\u2019\u2018]t", None, False),
    ("quote", "[`'\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}"
     "|&quot;|\"|" + _APOS, None, False),
    ("ldots", "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", None, False),
    ("word", r"@+|#+|_+|\*+|[?!]+", None, False),
    ("hyphens", "-+", None, False),
    ("space", "[\\s\u200b\u200e\u200f\ufeff\u2010\u2011\u058a\x00-\x1f]+", None, False),
    ("other", ".", None, False),  # any other character is a token of its own
]
_PTB_COMPILED = [(name, re.compile(f"(?P<t>{tok})" + (f"(?P<c>{ctx})" if ctx else ""), re.I if ci else 0))
                 for name, tok, ctx, ci in _PTB_RULES]
_QUOTE_MAP = {"\u2018": "`", "\u201a": "`", "\u201b": "`", "\u2039": "`", "\u0091": "`", "\u2019": "'", "\u203a": "'",
              "\u0092": "'", "\u201c": "``", "\u201e": "``", "\u201f": "``", "\u00ab": "``", "\u0093": "``",
              "\u201d": "''", "\u00bb": "''", "\u0094": "''", "`": "`"}


def _ptb_token(name: str, text: str) -> list[str]:
    if name == "cannot":
        return [text[:3], text[3:]]
    if name == "mdash" or (name == "hyphens" and 3 <= len(text) <= 4):
        return ["--"]
    if name == "ldots":
        return ["..."]
    if name == "currency":
        return [_CURRENCY.get(text, text)]
    if name == "sgml":
        return [text.replace(" ", "\u00a0")]
    if name == "quote":
        if len(text) > 1 and text[-1] in "mMsSdDetl":  # 's n't 're 've 'll 'd 'm
            return [text.replace("\u2018", "`").replace("\u2019", "'").replace("\u0092", "'")]
        return ["".join(_QUOTE_MAP.get(c, "''" if c == '"' else "'") for c in text)
                if text != "&quot;" else "''"]
    if name == "space":
        return []
    if name == "other":
        return [_BRACKETS.get(text, text)]
    return [text]


@lru_cache(maxsize=65536)
def _tokenize_ptb_cached(text: str, tail: str, remove_punctuation: bool) -> tuple[str, ...]:
    out, i, n = [], 0, len(text)
    text = text + tail  # the next line's first characters: lookahead only, never tokenized
    while i < n:
        best = None  # (total length, -rule index, name, token text)
        for k, (name, rx) in enumerate(_PTB_COMPILED):
            m = rx.match(text, i)
            if m and m.end() > i and (best is None or (m.end() - i, -k) > best[:2]):
                best = (m.end() - i, -k, name, m.group("t"))
        _, _, name, tok = best
        if name == "letter":  # a single letter before a sentence end: "d" then "."
            tok = tok[:-1]
        out.extend(t.lower() for t in _ptb_token(name, tok))
        i += len(tok)
    if remove_punctuation:
        out = [t for t in out if t not in COCO_PUNCTUATIONS]
    return tuple(out)


def tokenize_ptb(text: str, next_line: str | None = None, remove_punctuation: bool = True) -> list[str]:
    """The tokens COCO's ``PTBTokenizer`` wrapper gives: Stanford PTB tokenization, lower-cased
    (``-lowerCase``), then the punctuation tokens in ``COCO_PUNCTUATIONS`` removed.

    E.g. ``"The Eagle's prices (£20-25) aren't high."`` ->
    ``['the', 'eagle', "'s", 'prices', '-lrb-', '#', '20-25', '-rrb-', 'are', "n't", 'high']``.

    COCO tokenizes a whole batch of sentences as the lines of one file, and one rule looks past
    the end of a line: a single letter and period ending the line (``"... foo d."``) is split
    into ``d`` ``.`` when the next line starts with an upper-case letter, space or ``<``, and kept
    as ``d.`` otherwise or at the end of the file. ``next_line`` is that next line (None: none).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    text = re.sub("[\r\n\u2028\u2029\u000b\u000c\u0085]", " ", text)  # one sentence = one line
    tail = "" if next_line is None else "\n" + (next_line[:2] if next_line else "\n")
    return list(_tokenize_ptb_cached(text, tail, remove_punctuation))


def _tokenize_batch(sentences: Sequence[str]) -> list[list[str]]:
    """``tokenize_ptb`` of each sentence as a line of one COCO batch (each line sees the next)."""
    return [tokenize_ptb(s, sentences[i + 1] if i + 1 < len(sentences) else None)
            for i, s in enumerate(sentences)]


# ---- ROUGE-L ----------------------------------------------------------------------------------
def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by the O(|a| |b|) dynamic program, one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _coco_tokens(hyps: list[str], refs_list: list[list[str]]) -> tuple[list, list]:
    """PTB tokens of the hypotheses and references, each tokenized as one COCO batch in COCO's order."""
    hyp_toks = _tokenize_batch(hyps)
    flat = _tokenize_batch([r for refs in refs_list for r in refs])
    ref_toks, k = [], 0
    for refs in refs_list:
        ref_toks.append(flat[k: k + len(refs)])
        k += len(refs)
    return hyp_toks, ref_toks


def _rouge_l_from_tokens(hyp_toks, ref_toks, beta: float) -> list[float]:
    scores = []
    for c, refs in zip(hyp_toks, ref_toks):
        c = c or [""]  # COCO's split(" ") of an empty line is one empty token
        prec, rec = [], []
        for rt in refs:
            rt = rt or [""]
            lcs = _lcs_length(rt, c)
            prec.append(lcs / len(c))
            rec.append(lcs / len(rt))
        p, r = max(prec), max(rec)
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p != 0 and r != 0 else 0.0)
    return scores


def rouge_l_scores(hyps: Sequence[str], refs_list: Sequence[Sequence[str]], beta: float = ROUGE_BETA) -> list[float]:
    """Per-instance ROUGE-L of COCO's ``rouge.py``: F_beta of the separate maxima of LCS precision
    and LCS recall over the references."""
    hyps, refs_list = _check_corpus(hyps, refs_list)
    return _rouge_l_from_tokens(*_coco_tokens(hyps, refs_list), beta)


def rouge_l(hyps: Sequence[str], refs_list: Sequence[Sequence[str]], beta: float = ROUGE_BETA) -> float:
    """Corpus ROUGE-L (COCO, beta = 1.2): the mean of ``rouge_l_scores``, in [0, 1]."""
    s = rouge_l_scores(hyps, refs_list, beta)
    return sum(s) / len(s)


# ---- CIDEr-D ----------------------------------------------------------------------------------
def _cider_counts(words: Sequence[str], n: int) -> Counter:
    out: Counter = Counter()
    for k in range(1, n + 1):
        out.update(_ngrams(words, k))
    return out


def _cider_d_from_tokens(hyp_toks, ref_toks, n: int, sigma: float) -> list[float]:
    hyp_counts = [_cider_counts(h, n) for h in hyp_toks]
    ref_counts = [[_cider_counts(r, n) for r in refs] for refs in ref_toks]
    df: Counter = Counter()  # in how many instances' reference sets each n-gram occurs
    for refs in ref_counts:
        df.update(set(g for rc in refs for g in rc))
    log_n = math.log(float(len(ref_counts)))

    def vec(counts: Counter):
        v = [dict() for _ in range(n)]  # TF-IDF per order: term frequency * (log N - log df)
        for g, tf in counts.items():
            v[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(x * x for x in vk.values())) for vk in v]
        length = sum(tf for g, tf in counts.items() if len(g) == 2)  # quirk: the bigram count
        return v, norms, length

    scores = []
    for hc, refs in zip(hyp_counts, ref_counts):
        vh, nh, lh = vec(hc)
        total = [0.0] * n
        for rc in refs:
            vr, nr, lr = vec(rc)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(10.0 * (sum(total) / n) / len(refs))
    return scores


def cider_d_scores(hyps: Sequence[str], refs_list: Sequence[Sequence[str]], n: int = CIDER_N,
                   sigma: float = CIDER_SIGMA) -> list[float]:
    """Per-instance CIDEr-D of COCO's ``cider_scorer.py`` (already multiplied by 10)."""
    hyps, refs_list = _check_corpus(hyps, refs_list)
    return _cider_d_from_tokens(*_coco_tokens(hyps, refs_list), n, sigma)


def cider_d(hyps: Sequence[str], refs_list: Sequence[Sequence[str]], n: int = CIDER_N,
            sigma: float = CIDER_SIGMA) -> float:
    """Corpus CIDEr-D (COCO): the mean of ``cider_d_scores``."""
    s = cider_d_scores(hyps, refs_list, n, sigma)
    return sum(s) / len(s)


# ---- all four ---------------------------------------------------------------------------------
def e2e_scores(hyps: Sequence[str], refs_list: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU, NIST, ROUGE_L and CIDEr of ``hyps`` against ``refs_list`` (one list of references per
    hypothesis), with the names and scale ``measure_scores.py`` prints (METEOR is not computed;
    see the module docstring)."""
    hyps, refs_list = _check_corpus(hyps, refs_list)
    hyp_toks, ref_toks = _coco_tokens(hyps, refs_list)
    rouge = _rouge_l_from_tokens(hyp_toks, ref_toks, ROUGE_BETA)
    cider = _cider_d_from_tokens(hyp_toks, ref_toks, CIDER_N, CIDER_SIGMA)
    return {"BLEU": corpus_bleu(hyps, refs_list), "NIST": corpus_nist(hyps, refs_list),
            "ROUGE_L": sum(rouge) / len(rouge), "CIDEr": sum(cider) / len(cider)}
