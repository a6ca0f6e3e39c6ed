"""E2E table-to-text data: a loader for E2E-format CSV files, MR parsing and prompt formatting,
splits by meaning representation, and a synthetic generator used when no file is given.

The E2E NLG Challenge dataset (Novikova, Dušek and Rieser, SIGDIAL 2017, arXiv:1706.09254) pairs
a meaning representation (MR) — ``name[The Eagle], eatType[coffee shop], area[riverside]`` — with
several human references. Its CSV files have the header ``mr,ref`` and one (MR, reference) pair
per row; ``load_e2e_csv`` groups the rows by MR.

Prompts follow the linearization of LoRA's E2E experiments (Hu et al., 2021, arXiv:2106.09685;
microsoft/LoRA ``examples/NLG``, after Li & Liang's prefix tuning): ``name : The Eagle | Type :
coffee shop | area : riverside||`` followed by the text, with the loss on the text only
(``pack_prompt_target`` in ``batches.py``). microsoft/LoRA's files also hold pre-tokenized text
(``£ 20``, ``family - friendly``); here values and references stay as written.

Splits are by distinct MR, never by row, so no MR is on both sides (a row split would leak the
other references of a validation MR into training).

``synthetic_e2e`` writes E2E-style restaurant data from the same eight attributes with several
phrasings per attribute, so everything runs on a fresh install with no file.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
# E2E attribute -> the key microsoft/LoRA's linearization writes
LORA_KEYS = {"name": "name", "eatType": "Type", "food": "food", "priceRange": "price",
             "customer rating": "customer rating", "area": "area", "familyFriendly": "family friendly",
             "near": "near"}
SEPARATOR = "||"  # between the linearized MR and the text
# Encoding slips fixed by the challenge's scorer when it reads a CSV (measure_scores.py read_tsv)
ENCODING_FIXES = (("\u0141", "\u00a3"), ("\u00c2\u00a3", "\u00a3"),  # Ł, Â£ -> £
                  ("\u00c3\u00a9", "\u00e9"), ("\u00e3\u00a9", "\u00e9"))  # Ã©, ã© -> é
_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*")


def parse_mr(mr: str) -> dict[str, str]:
    """``"name[The Eagle], area[riverside]"`` -> ``{"name": "The Eagle", "area": "riverside"}``."""
    if not isinstance(mr, str):
        raise TypeError(f"mr must be a string like 'name[The Eagle], area[riverside]', got {type(mr).__name__}")
    out: dict[str, str] = {}
    pos = 0
    while pos < len(mr):
        m = _MR_ITEM.match(mr, pos)
        if not m:
            raise ValueError(f"cannot parse MR {mr!r} at character {pos}: expected 'attribute[value]' items "
                             "separated by commas, e.g. 'name[The Eagle], area[riverside]'")
        key, value = m.group(1), m.group(2).strip()
        if key in out:
            raise ValueError(f"MR {mr!r} gives attribute {key!r} twice")
        out[key] = value
        pos = m.end()
        if pos < len(mr):
            if mr[pos] != ",":
                raise ValueError(f"cannot parse MR {mr!r}: expected ',' at character {pos}, got {mr[pos]!r}")
            pos += 1
    if not out:
        raise ValueError("empty MR: expected at least one 'attribute[value]' item")
    return out


def format_mr(mr: str | Mapping[str, str]) -> str:
    """The LoRA linearization, ``"name : The Eagle | Type : coffee shop | area : riverside"``; the
    attribute order is the MR's own (E2E files list them in ``ATTRIBUTES`` order)."""
    items = parse_mr(mr) if isinstance(mr, str) else dict(mr)
    return " | ".join(f"{LORA_KEYS.get(k, k)} : {v}" for k, v in items.items())


def format_prompt(mr: str | Mapping[str, str]) -> str:
    """The conditioning prompt: ``format_mr(mr) + "||"``; the model continues with the text."""
    return format_mr(mr) + SEPARATOR


