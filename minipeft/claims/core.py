"""A course claim, how minipeft measures it, and the claims table written from recorded runs.

Each :class:`Claim` names the notes file it comes from (``seed``), the course's statement
and number, the lesson that measures it, a ``measure`` function from the recorded results
to minipeft's number (through a :class:`~minipeft.claims.results.Reader`, which logs the
exact file and keys read) and the :class:`~minipeft.claims.rules.Rule` that turns that
number into a verdict. :func:`write_claims` writes ``figures/claims.json`` (a list of
objects with the keys ``id, claim, seed, course, minipeft, verdict, source, rule, note``)
and ``figures/claims.md`` (the same as a Markdown table with a summary line).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import write_text_atomic
from .results import Missing, Reader, Results, load_results
from .rules import Rule, check_verdict

# the course notes (../shared/seeds/), by the name the claims table cites
SEED_FZENG = "000_fcf0addd3bb9a108.txt"  # "Parameter-Efficient Fine-Tuning" (transfer, memory, adapters, LoRA, quantization, QLoRA)
SEED_CS639 = "001_8fb8627cd9ab391d.txt"  # CS639 PEFT (adapters vs FT, prompt tuning, prefix/LoRA E2E tables, QLoRA)
SEED_CMU = "003_13caa06049d1c86c.txt"  # 15-442 LLM fine-tuning (adapters, LoRA latency, LoHa/LoKr, QLoRA, QST, serving)
SEED_PEFT = "004_57441b3a4de4a813.txt"  # PEFT overview (full copy per task, LoRA example, rank table, QLoRA)
SEEDS = (SEED_FZENG, SEED_CS639, SEED_CMU, SEED_PEFT)
KEYS = ("id", "claim", "seed", "course", "minipeft", "verdict", "source", "rule", "note")


class OutOfScale(Missing):
    """The claim's premise does not hold at minipeft's scale (the note says why): not attempted."""


@dataclass(frozen=True)
class Measurement:
    """minipeft's side of a claim."""

    value: float | None  # minipeft's number, in the course's unit where the course has one
    text: str  # a short reading: "LoRA 63.9 vs full FT 76.8 BLEU"
    relation: float | None = None  # the number the rule judges (default: value)
    relation_text: str = ""  # "LoRA/FT = 0.83"
    note: str = ""  # what this run adds to the claim's note

    @property
    def judged(self):
        return self.value if self.relation is None else self.relation


@dataclass(frozen=True)
class Claim:
    """One claim of the course notes and how minipeft checks it."""

    id: str  # short stable name: 'lora-vs-ft-e2e'
    claim: str  # the claim, in words
    seed: str  # the notes file it comes from (one of SEEDS)
    course: str  # the course's statement or number, as text
    course_value: float | None  # the course's value of the judged quantity, where it has one
    lesson: str  # the lesson that measures it ('memory' etc. for claims computed by a library function)
    measure: Callable[[Reader], Measurement]  # recorded results -> minipeft's number
    rule: Rule  # the verdict rule
    differs: str = ""  # why minipeft's number can differ (shown when the verdict is not 'reproduced')
    from_results: bool = True  # False: computed from minipeft's functions alone (no recorded run)

    def __post_init__(self):
        if self.seed not in SEEDS:
            raise ValueError(f"claim {self.id!r}: seed {self.seed!r} is not one of the notes files {SEEDS}")


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _judge(claim: Claim, results: Results):
    """(measurement or None, verdict, notes, reader) of ``claim`` under ``results``."""
    reader = Reader(results)
    notes = []
    try:
        m = claim.measure(reader)
    except Missing as e:
        m, v = None, "not-attempted"
        notes.append(("out of scale: " if isinstance(e, OutOfScale) else "") + str(e))
        if not isinstance(e, OutOfScale):  # the preferred run lacks a number: the next recorded run may have it
            for alt in results.alternatives():
                r2 = Reader(alt)
                try:
                    m = claim.measure(r2)
                except Missing:
                    continue
                reader, notes = r2, []
                break
    if m is not None:
        v = check_verdict(claim.rule(m.judged))
        if m.note:
            notes.append(m.note)
        if v != "reproduced" and claim.differs:
            notes.append(claim.differs)
    return m, v, notes, reader


