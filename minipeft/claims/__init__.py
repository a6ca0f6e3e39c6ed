"""The course's claims, each with minipeft's number and a verdict computed by a stated rule.

``CLAIMS`` lists every claim of the four course notes (``../shared/seeds/``) that can be
computed or measured at minipeft's scale. :func:`write_claims` evaluates them on the
recorded lesson runs under ``benchmarks/results/`` (:func:`load_results`) and writes
``figures/claims.json`` and ``figures/claims.md``; ``python -m minipeft.figures
--claims-only`` does that from the command line.
"""
from . import core, lora_e2e, memory, methods, quantization, transfer
from .core import (KEYS, SEEDS, Claim, Measurement, OutOfScale, evaluate, evaluate_all, replace_block, summary,
                   to_markdown, update_readme)
from .results import Missing, Reader, Results, Run, load_results
from .rules import VERDICTS, Rule, at_least, at_most, verdict

CLAIMS = [*transfer.CLAIMS, *memory.CLAIMS, *quantization.CLAIMS, *lora_e2e.CLAIMS, *methods.CLAIMS]


def lesson_claims(lesson: str, result: dict, report=None, claims=None) -> list[dict]:
    """:func:`core.lesson_claims` over ``claims``, by default every claim (``CLAIMS``)."""
    return core.lesson_claims(lesson, result, report, claims=CLAIMS if claims is None else claims)


def write_claims(results_root="benchmarks/results", out_json="figures/claims.json", out_md="figures/claims.md",
                 prefer: str = "gpu", claims=None, results: Results | None = None) -> list[dict]:
    """:func:`core.write_claims` of ``claims``, by default every claim (``CLAIMS``)."""
    return core.write_claims(results_root, out_json, out_md, prefer, claims=CLAIMS if claims is None else claims,
                             results=results)

__all__ = ["CLAIMS", "KEYS", "SEEDS", "VERDICTS", "Claim", "Measurement", "Missing", "OutOfScale", "Reader",
           "Results", "Rule", "Run", "at_least", "at_most", "evaluate", "evaluate_all", "lesson_claims", "load_results",
           "replace_block", "summary", "to_markdown", "update_readme", "verdict", "write_claims"]