def format_example(mr: str | Mapping[str, str], ref: str) -> str:
    """One training line in LoRA's format: ``name : X | Type : Y||text``."""
    return format_prompt(mr) + ref


def parse_prompt(text: str) -> dict[str, str]:
    """Inverse of ``format_prompt`` / ``format_mr`` (any text after ``||`` is ignored)."""
    head = text.split(SEPARATOR, 1)[0]
    back = {v: k for k, v in LORA_KEYS.items()}
    out: dict[str, str] = {}
    for part in head.split(" | "):
        key, sep, value = part.partition(" : ")
        if not sep:
            raise ValueError(f"cannot parse prompt part {part!r}: expected 'key : value' (as format_mr writes)")
        out[back.get(key.strip(), key.strip())] = value.strip()
    return out


@dataclass(frozen=True)
class E2EData:
    """Distinct MRs and their references: ``refs[i]`` are the references of ``mrs[i]``."""

    mrs: tuple[str, ...]  # distinct MRs, in order of first appearance
    refs: tuple[tuple[str, ...], ...]  # the references of each MR, in file order
    source: str  # the file read, or "synthetic(seed=...)"

    def __post_init__(self):
        if len(self.mrs) != len(self.refs):
            raise ValueError(f"{len(self.mrs)} MRs but {len(self.refs)} reference lists")

    def __len__(self) -> int:
        return len(self.mrs)

    @property
    def n_rows(self) -> int:
        """Number of (MR, reference) pairs."""
        return sum(len(r) for r in self.refs)

    def pairs(self) -> list[tuple[str, str]]:
        """Every (prompt, reference) pair, for ``PromptTargetBatches.from_pairs``."""
        return [(format_prompt(mr), ref) for mr, refs in zip(self.mrs, self.refs) for ref in refs]

    def prompts(self) -> list[str]:
        """One prompt per distinct MR (what a decoder is given at evaluation)."""
        return [format_prompt(mr) for mr in self.mrs]

    def subset(self, indices: Sequence[int]) -> "E2EData":
        idx = [int(i) for i in indices]
        return E2EData(tuple(self.mrs[i] for i in idx), tuple(self.refs[i] for i in idx), self.source)

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["E2EData", "E2EData"]:
        """``(train, val)`` by distinct MR: a seeded permutation puts ``round(val_fraction * n)``
        MRs (at least 1) in ``val``; both keep the original order."""
        return split_by_mr(self, val_fraction, seed)


def split_by_mr(data: E2EData, val_fraction: float = 0.1, seed: int = 0) -> tuple[E2EData, E2EData]:
    """Split ``data`` into ``(train, val)`` by distinct MR (see ``E2EData.split``)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = len(data)
    if n < 2:
        raise ValueError(f"need at least 2 distinct MRs to split, got {n}")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val_idx = np.sort(np.random.default_rng(seed).permutation(n)[:n_val])  # (n_val,)
    is_val = np.zeros(n, dtype=bool)
    is_val[val_idx] = True
    return data.subset(np.flatnonzero(~is_val)), data.subset(val_idx)


def load_e2e_csv(path: str | Path, fix_encoding: bool = True) -> E2EData:
    """Read an E2E-format CSV (header with ``mr`` and ``ref`` columns, any order, any case) and
    group the references by MR. ``fix_encoding`` repairs the mis-encoded £ and é that the
    challenge's scorer repairs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no E2E CSV at {path}: give the path of a file with header 'mr,ref' "
                                "(e.g. ../shared/data/e2e/devset.csv), or use synthetic_e2e() for generated data")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start} (line {line}) "
                         f"is not valid UTF-8. The E2E files are UTF-8; convert this one, e.g. "
                         f"`iconv -f latin1 -t utf-8 {path} > fixed.csv` (if it was saved as Latin-1 / cp1252)"
                         ) from None
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise ValueError(f"{path} is not a readable CSV ({e}); expected a header 'mr,ref' and one quoted "
                         "(MR, reference) pair per row") from None
    if not rows:
        raise ValueError(f"{path} is empty: expected a header 'mr,ref' and one row per reference")
    header = [h.strip().lower() for h in rows[0]]
    if "mr" not in header or "ref" not in header:
        raise ValueError(f"{path} has header {rows[0]!r}; expected columns 'mr' and 'ref' "
                         "(E2E format: 'mr,ref' then one (MR, reference) pair per row)")
    i_mr, i_ref = header.index("mr"), header.index("ref")
    groups: dict[str, list[str]] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path} line {line_no}: {len(row)} fields, but the header has {len(header)}; "
                             "quote fields that contain commas")
        mr, ref = row[i_mr].strip(), row[i_ref].strip()
        if fix_encoding:
            for bad, good in ENCODING_FIXES:
                mr, ref = mr.replace(bad, good), ref.replace(bad, good)
        if not mr or not ref:
            raise ValueError(f"{path} line {line_no}: empty {'mr' if not mr else 'ref'} field")
        try:
            parse_mr(mr)  # fail early on a malformed MR, naming its line
        except ValueError as e:
            raise ValueError(f"{path} line {line_no}: {e}") from None
        groups.setdefault(mr, []).append(ref)
    if not groups:
        raise ValueError(f"{path} has a header but no rows")
    return E2EData(tuple(groups), tuple(tuple(r) for r in groups.values()), str(path))