def evaluate(claim: Claim, results: Results) -> dict:
    """The claims-table entry of ``claim`` under ``results`` (keys: :data:`KEYS`)."""
    m, v, notes, reader = _judge(claim, results)
    text = "" if m is None else m.text + (f" ({m.relation_text})" if m.relation_text else "")
    return {
        "id": claim.id,
        "claim": claim.claim,
        "seed": claim.seed,
        "course": {"text": claim.course, "value": _num(claim.course_value)},
        "minipeft": {"text": text, "value": None if m is None else _num(m.value),
                     "relation": None if m is None else _num(m.judged)},
        "verdict": v,
        "source": reader.source() or ("-" if m is None else "?"),
        "rule": claim.rule.text,
        "note": " ".join(notes),
    }


def lesson_claims(lesson: str, result: dict, report=None, *, claims) -> list[dict]:
    """The ``claims`` ``lesson`` measures, judged on the dict its ``main`` is about to return.

    With ``report`` (a lessons ``Report``), prints each as one ``Report.claim`` line: the
    course's statement, minipeft's number, the relation and the verdict, with the note
    where they differ -- the same verdicts the claims table gives for a recorded run.
    (:func:`minipeft.claims.lesson_claims` passes every claim, ``CLAIMS``, by default.)
    """
    results = Results.from_dicts({lesson: result}, "this run")
    out = []
    for c in claims:
        if c.lesson != lesson:
            continue
        m, v, notes, _ = _judge(c, results)
        if report is not None:
            ours = "-" if m is None else m.text
            relation = (m.relation_text or c.rule.quantity) if m is not None else c.rule.quantity
            report.claim(c.claim, c.course, ours, relation, v, note=" ".join(notes))
        out.append(evaluate(c, results))
    return out


def evaluate_all(claims, results: Results) -> list[dict]:
    ids = [c.id for c in claims]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"claim ids must be unique; repeated: {dup}")
    return [evaluate(c, results) for c in claims]


def summary(entries: list[dict]) -> str:
    """'N of M reproduced or partly (P%)', with how many were attempted."""
    m = len(entries)
    n = sum(e["verdict"] in ("reproduced", "partly") for e in entries)
    attempted = sum(e["verdict"] != "not-attempted" for e in entries)
    counts = ", ".join(f"{sum(e['verdict'] == v for e in entries)} {v}"
                       for v in ("reproduced", "partly", "contradicted", "not-attempted"))
    pct = 100 * n / m if m else 0.0
    pct_att = 100 * n / attempted if attempted else 0.0
    return (f"{n} of {m} reproduced or partly ({pct:.0f}%); of the {attempted} attempted, {pct_att:.0f}% "
            f"({counts}).")


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(entries: list[dict]) -> str:
    """The claims table: claim | course | minipeft | verdict | source, and the summary line."""
    lines = ["| claim | course | minipeft | verdict | source |", "|---|---|---|---|---|"]
    for e in entries:
        mp = e["minipeft"]["text"] or "-"
        if e["note"]:
            mp += f" <br>*{e['note']}*"
        lines.append(f"| {_cell(e['claim'])} (`{e['id']}`, {e['seed'][:3]}) | {_cell(e['course']['text'])} | "
                     f"{_cell(mp)} | **{e['verdict']}** | {_cell(e['source'])} |")
    return "\n".join(lines) + "\n\n" + summary(entries) + "\n"



def write_claims(results_root="benchmarks/results", out_json="figures/claims.json", out_md="figures/claims.md",
                 prefer: str = "gpu", *, claims, results: Results | None = None) -> list[dict]:
    """Evaluate ``claims`` on the recorded runs under ``results_root``; write the JSON list and the Markdown table.

    (:func:`minipeft.claims.write_claims` passes every claim, ``CLAIMS``, by default.)
    """
    results = results if results is not None else load_results(results_root, prefer=prefer)
    entries = evaluate_all(claims, results)
    if out_json is not None:
        write_text_atomic(Path(out_json), json.dumps(entries, indent=1, ensure_ascii=False) + "\n")
    if out_md is not None:
        write_text_atomic(Path(out_md), to_markdown(entries))
    return entries


BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def replace_block(text: str, block: str) -> str | None:
    """``text`` with what lies between the claims markers replaced by ``block``; None if the markers are absent."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0:
        return None
    if j < i:
        raise ValueError(f"the README's {END!r} marker comes before {BEGIN!r}; put the table's markers in order")
    return text[: i + len(BEGIN)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


def update_readme(readme, block: str) -> bool:
    """Replace the claims block of ``readme`` (a path) if it has the markers; whether it did."""
    readme = Path(readme)
    if not readme.is_file():
        return False
    new = replace_block(readme.read_text(), block)
    if new is None:
        return False
    write_text_atomic(readme, new)
    return True