def load_e2e(path: str | Path | None = None, seed: int = 0, n_mrs: int = 600) -> E2EData:
    """The E2E CSV at ``path``, or, when ``path`` is None, ``synthetic_e2e(n_mrs, seed=seed)``."""
    return synthetic_e2e(n_mrs, seed=seed) if path is None else load_e2e_csv(path)


# ---- synthetic E2E-style data ------------------------------------------------------------------
VALUES = {
    "name": ("The Golden Lantern", "Blue Heron", "The Copper Kettle", "Willow Tree", "The Red Fox", "Moon Bay",
             "The Old Mill", "Silver Spoon", "The Anchor", "Green Table", "Cosy Corner", "The Lamp",
             "Harbour Lights", "The Quiet Owl", "Saffron House", "The Cherry Orchard"),
    "eatType": ("restaurant", "pub", "coffee shop"),
    "food": ("Chinese", "English", "French", "Fast food", "Indian", "Italian", "Japanese"),
    "priceRange": ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("city centre", "riverside"),
    "familyFriendly": ("yes", "no"),
    "near": ("the Bridge Inn", "Market Hall", "the Grand Hotel", "St Anne's Church", "the Railway Arms",
             "Cafe Roma", "Burger Palace", "the Old Library"),
}
# Verb phrases per attribute, said of the venue ("{v}" is the value).
PHRASES = {
    "eatType": ("is {a} {v}", "is {a} {v} venue", "operates as {a} {v}"),
    "food": ("serves {v} food", "offers {v} cuisine", "has {a} {v} menu", "provides {v} dishes"),
    "price_word": ("has {v} prices", "is in the {v} price range", "offers food at {v} prices"),
    "price_amount": ("has a price range of {v}", "charges {v} per person", "costs {v}"),
    "rating_word": ("has {a} {v} customer rating", "is rated {v} by customers", "gets {v} ratings"),
    "rating_score": ("has a customer rating of {v}", "is rated {v}", "received {a} {v} rating"),
    "area": ("is in the {v}", "is located in the {v} area", "can be found in the {v}"),
    "family_yes": ("is family-friendly", "is kid friendly", "welcomes children", "is good for families"),
    "family_no": ("is not family-friendly", "is not kid friendly", "does not welcome children", "is for adults only"),
    "near": ("is near {v}", "is located near {v}", "is close to {v}", "sits next to {v}"),
}
OPENINGS = ("{name} {p}", "There is {a} {type} called {name} that {p}", "{name}, {a} {type}, {p}")


def _phrase(attr: str, value: str, rng: np.random.Generator) -> str:
    if attr == "priceRange":
        key = "price_amount" if "£" in value else "price_word"
    elif attr == "customer rating":
        key = "rating_score" if "out of" in value else "rating_word"
    elif attr == "familyFriendly":
        key = "family_yes" if value == "yes" else "family_no"
    else:
        key = attr
    options = PHRASES[key]
    return options[int(rng.integers(len(options)))].format(v=value, a=_article(value))


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def realize(mr: Mapping[str, str], rng: np.random.Generator) -> str:
    """One reference text for ``mr``: every attribute is said, in shuffled order, in sentences of
    one to three clauses, with a phrasing drawn per attribute."""
    name = mr["name"]
    attrs = [a for a in ATTRIBUTES if a != "name" and a in mr]
    attrs = [attrs[i] for i in rng.permutation(len(attrs))]
    if "eatType" in attrs:  # say the type first: "X is a pub ..." rather than "The pub is a pub"
        attrs.insert(0, attrs.pop(attrs.index("eatType")))
    phrases = [_phrase(a, mr[a], rng) for a in attrs]
    kind = mr.get("eatType", "place")
    opening = OPENINGS[int(rng.integers(len(OPENINGS)))] if "eatType" in mr else OPENINGS[0]
    if opening != OPENINGS[0] and "eatType" in attrs:
        phrases.pop(attrs.index("eatType"))  # the opening already says the type
    if not phrases:
        return f"{name} is a {kind}."
    sentences, first = [], True
    while phrases:
        take = int(rng.integers(1, 4))
        chunk, phrases = phrases[:take], phrases[take:]
        if first:
            sentences.append(opening.format(name=name, type=kind, a=_article(kind), p=_join(chunk)) + ".")
            first = False
        else:
            subject = ("It", f"The {kind}", name)[int(rng.integers(3))]
            sentences.append(f"{subject} {_join(chunk)}.")
    return " ".join(sentences)


def synthetic_mr(rng: np.random.Generator) -> dict[str, str]:
    """An MR: ``name`` and 2-7 other attributes (E2E MRs hold 3-8), values drawn uniformly."""
    others = list(ATTRIBUTES[1:])
    k = int(rng.integers(2, len(others) + 1))
    chosen = set(others[i] for i in rng.choice(len(others), size=k, replace=False))
    return {a: VALUES[a][int(rng.integers(len(VALUES[a])))] for a in ATTRIBUTES if a == "name" or a in chosen}


def mr_to_string(mr: Mapping[str, str]) -> str:
    """``{"name": "X", "area": "Y"}`` -> ``"name[X], area[Y]"`` (the E2E CSV form)."""
    return ", ".join(f"{k}[{v}]" for k, v in mr.items())


def synthetic_e2e(n_mrs: int = 600, refs_per_mr: tuple[int, int] = (2, 8), seed: int = 0) -> E2EData:
    """``n_mrs`` distinct synthetic MRs, each with ``refs_per_mr[0]..refs_per_mr[1]`` distinct
    references; the same seed gives the same data."""
    if isinstance(n_mrs, bool) or not isinstance(n_mrs, (int, np.integer)) or n_mrs < 1:
        raise ValueError(f"n_mrs must be a positive int, got {n_mrs!r}")
    lo, hi = refs_per_mr
    if not 1 <= lo <= hi:
        raise ValueError(f"refs_per_mr must be (min, max) with 1 <= min <= max, got {refs_per_mr!r}")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    tries = 0
    while len(groups) < n_mrs:
        tries += 1
        if tries > 50 * n_mrs:
            raise ValueError(f"could not draw {n_mrs} distinct MRs; ask for fewer")
        mr = synthetic_mr(rng)
        key = mr_to_string(mr)
        if key in groups:
            continue
        want = int(rng.integers(lo, hi + 1))
        refs: list[str] = []
        for _ in range(8 * want):
            text = realize(mr, rng)
            if text not in refs:
                refs.append(text)
            if len(refs) == want:
                break
        groups[key] = refs
    return E2EData(tuple(groups), tuple(tuple(r) for r in groups.values()), f"synthetic(seed={seed})")
